"""The loggers wired into a real run: a tiny GRPO run with W&B (offline) and MLflow (file store)
logs what metrics.jsonl holds, sample generations every N steps, and environment.json (SFT and DPO
runs write it too: tests/integration/test_sft_loop.py, test_dpo_loop.py)."""

from __future__ import annotations

import json

import pytest

from posttrain.cli.main import RECIPES_DIR, main
from posttrain.metrics.logger import read_metrics, read_samples

pytestmark = pytest.mark.integration


def test_grpo_run_logs_to_wandb_mlflow_and_samples(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: any network use would fail
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the run sets it too; kept test-local here
    out = tmp_path / "grpo"
    overrides = [
        f"logger.log_dir={out}",
        "logger.progress=false",
        "logger.tensorboard_enabled=false",
        "logger.wandb.enabled=true",
        "logger.mlflow.enabled=true",
        "logger.sample_generations.period=2",
        "logger.sample_generations.count=3",
        "warm_start.num_steps=2",
        "grpo.max_num_steps=4",
        "checkpointing.enabled=false",
        "checkpointing.export_final=false",
    ]
    assert main(["train", str(RECIPES_DIR / "tiny" / "grpo-gemma4-tiny.yaml"), *overrides]) == 0

    records = {r["step"]: r for r in read_metrics(out) if "train/reward" in r}
    assert sorted(records) == [1, 2, 3, 4]
    samples = read_samples(out)
    assert [s["step"] for s in samples] == [2, 2, 2, 4, 4, 4]
    assert all(s["prompt"] and isinstance(s["reward"], float) and s["group"] == 0 for s in samples)

    environment = json.loads((out / "environment.json").read_text())
    assert environment["world_size"] == 1 and environment["packages"]["wandb"] and environment["packages"]["mlflow-skinny"]

    from mlflow.tracking import MlflowClient

    state = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(state["tracking_uri"])
    history = {m.step: m.value for m in client.get_metric_history(state["run_id"], "train/reward")}
    assert history == {step: pytest.approx(r["train/reward"]) for step, r in records.items()}
    assert {a.path for a in client.list_artifacts(state["run_id"], "samples")} == {"samples/step_000002.json", "samples/step_000004.json"}
    assert client.get_run(state["run_id"]).data.params["grpo.max_num_steps"] == "4"

    run_id = json.loads((out / "wandb_run.json").read_text())["id"]
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))

