"""Trainer vs generator logprob mismatch on a real Gemma 4 preset shape (random init), one GPU.

The generator (posttrain's TorchRolloutEngine) samples with a KV cache from its own weight copy;
the same tokens are then scored teacher-forced in several ways, to separate precision effects
from logic errors:
- trainer_autocast: fp32 master weights under bf16 autocast (what a GRPO step computes)
- trainer_fp32: fp32 master weights, no autocast
- generator_copy: the generator's own weight copy and numerics, teacher-forced (no KV cache)
- *_float32_head: the same with the output head computed in fp32 (isolates bf16 rounding of logits)
Writes benchmarks/results/gemma4_parity-<preset>-<gpu>.json (or to --out).

    python benchmarks/gemma4_parity.py --preset e2b --generator-precision bfloat16_autocast
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Gemma4ForCausalLM

from posttrain.algorithms.mismatch import gen_kl_error, token_mult_prob_error
from posttrain.loops.rollouts import pack_rollouts
from posttrain.models.gemma4_presets import gemma4_preset_config, temper_random_init_attention
from posttrain.models.logprobs import token_logprobs
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.torch_engine import TorchRolloutEngine

# --generator-precision (the recipe's policy.generation.dtype) -> (weight dtype, bf16 autocast)
GENERATOR_PRECISION = {
    "float32": (torch.float32, False),
    "bfloat16": (torch.bfloat16, False),
    "bfloat16_autocast": (torch.float32, True),
}


class Float32Head(torch.nn.Module):
    """lm_head computed in fp32 from whatever the hidden states are (no bf16 rounding of logits)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=False):
            return torch.nn.functional.linear(hidden.float(), self.weight.float())


def with_float32_head(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `model` whose output head computes fp32 logits (weights shared, not copied)."""
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone.lm_head = Float32Head(model.lm_head.weight)
    return clone


def score(model, rollouts, *, group: int, width: int, autocast: bool) -> dict[str, float]:
    """token_mult_prob_error per group of sequences (median, max) and gen_kl_error (mean, max)."""
    tme, kl = [], []
    for start in range(0, len(rollouts), group):
        packed = {
            k: v.cuda() for k, v in pack_rollouts(rollouts[start : start + group], width=width, pad_token_id=0).items()
        }
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            old_BT = torch.nn.functional.pad(
                token_logprobs(model, packed["input_ids"], packed["attention_mask"]), (1, 0)
            )
        mask_BT = packed["response_mask"].float()
        tme.append(token_mult_prob_error(packed["gen_logprobs"], old_BT, mask_BT))
        kl.append(gen_kl_error(packed["gen_logprobs"], old_BT, mask_BT))
    return {
        "token_mult_prob_error_median": statistics.median(tme),
        "token_mult_prob_error_max": max(tme),
        "gen_kl_error_mean": statistics.fmean(kl),
        "gen_kl_error_max": max(kl),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="e2b")
    parser.add_argument("--generator-precision", choices=GENERATOR_PRECISION, default="bfloat16")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--group", type=int, default=8, help="sequences per token_mult_prob_error value")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--attention-init",
        choices=("tempered", "transformers"),
        default="tempered",
        help="tempered: q-norm scales 1/sqrt(head_dim) (see temper_random_init_attention); transformers: ones",
    )
    parser.add_argument(
        "--generator-head",
        choices=("model", "float32"),
        default="model",
        help="float32: the generator computes its logits in fp32 from its hidden states",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    config = gemma4_preset_config(args.preset, text_only=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma4ForCausalLM(config).float().eval()
    if args.attention_init == "tempered":
        temper_random_init_attention(model)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        [2] + torch.randint(1000, 200_000, (args.prompt_tokens - 1,), generator=gen).tolist()
        for _ in range(args.sequences)
    ]
    engine = TorchRolloutEngine(
        model,
        pad_token_id=0,
        dtype=GENERATOR_PRECISION[args.generator_precision][0],
        autocast=GENERATOR_PRECISION[args.generator_precision][1],
        max_batch_size=args.sequences,
    )
    if args.generator_head == "float32":
        engine.model = with_float32_head(engine.model)
    start = time.perf_counter()
    rollouts = engine.generate(
        prompts, SamplingParams(temperature=args.temperature, max_new_tokens=args.new_tokens, seed=0)
    )
    seconds = time.perf_counter() - start
    width = args.prompt_tokens + args.new_tokens
    sampled = [lp for r in rollouts for lp in r.logprobs]

    result = {
        "preset": args.preset,
        "model": f"Gemma4ForCausalLM, {args.preset} text preset shape, random init",
        "attention_init": args.attention_init,
        "generator_head": args.generator_head,
        "generator_precision": args.generator_precision,
        "sequences": args.sequences,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "sampled_tokens": len(sampled),
        "mean_sampled_logprob": statistics.fmean(sampled),
        "generation_seconds": seconds,
        "trainer_autocast": score(model, rollouts, group=args.group, width=width, autocast=True),
        "trainer_fp32": score(model, rollouts, group=args.group, width=width, autocast=False),
        "trainer_autocast_float32_head": score(
            with_float32_head(model), rollouts, group=args.group, width=width, autocast=True
        ),
        "generator_copy": score(engine.model, rollouts, group=args.group, width=width, autocast=engine.autocast),
        "generator_copy_float32_head": score(
            with_float32_head(engine.model), rollouts, group=args.group, width=width, autocast=engine.autocast
        ),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "command": "python benchmarks/gemma4_parity.py "
        + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k != "out" and v is not False
        ),
    }
    print(json.dumps(result, indent=1))
    gpu = torch.cuda.get_device_name().split()[-1].lower()
    out = (
        args.out
        or Path(__file__).parent
        / "results"
        / f"gemma4_parity-{args.preset}-{args.generator_precision}-{args.attention_init}-head_{args.generator_head}-{gpu}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
