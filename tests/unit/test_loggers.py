"""The loggers behind MetricsLogger record exactly the values and steps given (read back from each
one's files), resume without doubling steps, and a missing package fails with the pip extra.

W&B runs offline and MLflow on its local file store: no account, no server, no network."""

from __future__ import annotations

import glob
import json
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch

from posttrain.config.schema import LoggerConfig, MLflowConfig, WandbConfig
from posttrain.metrics.logger import MetricsLogger, read_metrics, read_samples
from posttrain.metrics.run_info import git_state, write_run_info
from posttrain.metrics.samples import rollout_samples
from posttrain.metrics.sinks import LoggerPackageError, check_logger_packages, flatten, mlflow_name

pytestmark = pytest.mark.unit

RUN_CONFIG = {"algorithm": "grpo", "policy": {"optimizer": {"lr": 1e-6, "betas": [0.9, 0.999]}, "model_name": None}}


def sample(step: int, reward: float) -> dict:
    return {
        "step": step,
        "group": 0,
        "prompt": "2 + 2 =",
        "response": f"answer | {reward}",
        "reward": reward,
        "shaped_reward": reward,
        "response_tokens": 3,
        "truncated": False,
    }


def log_steps(logger: MetricsLogger, steps) -> None:
    for step in steps:
        logger.log(step, {"train/reward": step / 10, "timing/total_step": 1.0 + step})
        logger.log_samples(step, [sample(step, step / 10)])


# ------------------------------------------------------------------------------------ JSONL


def test_samples_jsonl_is_truncated_with_the_metrics_on_a_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.start(-1)
    log_steps(logger, range(1, 5))
    assert [s["step"] for s in read_samples(tmp_path)] == [1, 2, 3, 4]
    assert read_samples(tmp_path)[1] == sample(2, 0.2)
    logger.close()

    resumed = MetricsLogger(tmp_path)
    resumed.start(2)  # the checkpoint of step 2: steps 3 and 4 are redone
    assert [s["step"] for s in read_samples(tmp_path)] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_optional_loggers_open_in_start(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    with pytest.raises(RuntimeError, match="start"):
        logger.log(1, {"train/reward": 0.0})


# ------------------------------------------------------------------------------ TensorBoard


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def test_tensorboard_records_values_and_hides_redone_steps_after_a_resume(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True)
    logger.start(-1)
    log_steps(logger, range(1, 5))
    logger.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True)
    resumed.start(2)
    resumed.log(3, {"train/reward": 3.5})  # a redone step with another value
    resumed.close()
    assert tensorboard_scalars(tmp_path, "train/reward") == [(1, 0.1), (2, 0.2), (3, 3.5)]

    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text = events.Tensors("samples/text_summary")
    assert [e.step for e in text] == [1, 2]  # samples of steps 3 and 4 were purged with the resume
    assert "answer \\| 0.2" in text[1].tensor_proto.string_val[0].decode()


# ------------------------------------------------------------------------------------- W&B


def wandb_history(wandb_dir: Path) -> dict[int, dict]:
    """The history rows of every offline run file under `wandb_dir` (LevelDB log records of W&B's
    Record protobuf, after a 7-byte W&B header), by step; a step seen twice fails."""
    from wandb.proto import wandb_internal_pb2

    rows: dict[int, dict] = {}
    for path in sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, pending, block = Path(path).read_bytes(), 7, b"", 32768
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                break
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a FULL record, or the LAST piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                    assert row["_step"] not in rows, f"step {row['_step']} logged twice"
                    rows[row["_step"]] = row
    return rows


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path_factory):
    pytest.importorskip("wandb")
    home = tmp_path_factory.mktemp("wandb-home")  # W&B's own cache, data and settings: not the user's
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: any network use would fail
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_records_values_config_samples_and_resumes_the_same_run(tmp_path, offline_wandb):
    cfg = WandbConfig(enabled=True, project="unit")
    logger = MetricsLogger(tmp_path, wandb=cfg, run_config=RUN_CONFIG)
    logger.start(-1)
    log_steps(logger, range(1, 5))
    logger.close()
    run_id = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    wait_for_the_next_second(tmp_path)

    resumed = MetricsLogger(tmp_path, wandb=cfg, run_config=RUN_CONFIG)
    resumed.start(2)  # steps 3 and 4 are redone: W&B has them already, step 5 is new
    log_steps(resumed, range(3, 6))
    resumed.close()

    assert json.loads((tmp_path / "wandb_run.json").read_text())["id"] == run_id
    runs = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(run.endswith(f"-{run_id}") for run in runs)  # one W&B run, two sessions
    history = wandb_history(tmp_path)
    assert sorted(history) == [1, 2, 3, 4, 5]
    assert {step: history[step]["train/reward"] for step in history} == {s: pytest.approx(s / 10) for s in range(1, 6)}
    assert history[5]["samples/_type"] == "table-file" and history[5]["samples/nrows"] == 1
    table = json.loads(next((Path(runs[1]) / "files" / "media" / "table").glob("samples_5_*.table.json")).read_text())
    assert table["columns"][:4] == ["step", "group", "prompt", "response"] and table["data"][0][4] == pytest.approx(0.5)


