"""The memory planner (`posttrain plan`) against the peaks measured on the device.

    python benchmarks/plan_vs_measured.py

For each committed `dapo_step.py` run on one H200 (E2B preset, random init), rebuild the run's
recipe exactly as `dapo_step.py` did, plan it with the E2B preset's config, and compare the
training and generation phase peaks with the measured ones (max over steady-state steps; step 1's
generation peak also covers loading). Writes benchmarks/results/plan_vs_measured-h200.json. The
runs were measured at the commits named in their files; the planner models the code as it is now.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dapo_step import recipe

from posttrain.config import RecipeConfig
from posttrain.config.loader import validate_config
from posttrain.models.gemma4_presets import gemma4_preset_config
from posttrain.planning.memory import plan_memory

RESULTS = Path(__file__).resolve().parent / "results"


def measured_runs() -> list[tuple[str, dict, dict]]:
    """(name, dapo_step.py options, the run's result) of every committed one-GPU E2B run."""
    development = json.loads((RESULTS / "dapo_step-h200-development.json").read_text())["runs"]
    runs = [(name, {"micro_batch": int(name.rsplit("-", 1)[1])}, run["result"]) for name, run in development.items() if "micro-batch" in name]
    runs += [(name, {"release_weights": True}, run["result"]) for name, run in development.items() if name.endswith("release-weights")]
    latest = json.loads((RESULTS / "dapo_step-h200.json").read_text())
    runs.append((latest["commit"], {"release_weights": latest["release_weights_during_training"]}, latest))
    return runs


def options(**changes) -> argparse.Namespace:
    defaults = dict(prompts=8, generations=8, new_tokens=256, micro_batch=16, steps=4, backend="auto", compile=False,
                    compile_train=False, images=False, optimizer_offload=False, release_weights=False)  # fmt: skip
    return argparse.Namespace(**{**defaults, **changes})


def main() -> None:
    config = gemma4_preset_config("e2b", text_only=True)
    rows = []
    for name, changes, result in measured_runs():
        cfg = validate_config(recipe(Path("/nonexistent/e2b"), Path("/tmp/plan"), options(**changes), on_gpu=True), RecipeConfig)
        plan = plan_memory(cfg, gpus=1, model_config=config)
        peaks = result["phase_peak_gib_per_step"]
        measured = {"training": max(peaks["training"][1:]), "generation": max(peaks["generation"][1:])}
        predicted = {"training": plan.training_peak, "generation": plan.generation_peak}
        rows.append({
            "run": name,
            "options": changes,
            "measured_gib": measured,
            "predicted_gib": predicted,
            "error": {phase: predicted[phase] / measured[phase] - 1 for phase in measured},
        })  # fmt: skip
        print(f"{name:34s} training {predicted['training']:6.2f} vs {measured['training']:6.2f}  generation {predicted['generation']:6.2f} vs {measured['generation']:6.2f}")
    out = RESULTS / "plan_vs_measured-h200.json"
    out.write_text(json.dumps({"command": "python benchmarks/plan_vs_measured.py", "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
