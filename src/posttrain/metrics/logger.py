"""Where a run's numbers go: `<log_dir>/metrics.jsonl` (one JSON object per step; always written,
`posttrain check` and `report` read it), `<log_dir>/samples.jsonl` (sample generations, one JSON
object per response) and the loggers the recipe's `logger` section enables: TensorBoard, Weights &
Biases, MLflow (metrics/sinks.py). Under torchrun only rank 0 has a MetricsLogger.

A (re)start calls `start(resumed_step)`: records of steps after the checkpoint's are dropped from
the JSONL files (they are redone), TensorBoard hides them, and W&B and MLflow, which continue the
same run, are not sent again the steps they already have (a resumed run redoes them exactly).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from posttrain.config.schema import MLflowConfig, RecipeConfig, WandbConfig
from posttrain.metrics.sinks import MLflowSink, Sink, TensorBoardSink, WandbSink, check_logger_packages

__all__ = ["MetricsLogger", "check_logger_packages", "read_metrics", "read_samples"]


class MetricsLogger:
    def __init__(
        self,
        log_dir: str | Path,
        *,
        tensorboard: bool = False,
        wandb: WandbConfig | None = None,
        mlflow: MLflowConfig | None = None,
        run_config: dict[str, Any] | None = None,
    ):
        """`wandb`, `mlflow`: that logger's settings when enabled, else None; `run_config`: the
        resolved recipe (W&B config, MLflow params). The optional loggers open in `start`."""
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.log_dir / "metrics.jsonl"
        self.samples_path = self.log_dir / "samples.jsonl"
        self._tensorboard, self._wandb, self._mlflow = tensorboard, wandb, mlflow
        self._run_config = run_config or {}
        self._sinks: list[Sink] = []  # TensorBoard: every step it is given
        self._trackers: list[Sink] = []  # W&B, MLflow: the steps after `_sent_through`
        self._sent_through = -1
        self._started = not (tensorboard or wandb or mlflow)  # the JSONL files need no start

    @classmethod
    def for_run(cls, cfg: RecipeConfig) -> MetricsLogger:
        """The loggers `cfg.logger` enables (its packages were checked at setup: check_logger_packages)."""
        logger = cfg.logger
        return cls(
            logger.log_dir,
            tensorboard=logger.tensorboard_enabled,
            wandb=logger.wandb if logger.wandb.enabled else None,
            mlflow=logger.mlflow if logger.mlflow.enabled else None,
            run_config=cfg.model_dump(mode="json"),
        )

    def start(self, resumed_step: int) -> None:
        """Begin a (re)start at `resumed_step`, the checkpoint's step (-1: none, the run starts over)."""
        logged_through = self.truncate_after(resumed_step)
        resuming = resumed_step >= 0
        self._sent_through = logged_through if resuming else -1
        if self._tensorboard:
            self._sinks.append(TensorBoardSink(self.log_dir, purge_step=resumed_step + 1))
        if self._wandb is not None:
            self._trackers.append(WandbSink(self._wandb, self.log_dir, config=self._run_config, resuming=resuming))
        if self._mlflow is not None:
            self._trackers.append(MLflowSink(self._mlflow, self.log_dir, config=self._run_config, resuming=resuming))
        self._started = True

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._check_started()
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self._sinks_for(step):
            sink.log_metrics(step, metrics)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Sample generations (dicts with metrics.sinks.SAMPLE_COLUMNS) of `step`."""
        self._check_started()
        with self.samples_path.open("a") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)
        for sink in self._sinks_for(step):
            sink.log_samples(step, samples)

    def truncate_after(self, step: int) -> int:
        """Drop records of steps after `step` (the checkpoint's; -1 without one), which will be
        redone, and a torn last line left by a process killed mid-write, from metrics.jsonl and
        samples.jsonl. Returns the last step metrics.jsonl held before (-1: none)."""
        logged_through = -1
        for path in (self.jsonl_path, self.samples_path):
            kept, last = _records_through(path, step)
            if path == self.jsonl_path:
                logged_through = last
            if path.exists():
                path.write_text("".join(line + "\n" for line in kept))
        return logged_through

    def close(self) -> None:
        """Close every logger; called while an exception propagates (a `finally`), the W&B and
        MLflow runs are marked failed."""
        failed = sys.exc_info()[0] is not None
        for sink in [*self._sinks, *self._trackers]:
            sink.close(failed=failed)
        self._sinks, self._trackers = [], []

    def _sinks_for(self, step: int) -> list[Sink]:
        return [*self._sinks, *(self._trackers if step > self._sent_through else [])]

    def _check_started(self) -> None:
        if not self._started:
            raise RuntimeError("MetricsLogger.start(resumed_step) opens the loggers; call it before logging")


def _records_through(path: Path, step: int) -> tuple[list[str], int]:
    """The lines of `path` whose step is <= `step`, and the largest step it holds (-1: none)."""
    if not path.exists():
        return [], -1
    lines = path.read_text().splitlines()
    kept, last = [], -1
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) - 1:  # the killed writer's last, partial line
                continue
            raise
        last = max(last, record["step"])
        if record["step"] <= step:
            kept.append(line)
    return kept, last


def read_metrics(log_dir: str | Path) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_samples(log_dir: str | Path) -> list[dict]:
    path = Path(log_dir) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
