"""Bad data end to end: skipped rows, dropped prompts and empty responses reach metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics

pytestmark = pytest.mark.integration


def test_skipped_rows_dropped_prompts_and_empty_responses_are_logged(tmp_path):
    rows = [{"prompt": f"Compute max({a}, {b}).", "answer": str(max(a, b))} for a, b in [(3, 9), (41, 14), (7, 70), (55, 5)]]
    lines = [json.dumps(row).encode() for row in rows]
    lines.append(json.dumps({"prompt": None, "answer": "1"}).encode())  # malformed: skipped
    lines.append('{"prompt": "caf\xe9", "answer": "2"}'.encode("latin-1"))  # not UTF-8: skipped
    lines.append(json.dumps({"prompt": "Compute max(" + ", ".join(["12"] * 40) + ").", "answer": "12"}).encode())  # too long
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"".join(line + b"\n" for line in lines))
    cfg = load_config(
        QUICKSTART_RECIPE,
        RecipeConfig,
        [
            f"logger.log_dir={tmp_path / 'run'}",
            "logger.progress=false",
            f"data.train={{type: file, path: {data}}}",
            "data.validation=null",
            "data.on_bad_row=skip",
            "warm_start.enabled=false",
            "grpo.use_dynamic_sampling=false",
            "grpo.num_prompts_per_step=4",
            "policy.train_global_batch_size=32",
            "policy.train_micro_batch_size=32",
            "grpo.max_num_steps=1",
            "checkpointing.enabled=false",
        ],
    )
    result = run_grpo(cfg, console=Console(enabled=False))
    [record] = read_metrics(result.log_dir)
    assert record["data/skipped_bad_rows"] == 2.0
    assert record["data/dropped_long_prompts"] == 1.0
    assert record["data/train_prompts"] == 4.0
    # An untrained tiny model often ends its turn at once: whatever it did, every response was
    # scored (env/scored) and the empty ones were counted, not dropped.
    assert record["env/scored"] == record["train/num_generated_samples"] == 32.0
    assert 0.0 <= record["train/empty_responses"] <= 32.0