def wait_for_the_next_second(log_dir: Path) -> None:
    """W&B names an offline session offline-run-<local time to the second>-<run id>: a second session
    of the same run within the same second would take the first one's folder."""
    stamp = Path(glob.glob(str(log_dir / "wandb" / "offline-run-*"))[0]).name.split("-")[2]
    while time.strftime("%Y%m%d_%H%M%S") <= stamp:
        time.sleep(0.05)


def test_a_restart_without_a_checkpoint_is_a_new_wandb_run(tmp_path, offline_wandb):
    cfg = WandbConfig(enabled=True, project="unit")
    for _ in range(2):
        logger = MetricsLogger(tmp_path, wandb=cfg)
        logger.start(-1)
        logger.log(1, {"train/reward": 0.5})
        logger.close()
    assert len({Path(run).name.rsplit("-", 1)[1] for run in glob.glob(str(tmp_path / "wandb" / "offline-run-*"))}) == 2


# ----------------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_client(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what MLflowSink sets for a file store, kept test-local
    from mlflow.tracking import MlflowClient

    return MlflowClient


def test_mlflow_file_store_records_values_params_samples_and_resumes_the_same_run(tmp_path, mlflow_client):
    cfg = MLflowConfig(enabled=True, experiment_name="unit")
    (tmp_path / "config.yaml").write_text("algorithm: grpo\n")
    logger = MetricsLogger(tmp_path, mlflow=cfg, run_config=RUN_CONFIG)
    logger.start(-1)
    log_steps(logger, range(1, 5))
    logger.log(4, {"memory/peak (GiB)": 2.5, "train/loss": float("nan")})
    logger.close()

    resumed = MetricsLogger(tmp_path, mlflow=cfg, run_config=RUN_CONFIG)
    resumed.start(2)
    log_steps(resumed, range(3, 6))
    resumed.close()

    state = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert state["tracking_uri"] == (tmp_path / "mlruns").as_uri()
    client = mlflow_client(state["tracking_uri"])
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    history = [(m.step, m.value) for m in client.get_metric_history(state["run_id"], "train/reward")]
    assert sorted(history) == [(s, pytest.approx(s / 10)) for s in range(1, 6)]  # each step once
    assert [m.value for m in client.get_metric_history(state["run_id"], "memory/peak _GiB_")] == [2.5]
    assert [str(m.value) for m in client.get_metric_history(state["run_id"], "train/loss")] == ["nan"]
    assert run.data.params["policy.optimizer.lr"] == "1e-06" and run.data.params["policy.optimizer.betas"] == "[0.9, 0.999]"
    artifacts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"config.yaml", "samples"} <= artifacts
    samples_file = client.download_artifacts(state["run_id"], "samples/step_000005.json", str(tmp_path / "dl"))
    assert json.loads(Path(samples_file).read_text()) == [sample(5, 0.5)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_an_exception_marks_the_mlflow_run_failed(tmp_path, mlflow_client):
    logger = MetricsLogger(tmp_path, mlflow=MLflowConfig(enabled=True))
    logger.start(-1)
    with pytest.raises(ZeroDivisionError):
        try:
            logger.log(1, {"train/reward": 1 / 0})
        finally:
            logger.close()
    state = json.loads((tmp_path / "mlflow_run.json").read_text())
    assert mlflow_client(state["tracking_uri"]).get_run(state["run_id"]).info.status == "FAILED"


def test_names_and_params_for_mlflow():
    assert mlflow_name("train/reward") == "train/reward"
    assert mlflow_name("memory/peak (GiB)%") == "memory/peak _GiB__"
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1, 2]}) == {"a.b": 1, "a.c": {}, "d": [1, 2]}


# --------------------------------------------------------------------------- missing packages


