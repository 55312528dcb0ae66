"""The memory planner (`posttrain plan`) against the peaks measured on the device.

    python benchmarks/plan_vs_measured.py

For each committed `dapo_step.py` run on one H200 (E2B preset, and the E4B image step with
optimizer offload; random init), rebuild the run's recipe exactly as `dapo_step.py` did, plan it
with the preset's config, and compare the training and generation phase peaks with the measured
ones (max over steady-state steps; step 1's generation peak also covers loading). The one-GPU twins
run by their launchers (benchmarks/results/gpu1_twins-h200/) are planned from their recipe files
and compared over their steps after the first. Writes benchmarks/results/plan_vs_measured-h200.json.
The runs were measured at the commits named in their files; the planner models the code as it is now.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dapo_step import recipe

from posttrain.config import RecipeConfig, load_config
from posttrain.config.loader import validate_config
from posttrain.models.gemma4_presets import gemma4_preset_config
from posttrain.planning.memory import plan_memory

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PHASE_KEYS = {"training": "memory/training_peak_gib", "generation": "memory/generation_peak_gib"}


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


def comparison(name: str, changes: dict, measured: dict[str, float], plan) -> dict:
    predicted = {phase: {"training": plan.training_peak, "generation": plan.generation_peak}[phase] for phase in measured}
    print(f"{name:34s} " + "  ".join(f"{phase} {predicted[phase]:6.2f} vs {measured[phase]:6.2f}" for phase in measured))
    return {
        "run": name,
        "options": changes,
        "measured_gib": measured,
        "predicted_gib": predicted,
        "error": {phase: predicted[phase] / measured[phase] - 1 for phase in measured},
    }


def dapo_step_rows() -> list[dict]:
    rows = []
    e2b = gemma4_preset_config("e2b", text_only=True)
    for name, changes, result in measured_runs():
        cfg = validate_config(recipe(Path("/nonexistent/e2b"), Path("/tmp/plan"), options(**changes), on_gpu=True), RecipeConfig)
        peaks = result["phase_peak_gib_per_step"]
        measured = {"training": max(peaks["training"][1:]), "generation": max(peaks["generation"][1:])}
        rows.append(comparison(name, changes, measured, plan_memory(cfg, gpus=1, model_config=e2b)))
    images = json.loads((RESULTS / "dapo_step-h200-images.json").read_text())
    changes = {"images": True, "optimizer_offload": True, "release_weights": images["release_weights_during_training"]}
    cfg = validate_config(recipe(Path("/nonexistent/e4b"), Path("/tmp/plan"), options(**changes), on_gpu=True), RecipeConfig)
    peaks = images["phase_peak_gib_per_step"]
    measured = {"training": max(peaks["training"][1:]), "generation": max(peaks["generation"][1:])}
    e4b = gemma4_preset_config("e4b", text_only=False)
    rows.append(comparison(f"e4b-images-{images['commit']}", changes, measured, plan_memory(cfg, gpus=1, model_config=e4b)))
    return rows


def twin_rows() -> list[dict]:
    twins = json.loads((RESULTS / "gpu1_twins-h200.json").read_text())
    rows = []
    for name in twins["twins"]:
        records = [json.loads(line) for line in (RESULTS / "gpu1_twins-h200" / name / "metrics.jsonl").read_text().splitlines()]
        steps = [record for record in records if record["step"] >= 2]
        measured = {phase: max(r[key] for r in steps if key in r) for phase, key in PHASE_KEYS.items() if key in steps[0]}
        cfg = load_config(RECIPES / "gpu1" / f"{name}.yaml", RecipeConfig)
        rows.append(comparison(f"{name}-{twins['commit']}", {"recipe": f"recipes/gpu1/{name}.yaml"}, measured, plan_memory(cfg, gpus=1)))
    return rows


def main() -> None:
    rows = dapo_step_rows() + twin_rows()
    out = RESULTS / "plan_vs_measured-h200.json"
    out.write_text(json.dumps({"command": "python benchmarks/plan_vs_measured.py", "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
