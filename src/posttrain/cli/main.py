"""The `posttrain` command: quickstart, train, validate, export, check, report, compare, plan."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from posttrain.config.loader import ConfigError, dump_config, load_config
from posttrain.config.schema import RecipeConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
QUICKSTART_RECIPE = RECIPES_DIR / "quickstart.yaml"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="posttrain", description="RL post-training (GRPO, DAPO; SFT, DPO) for Gemma 4 and friends.")
    commands = root.add_subparsers(dest="command", required=True)

    quick = commands.add_parser("quickstart", help="Tiny Gemma 4, warm start, then DAPO on max(a, b) problems: CPU, no downloads.")
    quick.add_argument("--out", help="Run directory (default: ./runs/quickstart-<time>).")
    quick.add_argument("overrides", nargs="*", help="Dotted overrides, e.g. grpo.max_num_steps=10.")

    for name, text in [("train", "Run a recipe (resumes from its latest checkpoint)."), ("validate", "Load, validate and print a recipe.")]:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("recipe", help="Path to a YAML recipe.")
        sub.add_argument("overrides", nargs="*", help="Dotted overrides key.path=value (values parsed as YAML).")

    export = commands.add_parser("export", help="Write a run's checkpoint as a Hugging Face model directory.")
    export.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT", help="A run directory (its latest checkpoint) or a checkpoints/step_<n>.")
    export.add_argument("--out", required=True, help="Output directory (must not exist, or be empty).")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="Weight dtype (default: the fp32 masters).")

    check = commands.add_parser("check", help="Evaluate a run's metric gates (its recipe's `gates`) over its metrics.jsonl.")
    check.add_argument("run_dir", metavar="RUN_DIR", help="A run directory (config.yaml, metrics.jsonl).")
    check.add_argument("--gate", action="append", default=[], help="Another gate, e.g. 'median(train/token_mult_prob_error) < 1.05'.")

    report = commands.add_parser("report", help="Plot a run's metrics (PNGs) and write a one-page summary.md.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="A run directory (metrics.jsonl, config.yaml).")
    report.add_argument("--out", help="Output directory (default: RUN_DIR/report).")

    compare = commands.add_parser("compare", help="Overlay two runs' metrics (PNGs) and write compare.md.")
    compare.add_argument("run_a", metavar="RUN_A", help="A run directory.")
    compare.add_argument("run_b", metavar="RUN_B", help="Another run directory.")
    compare.add_argument("--out", help="Output directory (default: ./compare-<RUN_A>-vs-<RUN_B>).")

    plan = commands.add_parser("plan", help="Estimate a recipe's GPU memory per GPU and the fewest GPUs that fit.")
    plan.add_argument("recipe", help="Path to a YAML recipe.")
    plan.add_argument("overrides", nargs="*", help="Dotted overrides key.path=value.")
    plan.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: 1).")
    plan.add_argument("--gpu", choices=["h200", "h100"], default="h200", help="GPU model (default: h200).")
    plan.add_argument("--preset", default=None, help="A released Gemma 4 shape (e2b, e4b, 26b-a4b, 31b) instead of the recipe's checkpoint.")
    return root


def load(recipe: str | Path, overrides: list[str]) -> RecipeConfig:
    return load_config(recipe, RecipeConfig, overrides)


def run(cfg: RecipeConfig) -> int:
    # Imported here so that `posttrain validate` stays fast and torch-free.
    from transformers.utils import logging as transformers_logging

    from posttrain.algorithms.dynamic_sampling import DynamicSamplingExhausted
    from posttrain.checkpoint.store import CheckpointOptimizerMismatchError
    from posttrain.data.sources import DataError
    from posttrain.loops.dpo import NotADPOCheckpointError, run_dpo
    from posttrain.loops.grpo import DistributedRecipeError, run_grpo
    from posttrain.loops.sft import NotAnSFTCheckpointError, run_sft
    from posttrain.metrics.console import Console
    from posttrain.metrics.sinks import LoggerPackageError
    from posttrain.models.freezing import FreezeConfigError
    from posttrain.models.loading import CheckpointMismatchError, CheckpointNotFoundError, RemoteCodeError
    from posttrain.training.trainer import MasterWeightsError, NonFiniteTrainingError

    transformers_logging.disable_progress_bar()  # posttrain shows its own progress
    is_main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    console = Console(enabled=is_main_rank, live=cfg.logger.progress)  # live bars on a terminal only
    warning = unfit_warning(cfg)
    if warning and is_main_rank:
        print(f"warning: {warning}", file=sys.stderr)
    start = time.perf_counter()
    try:
        result = {"grpo": run_grpo, "sft": run_sft, "dpo": run_dpo}[cfg.algorithm](cfg, console=console)
    except (
        DataError,
        CheckpointMismatchError,
        CheckpointNotFoundError,
        RemoteCodeError,
        CheckpointOptimizerMismatchError,
        FreezeConfigError,
        MasterWeightsError,
        DynamicSamplingExhausted,
        NonFiniteTrainingError,
        DistributedRecipeError,
        NotAnSFTCheckpointError,
        NotADPOCheckpointError,
        LoggerPackageError,
    ) as error:
        # Problems with the user's data, checkpoint or settings: the message says what to do, a
        # traceback would only bury it. Checkpoints written so far stay usable for a resume.
        console.stop_progress()
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    losses = getattr(result, "validation_loss", None)  # SFT
    if losses:
        first, last = min(losses), max(losses)
        console.note(f"validation/loss: {losses[first]:.3f} at step {first} -> {losses[last]:.3f} at step {last}")
    preference = getattr(result, "validation_preference_accuracy", None)  # DPO
    if preference:
        first, last = min(preference), max(preference)
        console.note(f"validation/rewards/accuracy: {preference[first]:.3f} at step {first} -> {preference[last]:.3f} at step {last}")
    accuracy = getattr(result, "validation_accuracy", None)
    if accuracy:
        first, last = min(accuracy), max(accuracy)
        console.note(
            f"validation/accuracy: {accuracy[first]:.3f} at step {first} -> {accuracy[last]:.3f} at step {last} "
            f"({(accuracy[last] - accuracy[first]) * 100:+.1f} points)"
        )
    final = ", final_model/" if cfg.checkpointing.export_final else ""
    console.note(f"done in {elapsed:.0f} s; run directory: {result.log_dir} (metrics.jsonl, tensorboard/, checkpoints/{final})")
    return 0


def unfit_warning(cfg: RecipeConfig) -> str | None:
    """The memory planner's warning when the recipe will not fit the GPUs it launches on (CUDA only)."""
    import torch

    if cfg.policy.device == "cpu" or not torch.cuda.is_available():
        return None
    from posttrain.planning.memory import warn_if_unfit

    try:
        return warn_if_unfit(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except Exception as error:  # noqa: BLE001 (an estimate that fails must never stop a run)
        return f"the memory planner could not estimate this recipe ({type(error).__name__}: {error})"


def export(path: str, out: str, dtype: str) -> int:
    from posttrain.checkpoint.export import ExportError, export_run
    from posttrain.models.loading import CheckpointMismatchError, CheckpointNotFoundError, RemoteCodeError

    try:
        checkpoint, out_dir = export_run(path, out, dtype=dtype)
    except (ConfigError, ExportError, CheckpointMismatchError, CheckpointNotFoundError, RemoteCodeError) as error:
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"exported {checkpoint} to {out_dir} ({dtype})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "export":
        return export(args.path, args.out, args.dtype)
    if args.command == "check":
        from posttrain.metrics.gates import check_run

        return check_run(args.run_dir, args.gate)
    if args.command == "report":
        from posttrain.metrics.report import report_run

        return report_run(args.run_dir, args.out)
    if args.command == "compare":
        from posttrain.metrics.report import compare_runs

        return compare_runs(args.run_a, args.run_b, args.out)
    if args.command == "plan":
        from posttrain.planning.memory import plan_command

        try:
            return plan_command(args.recipe, args.overrides, gpus=args.gpus, gpu=args.gpu, preset=args.preset)
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        if args.command == "quickstart":
            out = args.out or f"runs/quickstart-{datetime.now():%Y%m%d-%H%M%S}"
            cfg = load(QUICKSTART_RECIPE, [*args.overrides, f"logger.log_dir={out}"])
            return run(cfg)
        cfg = load(args.recipe, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.command == "validate":
        from posttrain.metrics.sinks import LoggerPackageError, check_logger_packages

        print(dump_config(cfg), end="")
        print(f"# {args.recipe}: valid", file=sys.stderr)
        try:
            check_logger_packages(cfg.logger)
        except LoggerPackageError as error:  # the recipe is valid; this machine cannot run it as it is
            print(f"# warning: {error}", file=sys.stderr)
        return 0
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
