"""Kill -9 soak, small: the real CLI SIGKILLed 4 times (3 of them as a checkpoint is being written)
and resumed each time. The harness is benchmarks/soak_kill9.py, which runs the full-size soak."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HARNESS = Path(__file__).resolve().parents[2] / "benchmarks" / "soak_kill9.py"


def _harness():
    spec = importlib.util.spec_from_file_location("soak_kill9", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sigkill_at_random_moments_never_breaks_a_resume(tmp_path):
    soak = _harness()
    modes = ["checkpoint_write", "training", "checkpoint_write", "checkpoint_write"]
    result = soak.soak(tmp_path, runs=1, kills=len(modes), seed=0, max_steps=12, modes=modes)

    assert result["kills"] == 4 and result["runs_completed"] == 1
    assert result["resume_failures"] == []
    assert result["checkpoint_problems"] == []  # no step_<n> directory was ever half-written
    assert result["checkpoints_verified"] >= 4
    assert result["kills_during_checkpoint_write"] >= 1
    assert result["max_steps_lost"] <= 2  # checkpointing.save_period
    assert result["resumes_first_step_checked"] >= 1
    assert result["final_matches_uninterrupted"], result["per_run"][0]["comparison"]
