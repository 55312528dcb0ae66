"""Metrics sinks: `<log_dir>/metrics.jsonl` (one JSON object per step) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, log_dir: str | Path, *, tensorboard: bool):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.log_dir / "metrics.jsonl"
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def truncate_after(self, step: int) -> None:
        """On (re)start: drop records of steps after `step` (the checkpoint's; -1 without one), which
        will be redone, and a torn last line left by a process killed mid-write."""
        if not self.jsonl_path.exists():
            return
        lines = self.jsonl_path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines) - 1:  # the killed writer's last, partial line
                    continue
                raise
            if record["step"] <= step:
                kept.append(line)
        self.jsonl_path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(log_dir: str | Path) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
