"""Rollout throughput on one GPU: posttrain's continuous-batching engine vs transformers' `generate`.

For each preset (random init, text model; attention q-norm scales tempered as in
gemma4_parity.py so that the numerics are those of a sane model) and batch size: prompts of
--prompt-tokens random tokens, --new-tokens sampled tokens each with EOS ignored, temperature 1.
Each timed run follows an identical warm-up run (CUDA graphs captured there). Reports:
- tok_per_s: generated tokens / wall seconds of `engine.generate` (prefill included);
- baseline_tok_per_s: transformers' `generate` (bf16 weights, sampling, same lengths), when run;
- peak_gib: peak allocated memory during the timed run (all weights on the device included),
  engine_weights_gib and kv_cache_gib;
- refresh_seconds: `engine.refresh_weights` from the fp32 master (median of 3);
- median_token_mult_prob_error: the engine's logprobs vs the trainer's (fp32 master under bf16
  autocast, teacher-forced) on the same run's samples, per group of 8 sequences.
Presets marked with --bf16-only (e.g. 31b, which does not fit in fp32 beside its engine) hold only
bf16 weights; the engine generates from them directly and no parity or refresh is measured.

    python benchmarks/rollout.py --presets e2b --batches 64,256 --baseline
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from gemma4_parity import score
from transformers import Gemma4ForCausalLM

from posttrain.models.gemma4_presets import gemma4_preset_config, temper_random_init_attention
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.continuous_engine import ContinuousBatchingEngine

GIB = 2**30


def module_gib(module: torch.nn.Module) -> float:
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total / GIB


def random_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(1000, 200_000, (length - 1,), generator=gen).tolist() for _ in range(count)]


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def baseline_tok_per_s(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> float:
    """transformers' generate: sampling at temperature 1, no top-k/top-p, EOS suppressed."""
    input_ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
    )
    model.generate(input_ids, max_new_tokens=8, min_new_tokens=8, **kwargs)  # warm-up
    out, seconds = timed(lambda: model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs))
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / seconds


def run_preset(preset: str, args) -> list[dict]:
    config = gemma4_preset_config(preset, text_only=True)
    torch.manual_seed(0)
    bf16_only = preset in args.bf16_only
    with torch.device("cuda"):
        model = Gemma4ForCausalLM(config).to(torch.bfloat16 if bf16_only else torch.float32).eval()
    model.requires_grad_(not bf16_only)
    temper_random_init_attention(model)
    engine = ContinuousBatchingEngine(
        model,
        pad_token_id=0,
        precision="bfloat16" if bf16_only else args.precision,
        max_batch_size=max(args.batches),
        copy_weights=not bf16_only,
        cuda_graphs=not args.no_cuda_graphs,
        compile=not args.no_compile,
    )
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    refresh_seconds = None
    if not bf16_only:
        refresh_seconds = statistics.median(
            timed(partial(engine.refresh_weights, model.named_parameters()))[1] for _ in range(3)
        )
    baseline_model = None
    rows = []
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_tokens, seed=batch)
        _, warmup_seconds = timed(partial(engine.generate, prompts, params))  # allocation, compilation, capture
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        rollouts, seconds = timed(partial(engine.generate, prompts, params))
        stats = engine.last_stats
        assert all(len(r.token_ids) == args.new_tokens for r in rollouts)
        row = {
            "preset": preset,
            "batch": batch,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "precision": "bfloat16" if bf16_only else args.precision,
            "cuda_graphs": not args.no_cuda_graphs,
            "compiled": not args.no_compile,
            "tok_per_s": batch * args.new_tokens / seconds,
            "seconds": seconds,
            "warmup_seconds": warmup_seconds,
            "prefill_seconds": stats.prefill_seconds,
            "decode_seconds": stats.decode_seconds,
            "decode_steps": stats.decode_steps,
            "peak_gib": torch.cuda.max_memory_allocated() / GIB,
            "engine_weights_gib": module_gib(engine.model),
            "kv_cache_gib": engine.cache.nbytes() / GIB,
            "master_weights_gib": None if bf16_only else module_gib(model),
            "refresh_seconds": refresh_seconds,
            "baseline_tok_per_s": None,
            "median_token_mult_prob_error": None,
        }
        if not bf16_only:
            width = args.prompt_tokens + args.new_tokens
            parity = score(model, rollouts, group=8, width=width, autocast=True)
            row["median_token_mult_prob_error"] = parity["token_mult_prob_error_median"]
            row["max_token_mult_prob_error"] = parity["token_mult_prob_error_max"]
            row["mean_gen_kl_error"] = parity["gen_kl_error_mean"]
        if args.baseline and batch in args.baseline_batches:
            if baseline_model is None:
                baseline_model = copy.deepcopy(model).to(torch.bfloat16) if not bf16_only else model
                baseline_model.config._attn_implementation = "sdpa"
                baseline_model.config.get_text_config()._attn_implementation = "sdpa"
            row["baseline_tok_per_s"] = baseline_tok_per_s(baseline_model, prompts, args.new_tokens)
            row["speedup_vs_baseline"] = row["tok_per_s"] / row["baseline_tok_per_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="e2b", type=lambda s: s.split(","))
    parser.add_argument("--batches", default="64,256", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--precision", default="bfloat16_autocast", choices=("bfloat16", "bfloat16_autocast"))
    parser.add_argument("--baseline", action="store_true", help="also time transformers' generate")
    parser.add_argument("--baseline-batches", default=None, type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--bf16-only", default="31b", type=lambda s: s.split(",") if s else [])
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.baseline_batches = args.baseline_batches or args.batches

    rows = []
    for preset in args.presets:
        rows += run_preset(preset, args)
        gc.collect()  # the preset's models and engine are gone
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = args.out or Path(__file__).parent / "results" / f"rollout-{gpu}.json"
    meta = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "command": "python benchmarks/rollout.py " + " ".join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{**row, **meta} for row in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