def test_a_missing_logger_package_names_the_pip_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "mlflow") else real(name, *a))
    cfg = LoggerConfig(wandb={"enabled": True}, mlflow={"enabled": True})
    with pytest.raises(LoggerPackageError) as error:
        check_logger_packages(cfg)
    assert 'pip install "posttrain[wandb]"' in str(error.value) and 'pip install "posttrain[mlflow]"' in str(error.value)
    assert "logger.wandb.enabled" in str(error.value)
    check_logger_packages(LoggerConfig())  # nothing enabled: nothing needed

    from posttrain.cli.main import QUICKSTART_RECIPE, main

    assert main(["validate", str(QUICKSTART_RECIPE), "logger.wandb.enabled=true"]) == 0  # valid, with a warning
    assert 'warning: logger.wandb.enabled is true but the wandb package is not installed: pip install "posttrain[wandb]"' in capsys.readouterr().err

    run_dir = tmp_path / "run"  # train stops before any work: no data loaded, no model built
    assert main(["train", str(QUICKSTART_RECIPE), f"logger.log_dir={run_dir}", "logger.mlflow.enabled=true"]) == 1
    assert 'LoggerPackageError: logger.mlflow.enabled is true but the mlflow package is not installed: pip install "posttrain[mlflow]"' in capsys.readouterr().err
    assert not run_dir.exists()


def test_logger_config_typos_name_the_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="wandb.mode"):
        LoggerConfig(wandb={"enabled": True, "mode": "online-ish"})
    with pytest.raises(ValidationError, match="sample_generations.period"):
        LoggerConfig(sample_generations={"period": -1})


# ------------------------------------------------------------------------------ run info


def test_environment_json_names_versions_git_and_command(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_state(repo) == {"root": str(repo), "commit": commit, "dirty": False}
    (repo / "a.txt").write_text("2")
    assert git_state(repo)["dirty"] is True
    assert git_state(tmp_path / "not-a-repo-dir") is None or git_state(tmp_path) is None

    monkeypatch.chdir(repo)
    info = json.loads(write_run_info(tmp_path, world_size=2).read_text())
    assert info["git"] == {"root": str(repo), "commit": commit, "dirty": True}
    assert info["world_size"] == 2 and info["command"][0]
    assert info["packages"]["torch"] == torch.__version__.split("+")[0] or info["packages"]["torch"] == torch.__version__
    assert info["packages"]["posttrain"] is not None and "no-such-package" not in info["packages"]
    assert set(info) >= {"started_at", "python", "platform", "accelerator", "hostname", "environment_variables"}

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all: the entry is null, nothing fails
    assert git_state(repo) is None


# --------------------------------------------------------------------------- rollout samples


class _Tokenizer:
    def decode(self, ids, skip_special_tokens):
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i == 0))


def test_rollout_samples_decode_prompt_and_response_of_whole_groups_first():
    # 2 prompts x 2 responses, rows of width 5: prompt [5, 6] then the response, 0 pads / specials
    input_ids = torch.tensor([[[5, 6, 7, 0, 0], [5, 6, 8, 9, 0]], [[3, 4, 7, 0, 0], [3, 4, 9, 0, 0]]])
    attention = torch.tensor([[[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]])
    response = torch.tensor([[[0, 0, 1, 0, 0], [0, 0, 1, 1, 0]], [[0, 0, 1, 0, 0], [0, 0, 1, 0, 0]]])
    groups = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "response_mask": response,
        "raw_rewards": torch.tensor([[1.0, 0.0], [0.5, 0.25]]),
        "rewards": torch.tensor([[0.9, 0.0], [0.5, 0.25]]),
        "lengths": torch.tensor([[1.0, 2.0], [1.0, 1.0]]),
        "truncated": torch.tensor([[False, True], [False, False]]),
    }
    samples = rollout_samples(groups, _Tokenizer(), step=7, count=3)
    assert [(s["group"], s["prompt"], s["response"]) for s in samples] == [(0, "t5 t6", "t7"), (0, "t5 t6", "t8 t9"), (1, "t3 t4", "t7")]
    assert samples[1] == {
        "step": 7,
        "group": 0,
        "prompt": "t5 t6",
        "response": "t8 t9",
        "reward": 0.0,
        "shaped_reward": 0.0,
        "response_tokens": 2,
        "truncated": True,
    }
    assert len(rollout_samples(groups, _Tokenizer(), step=7, count=10)) == 4
