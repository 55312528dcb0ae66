"""The VLM learning demo (recipes/vlm/vlm_grpo-gemma4-tiny-shapes.yaml) with several model seeds.

    python benchmarks/vlm_demo.py                       # seeds 0 1 2, one after another
    python benchmarks/vlm_demo.py --seeds 2 --merge     # add seed 2 to the committed result
    python benchmarks/vlm_demo.py --seeds 0 --timed     # one seed alone, kept apart as the timing run
    python benchmarks/vlm_demo.py --summarize RUN_DIR --seed 0 --wall-seconds 1158 --note "..."
        # a run made by hand (e.g. seeds run at once), added to the committed result

Each seed is `posttrain train RECIPE tiny_model.seed=S` (the tiny model's random init; data and
sampling seeds stay the recipe's), timed from the outside. Writes
benchmarks/results/vlm_demo-cpu.json: per seed, held-out accuracy at each validation step, its gain
in points over the run, the train reward per step, the wall time and how the run was made.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

RECIPE = "recipes/vlm/vlm_grpo-gemma4-tiny-shapes.yaml"
OUT = Path(__file__).resolve().parent / "results" / "vlm_demo-cpu.json"


def summarize(run_dir: Path) -> dict:
    """Validation accuracy by step, its gain in points and the train reward by step, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["step"]: r["validation/accuracy"] for r in records if "validation/accuracy" in r}
    first, last = accuracy[min(accuracy)], accuracy[max(accuracy)]
    return {
        "validation_prompts": int(records[0]["data/validation_prompts"]),
        "validation_accuracy": accuracy,
        "start_accuracy": round(first, 4),
        "end_accuracy": round(last, 4),
        "gain_points": round(100 * (last - first), 1),
        "train_reward_by_step": {r["step"]: round(r["train/reward"], 4) for r in records if "train/reward" in r},
    }


def run_seed(seed: int, workdir: Path) -> dict:
    run_dir = workdir / f"seed{seed}"
    command = ["posttrain", "train", RECIPE, f"tiny_model.seed={seed}", f"logger.log_dir={run_dir}", "checkpointing.enabled=false"]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "posttrain.cli.main", *command[1:]], check=True)
    wall = time.perf_counter() - start
    return {"command": " ".join(command), "wall_seconds": round(wall, 1), "how": "alone on the machine", **summarize(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/vlm_demo"))
    parser.add_argument("--merge", action="store_true", help="keep the committed result's other seeds")
    parser.add_argument("--timed", action="store_true", help="run the first of --seeds alone and keep it as `timed_alone`, the seeds untouched")
    parser.add_argument("--summarize", type=Path, default=None, help="a finished run directory to add instead of running")
    parser.add_argument("--seed", type=int, default=None, help="with --summarize: that run's tiny_model.seed")
    parser.add_argument("--wall-seconds", type=float, default=None, help="with --summarize: its wall time")
    parser.add_argument("--note", default="", help="with --summarize: how it was run")
    args = parser.parse_args()

    result = json.loads(OUT.read_text()) if (args.merge or args.summarize or args.timed) and OUT.exists() else {}
    seeds = result.get("seeds", {})
    timed = result.get("timed_alone")
    if args.timed:
        timed = {"seed": args.seeds[0], **run_seed(args.seeds[0], args.workdir)}
    elif args.summarize is not None:
        run = {"command": f"posttrain train {RECIPE} tiny_model.seed={args.seed} ...", "wall_seconds": args.wall_seconds, "how": args.note}
        seeds[str(args.seed)] = {**run, **summarize(args.summarize)}
    else:
        for seed in args.seeds:
            seeds[str(seed)] = run_seed(seed, args.workdir)
    result = {
        "recipe": RECIPE,
        "machine": f"{os.cpu_count()}-core development machine (CPU), torch {torch.__version__}, transformers {transformers.__version__}",
        "platform": platform.platform(),
        "seeds": dict(sorted(seeds.items())),
        **({"timed_alone": timed} if timed else {}),
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for seed, run in result["seeds"].items():
        print(f"seed {seed}: {run['start_accuracy']:.3f} -> {run['end_accuracy']:.3f} ({run['gain_points']:+.1f} points), {run['wall_seconds']} s")


if __name__ == "__main__":
    main()
