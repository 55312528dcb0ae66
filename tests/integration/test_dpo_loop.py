"""The DPO loop end to end on the tiny twin (recipes/tiny/dpo-gemma4-e2b-it-tiny.yaml) through
`posttrain train`: held-out preference accuracy rises from chance, the recipe's gates pass, and a
resumed run restores the reference logprobs and takes the uninterrupted run's steps exactly."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.checkpoint.store import MODEL_FILE
from posttrain.cli.main import main
from posttrain.config import RecipeConfig, load_config
from posttrain.data.sources import DataError
from posttrain.loops.dpo import run_dpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics

pytestmark = pytest.mark.integration

TWIN = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "dpo-gemma4-e2b-it-tiny.yaml"


def test_tiny_twin_learns_the_preferences_through_posttrain_train(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(TWIN), f"logger.log_dir={run_dir}", "logger.tensorboard_enabled=false", "logger.progress=false"]) == 0
    records = read_metrics(run_dir)
    assert json.loads((run_dir / "environment.json").read_text())["world_size"] == 1
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the initial policy
    for key in ("train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen", "train/grad_norm", "timing/training"):
        assert all(key in r for r in train), key
    assert sum(r["train/loss"] for r in train[-10:]) / 10 < 0.6
    assert records[0]["data/train_pairs"] == 2000 and records[0]["timing/reference_logprobs"] > 0
    accuracy = {r["step"]: r["validation/rewards/accuracy"] for r in records if "validation/rewards/accuracy" in r}
    assert sorted(accuracy) == [0, 20, 40, 60]
    assert accuracy[0] == 0.5 and records[0]["validation/rewards/margin"] == 0.0  # every margin exactly 0 at the start
    assert accuracy[60] > 0.8  # measured 0.85 (128 held-out pairs the policy never trained on)
    assert records[-1]["validation/rewards/margin"] > 0 and records[-1]["validation/rewards/chosen"] > records[-1]["validation/rewards/rejected"]
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 0, capsys.readouterr().out


def _config(run_dir: Path, *overrides: str) -> RecipeConfig:
    small = ("data.train.size=200", "data.validation.size=32", "dpo.max_num_steps=6", "dpo.val_period=3",
             "checkpointing.enabled=true", "checkpointing.save_period=3", "checkpointing.keep_top_k=null")  # fmt: skip
    return load_config(TWIN, RecipeConfig, [f"logger.log_dir={run_dir}", "logger.tensorboard_enabled=false", *small, *overrides])


def test_resumed_run_restores_the_reference_and_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints at steps 3 and 6; the step-6 checkpoint is removed and the run restarted: it
    resumes at step 3 with the reference logprobs the checkpoint stored (the weights have moved
    since), and its steps 4-6 give the same weights bit for bit and the same logged metrics. A
    restart over other data is refused: those logprobs belong to other pairs."""
    run_dir = tmp_path / "run"
    run_dpo(_config(run_dir, "checkpointing.export_final=true"), console=Console(enabled=False))
    checkpoints = run_dir / "checkpoints"
    uninterrupted = load_file(checkpoints / "step_6" / MODEL_FILE)
    logged = {r["step"]: r for r in read_metrics(run_dir)}
    assert (run_dir / "final_model" / "config.json").is_file()

    shutil.rmtree(checkpoints / "step_6")
    result = run_dpo(_config(run_dir), console=Console(enabled=False))
    resumed = load_file(checkpoints / "step_6" / MODEL_FILE)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        assert (tensor == uninterrupted[name]).all(), name
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    for record in records[4:]:
        for key in ("train/loss", "train/rewards/margin", "train/rewards/accuracy"):
            assert record[key] == logged[record["step"]][key], (record["step"], key)
    assert records[-1]["validation/rewards/margin"] == logged[6]["validation/rewards/margin"]
    assert sorted(result.validation_preference_accuracy) == [6]  # this attempt validated only its own steps

    with pytest.raises(DataError, match="reference logprobs were computed for other preference pairs"):
        run_dpo(_config(run_dir, "data.train.seed=1"), console=Console(enabled=False))
