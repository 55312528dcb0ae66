"""Whole DAPO steps timed by phase: a random-init Gemma 4 preset, one process or several (torchrun,
FSDP2 training, every rank generating its share of the prompts on its own GPU with the rollout
engine colocated, weights refreshed from the shards after each step).

Workload: 8 prompts x 8 generations x 256 new tokens (stop tokens ignored, so every response is
256 tokens), arithmetic prompts of ~30 tokens, DAPO's loss (clip-higher, token-level, overlong
shaping, truncated importance sampling), beta 0, one optimizer step per rollout batch, bf16
autocast over fp32 masters, activation checkpointing, sequence packing. Dynamic sampling is off:
a random-init model's groups all score 0, so DAPO would discard every one of them.

    python benchmarks/dapo_step.py --preset e2b
    torchrun --nproc-per-node 2 benchmarks/dapo_step.py --preset e2b --baseline results/one_gpu.json
    python benchmarks/dapo_step.py --preset e2b --trl      # and TRL's GRPOTrainer, same workload
    python benchmarks/dapo_step.py --preset e4b --images --optimizer-offload   # a VLM GRPO step

With --trl (one process), TRL's GRPOTrainer first runs the same workload in a child process of its
own (`trl_grpo.py`; its peak memory is its own), then posttrain's; the result adds
`posttrain_step_seconds` / `trl_step_seconds` (steady-state steps), posttrain's phases,
`posttrain_peak_gib` / `trl_peak_gib` and the ratio of the steady-state means.

Writes benchmarks/results/dapo_step-<gpu>[x<N>].json (rank 0): per-step phase seconds, steady-state
means (the first step, which captures CUDA graphs and warms kernels, excluded), tokens/s per GPU and
peak memory (rank 0's; ranks are alike); --baseline puts a one-process result beside it. `--preset tiny` is a CPU
smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
import yaml
from transformers import Gemma4ForCausalLM

from posttrain.config import RecipeConfig, load_config
from posttrain.data.arithmetic import arithmetic_samples
from posttrain.data.shapes import shape_count_samples
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.tiny import (
    END_OF_TURN,
    save_random_preset,
    save_tiny_gemma4,
    tiny_gemma4_config,
    train_tokenizer,
)
from posttrain.training.distributed import barrier, init_distributed

GIB = 2**30
ARITHMETIC = {"type": "arithmetic", "operation": "max", "size": 2000, "seed": 0, "num_terms": 2, "max_value": 99}
# --images: one image per prompt, two sizes; the presets' processor resizes each to <= 280 soft tokens
SHAPES = {"type": "shapes", "size": 2000, "seed": 0, "max_count": 6, "image_sizes": [[48, 48], [72, 48]]}
IMAGE_PROMPT_TOKENS = 360  # 280 soft tokens, their delimiters and the question
PHASES = ("generation", "scoring", "training", "weight_refresh", "total_step")


def build_checkpoint(preset: str, out_dir: Path, device: torch.device, *, images: bool = False) -> None:
    """A random-init preset (tempered attention, bf16 safetensors) with a locally trained tokenizer;
    with `images`, the multimodal model (vision and audio towers) and a Gemma 4 processor for its
    vision tower (images resized to the preset's 280 soft tokens)."""
    corpus = [s.prompt + " " + str(s.ground_truth) for s in arithmetic_samples(2000, seed=0, operation="max")]
    corpus += [s.prompt + " " + s.ground_truth for s in shape_count_samples(200, seed=0)] if images else []
    tokenizer = train_tokenizer(corpus, vocab_size=512, multimodal=images)
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    if preset == "tiny" and images:
        save_tiny_gemma4(out_dir, tokenizer, seed=0, variant="e_series", multimodal=True)
        return
    if preset == "tiny":
        config = tiny_gemma4_config(len(tokenizer), variant="e_series", eos_token_ids=eos_ids)
        torch.manual_seed(0)
        Gemma4ForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        return
    save_random_preset(out_dir, tokenizer, preset, seed=0, multimodal=images, device=device)


def recipe(checkpoint: Path, log_dir: Path, args, on_gpu: bool) -> dict:
    return {
        "policy": {
            "model_name": str(checkpoint),
            "text_only": True,
            "precision": "bfloat16" if on_gpu else "float32",
            "activation_checkpointing": True,
            "sequence_packing": not args.images,  # packing is text-only
            **({"text_only": False, "freeze_config": {"freeze_vision_tower": False, "freeze_audio_tower": True}} if args.images else {}),
            "compile": args.compile_train,
            "train_global_batch_size": args.prompts * args.generations,
            "train_micro_batch_size": args.micro_batch,
            "max_total_sequence_length": (IMAGE_PROMPT_TOKENS if args.images else 64) + args.new_tokens,
            "optimizer_offload": args.optimizer_offload,
            "optimizer": {"lr": 1e-6},
            "generation": {
                "backend": args.backend,
                "compile": args.compile,
                "temperature": 1.0,
                "max_new_tokens": args.new_tokens,
                "stop_token_ids": [],  # every response is max_new_tokens long
                **({} if args.release_weights is None else {"release_weights_during_training": args.release_weights}),
            },
        },
        "data": {"train": SHAPES if args.images else ARITHMETIC},
        "env": {"name": "math"},
        "grpo": {
            "num_prompts_per_step": args.prompts,
            "num_generations_per_prompt": args.generations,
            "max_num_steps": args.steps,
            "use_dynamic_sampling": False,
            "normalize_rewards": True,
            "reward_shaping": {"enabled": True, "overlong_buffer_length": max(1, args.new_tokens // 8), "overlong_buffer_penalty": 1.0},
            "val_period": 0,
            "val_at_start": False,
        },
        "loss_fn": {
            "reference_policy_kl_penalty": 0.0,
            "ratio_clip_min": 0.2,
            "ratio_clip_max": 0.28,
            "ratio_clip_c": 10.0,
            "token_level_loss": True,
            "use_importance_sampling_correction": True,
            "truncated_importance_sampling_type": "tis",
            "truncated_importance_sampling_ratio": 2.0,
        },
        "warm_start": {"enabled": False},
        "checkpointing": {"enabled": False, "export_final": False},
        "logger": {"log_dir": str(log_dir), "progress": False, "tensorboard_enabled": False},
    }


def summarize(records: list[dict], world_size: int, args) -> dict:
    """Rank 0's view (ranks are alike): the loop logs each phase's peak memory (step 1's generation
    peak also covers loading and the engine's copy)."""
    steps = [r for r in records if "timing/total_step" in r]
    phase_peaks = {
        phase: [r.get(f"memory/{phase}_peak_gib", 0.0) for r in steps] for phase in ("generation", "training", "weight_refresh")
    }
    phases = {phase: [r.get(f"timing/{phase}", 0.0) for r in steps] for phase in PHASES}
    steady = {phase: statistics.mean(values[1:] or values) for phase, values in phases.items()}
    generated = [r["train/num_generated_samples"] * r["train/mean_gen_tokens_per_sample"] for r in steps]
    return {
        "world_size": world_size,
        "workload": f"{args.prompts} prompts x {args.generations} generations x {args.new_tokens} new tokens",
        "step_seconds": phases["total_step"],
        "phase_seconds_per_step": phases,
        "steady_state_phase_seconds": steady,
        "generated_tokens_per_step": statistics.mean(generated),
        "generated_tok_per_s_per_gpu": statistics.mean(generated) / steady["generation"] / world_size,
        "step_tok_per_s_per_gpu": statistics.mean(generated) / steady["total_step"] / world_size,
        "peak_gib": max(max(values) for values in phase_peaks.values()),
        "phase_peak_gib_per_step": phase_peaks,
        "reserved_gib_after_step": [r.get("memory/weight_refresh_reserved_gib", 0.0) for r in steps],
        "token_mult_prob_error": [r.get("train/token_mult_prob_error") for r in steps],
    }


def _trl_child(queue, checkpoint: Path, output_dir: Path, options: dict) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from trl_grpo import run_trl_grpo  # noqa: PLC0415 (benchmark-only dependency)

    queue.put(run_trl_grpo(checkpoint, output_dir, **options))


def run_trl(checkpoint: Path, args) -> dict:
    """TRL's steps in a spawned process: its own CUDA context, so its peak memory is its own."""
    options = dict(prompts=args.prompts, generations=args.generations, new_tokens=args.new_tokens, micro_batch=args.micro_batch, steps=args.steps)
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_trl_child, args=(queue, checkpoint, args.workdir / "trl-run", options))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"TRL's run failed (exit code {child.exitcode}); its traceback is above")
    return queue.get()


def comparison(posttrain: dict, trl: dict) -> dict:
    """The issue's keys: steady-state steps (the first, which warms kernels, excluded) of both."""
    ours, theirs = posttrain["step_seconds"][1:], trl["step_seconds"][1:]
    phases = posttrain["steady_state_phase_seconds"]
    return {
        "posttrain_step_seconds": ours,
        "trl_step_seconds": theirs,
        "speedup": statistics.mean(theirs) / statistics.mean(ours),
        "posttrain_phase_seconds": {
            "generation": phases["generation"],
            "scoring": phases["scoring"],
            # one optimizer step per rollout batch: the old logprobs are the training forward's, detached
            "logprobs": 0.0,
            "training": phases["training"],
            "weight_refresh": phases["weight_refresh"],
        },
        "posttrain_peak_gib": posttrain["peak_gib"],
        "trl_peak_gib": trl["peak_gib"],
        "trl_version": trl["trl_version"],
        "trl_first_step_seconds": trl["step_seconds"][0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="e2b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/posttrain-dapo-bench"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per micro-batch, per process")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backend", default="auto", help="policy.generation.backend")
    parser.add_argument("--compile", action="store_true", help="policy.generation.compile (slow first step)")
    parser.add_argument("--compile-train", action="store_true", help="policy.compile: each decoder layer compiled for training")
    parser.add_argument("--baseline", type=Path, default=None, help="a one-process result to put beside this one")
    parser.add_argument("--images", action="store_true", help="the multimodal preset on rendered images (a VLM GRPO step)")
    parser.add_argument("--optimizer-offload", action="store_true", help="policy.optimizer_offload (E4B's fp32 AdamW state)")
    parser.add_argument(
        "--release-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="policy.generation.release_weights_during_training (default: the config's default)",
    )
    parser.add_argument("--trl", action="store_true", help="also TRL's GRPOTrainer on the same workload (one process)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    distributed = init_distributed()
    if args.trl and distributed.enabled:
        parser.error("--trl compares one process with one process: run it without torchrun")
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if args.trl and args.images:
        parser.error("--trl compares text steps; run --images without it")
    checkpoint = args.workdir / f"checkpoint-{args.preset}{'-images' if args.images else ''}"
    if distributed.is_main and not (checkpoint / "config.json").exists():
        build_checkpoint(args.preset, checkpoint, device, images=args.images)
    barrier(distributed)
    trl = run_trl(checkpoint, args) if args.trl else None
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    name = f"{args.preset}{'-images' if args.images else ''}-{distributed.world_size}proc"
    log_dir = args.workdir / f"run-{name}"
    recipe_path = args.workdir / f"recipe-{name}.yaml"
    if distributed.is_main:
        recipe_path.write_text(yaml.safe_dump(recipe(checkpoint, log_dir, args, on_gpu), sort_keys=False))
    barrier(distributed)
    cfg = load_config(recipe_path, RecipeConfig)
    run_grpo(cfg, console=Console(enabled=False), distributed=distributed)

    if not distributed.is_main:
        return
    result = summarize(read_metrics(log_dir), distributed.world_size, args)
    result.update(
        preset=args.preset,
        images=args.images,
        optimizer_offload=cfg.policy.optimizer_offload,
        release_weights_during_training=cfg.policy.generation.release_weights_during_training,
        gpu=torch.cuda.get_device_name() if on_gpu else "cpu",
        torch=torch.__version__,
        command=(f"torchrun --nproc-per-node {distributed.world_size} " if distributed.enabled else "python ")
        + "benchmarks/dapo_step.py "
        + " ".join(sys.argv[1:]),
    )
    if trl is not None:
        result = {**comparison(result, trl), **result, "trl": trl}
    if args.baseline is not None:
        result = {"this_run": result, "one_process": json.loads(args.baseline.read_text())}
    print(json.dumps(result, indent=1))
    gpu = result.get("gpu", result.get("this_run", {}).get("gpu", "cpu")).split()[-1].lower()
    suffix = (f"x{distributed.world_size}" if distributed.enabled else "") + ("-images" if args.images else "")
    out = args.out or Path(__file__).parent / "results" / f"dapo_step-{gpu}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
