"""The SFT loop end to end on the tiny twin (recipes/tiny/sft-gemma4-e2b-it-tiny.yaml): the loss
falls, validation/loss is logged and falls, the recipe's gates pass, and a resumed run takes the
uninterrupted run's steps exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from posttrain.checkpoint.store import MODEL_FILE
from posttrain.config import RecipeConfig, load_config
from posttrain.loops.sft import run_sft
from posttrain.metrics.console import Console
from posttrain.metrics.gates import check_run
from posttrain.metrics.logger import read_metrics

pytestmark = pytest.mark.integration

TWIN = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "sft-gemma4-e2b-it-tiny.yaml"


def _config(run_dir: Path, *overrides: str) -> RecipeConfig:
    return load_config(TWIN, RecipeConfig, [f"logger.log_dir={run_dir}", "logger.tensorboard_enabled=false", *overrides])


def test_tiny_twin_learns_and_passes_its_gates(tmp_path, capsys):
    result = run_sft(_config(tmp_path / "run"), console=Console(enabled=False))
    records = read_metrics(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["world_size"] == 1
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    losses = [r["train/loss"] for r in train]
    # random init scores ~ln(326) = 5.8 nats per token; the first five steps are warm-up
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    for key in ("train/grad_norm", "train/lr", "train/supervised_tokens", "timing/training"):
        assert all(key in r for r in train), key
    assert all(r["train/supervised_tokens"] > 0 for r in train)
    assert records[0]["data/train_conversations"] == 2000 and records[0]["data/dropped_long_conversations"] == 0
    assert sorted(result.validation_loss) == [0, 20, 40, 60]
    assert result.validation_loss[60] < result.validation_loss[0] - 2.0
    assert [r["validation/loss"] for r in records if "validation/loss" in r] == list(result.validation_loss.values())
    capsys.readouterr()
    assert check_run(tmp_path / "run") == 0, capsys.readouterr().out


def test_resumed_run_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints at steps 3 and 6; the step-6 checkpoint is removed and the run restarted: it
    resumes at step 3 and its steps 4-6 give the same weights, bit for bit (no randomness in a
    step), and the same logged losses, each step once. The final export is written."""
    run_dir = tmp_path / "run"
    overrides = ("sft.max_num_steps=6", "sft.val_period=3", "checkpointing.enabled=true", "checkpointing.save_period=3",
                 "checkpointing.keep_top_k=null", "checkpointing.export_final=true")  # fmt: skip
    run_sft(_config(run_dir, *overrides), console=Console(enabled=False))
    checkpoints = run_dir / "checkpoints"
    uninterrupted = load_file(checkpoints / "step_6" / MODEL_FILE)
    losses = {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
    assert (run_dir / "final_model" / "config.json").is_file()

    shutil.rmtree(checkpoints / "step_6")
    result = run_sft(_config(run_dir, *overrides), console=Console(enabled=False))
    resumed = load_file(checkpoints / "step_6" / MODEL_FILE)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        assert (tensor == uninterrupted[name]).all(), name
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 6]
    assert {r["step"]: r["train/loss"] for r in records if "train/loss" in r} == losses
    assert sorted(result.validation_loss) == [6]  # this attempt validated only its own steps

