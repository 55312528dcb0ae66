"""The optional loggers behind `MetricsLogger`: TensorBoard, Weights & Biases and MLflow.

Each is a `Sink` (metrics at a step, sample generations at a step, close), opened for one
(re)start of a run. wandb and mlflow are imported only when enabled; `check_logger_packages`
fails before any work when an enabled logger's package is missing.

Restarts. W&B and MLflow continue the same run across a resume: its id is kept in the run
directory (wandb_run.json, mlflow_run.json). A restart without a checkpoint redoes the whole run
and opens a new W&B / MLflow run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from posttrain.config.schema import LoggerConfig, MLflowConfig, WandbConfig

SAMPLE_COLUMNS = ("step", "group", "prompt", "response", "reward", "shaped_reward", "response_tokens", "truncated")

WANDB_RUN_FILE = "wandb_run.json"
MLFLOW_RUN_FILE = "mlflow_run.json"


class Sink(Protocol):
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None: ...

    def close(self, *, failed: bool) -> None: ...


class LoggerPackageError(RuntimeError):
    """An enabled logger's package is not installed (raised before any work)."""


# logger -> (the module it imports, the pip extra that installs it)
LOGGER_PACKAGES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def check_logger_packages(cfg: LoggerConfig) -> None:
    missing = [
        name
        for name, (module, _) in LOGGER_PACKAGES.items()
        if getattr(cfg, name).enabled and importlib.util.find_spec(module) is None
    ]
    if missing:
        raise LoggerPackageError(
            "; ".join(
                f"logger.{name}.enabled is true but the {LOGGER_PACKAGES[name][0]} package is not installed: "
                f'pip install "posttrain[{LOGGER_PACKAGES[name][1]}]" (or set logger.{name}.enabled: false)'
                for name in missing
            )
        )


def samples_markdown(samples: list[dict[str, Any]]) -> str:
    """A Markdown table of sample generations (TensorBoard's text plugin renders Markdown)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS[1:]) + " |", "|" + "---|" * (len(SAMPLE_COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell(s[c]) for c in SAMPLE_COLUMNS[1:]) + " |" for s in samples]
    return "\n".join(lines)


class TensorBoardSink:
    """Event files under <log_dir>/tensorboard. A (re)start at `purge_step` hides the events an
    earlier attempt logged from that step on (TensorBoard's purge), so redone steps are not doubled."""

    def __init__(self, log_dir: Path, *, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir / "tensorboard"), purge_step=purge_step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._writer.add_text("samples", samples_markdown(samples), step)
        self._writer.flush()

    def close(self, *, failed: bool) -> None:
        self._writer.close()


def _saved_run(path: Path, *, resuming: bool) -> dict | None:
    return json.loads(path.read_text()) if resuming and path.is_file() else None


class WandbSink:
    """A W&B run (offline by default: everything under <dir>/wandb, no account, no network)."""

    def __init__(self, cfg: WandbConfig, log_dir: Path, *, config: dict[str, Any], resuming: bool):
        import wandb

        state_file = log_dir / WANDB_RUN_FILE
        saved = _saved_run(state_file, resuming=resuming)
        run_id = saved["id"] if saved is not None else secrets.token_hex(4)
        wandb_dir = Path(cfg.dir) if cfg.dir is not None else log_dir
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            entity=cfg.entity,
            project=cfg.project,
            name=cfg.name or log_dir.resolve().name,
            tags=cfg.tags,
            dir=wandb_dir,
            mode=cfg.mode,
            id=run_id,
            resume="allow",
            config=config,
            allow_val_change=True,  # a resume may change settings (e.g. policy.optimizer)
            # console off: W&B's capture of stdout/stderr would fight posttrain's progress display
            settings=wandb.Settings(console="off", save_code=False),
        )
        self._table = wandb.Table
        state_file.write_text(json.dumps({"id": run_id, "project": cfg.project, "mode": cfg.mode}) + "\n")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        table = self._table(columns=list(SAMPLE_COLUMNS), data=[[s[c] for c in SAMPLE_COLUMNS] for s in samples])
        self._run.log({"samples": table}, step=step)

    def close(self, *, failed: bool) -> None:
        self._run.finish(exit_code=1 if failed else 0)


_MLFLOW_DISALLOWED = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_name(key: str) -> str:
    """A metric or param name MLflow accepts: letters, digits, `_ - . : /` and space; others become `_`."""
    return _MLFLOW_DISALLOWED.sub("_", key)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"policy.optimizer.lr": 1e-06, ...}; lists stay whole."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_file_store(uri: str) -> bool:
    """A `file:` URI or a plain directory path (what MLflow reads as its file store)."""
    if uri.startswith("file:"):
        return True
    return ":" not in uri.split("/")[0]  # no scheme (http:, sqlite:, databricks, ...): a path


class MLflowSink:
    """An MLflow run through MlflowClient (no global state). The config goes in as params (once,
    when the run is created: MLflow params never change) and as the config.yaml artifact,
    environment.json as an artifact, samples as JSON artifacts samples/step_<n>.json."""

    def __init__(self, cfg: MLflowConfig, log_dir: Path, *, config: dict[str, Any], resuming: bool):
        uri = cfg.tracking_uri or (log_dir.resolve() / "mlruns").as_uri()
        if is_file_store(uri):
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked for explicitly;
            # it is the one backend that needs neither a server nor a database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._client = Metric, MlflowClient(tracking_uri=uri)
        state_file = log_dir / MLFLOW_RUN_FILE
        saved = _saved_run(state_file, resuming=resuming)
        if saved is not None and saved["tracking_uri"] == uri:
            self.run_id = saved["run_id"]
            self._client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(cfg.experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self._client.create_experiment(cfg.experiment_name)
            )
            self.run_id = self._client.create_run(
                experiment_id, run_name=cfg.run_name or log_dir.resolve().name
            ).info.run_id
            # values as YAML would show them (JSON), cut to MLflow's 6000 characters
            params = [
                Param(mlflow_name(k), (v if isinstance(v, str) else json.dumps(v))[:6000])
                for k, v in flatten(config).items()
            ]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self._client.log_batch(self.run_id, params=params[start : start + 100])
        state_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}) + "\n")
        for name in ("config.yaml", "environment.json"):
            if (log_dir / name).is_file():
                self._client.log_artifact(self.run_id, str(log_dir / name))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        batch = [self._metric(mlflow_name(k), float(v), timestamp, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics per batch
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self._client.log_text(self.run_id, json.dumps(samples, indent=1), f"samples/step_{step:06d}.json")

    def close(self, *, failed: bool) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
