"""Each real recipe's CPU twin (recipes/tiny/*-tiny.yaml: the real recipe's algorithm on a tiny
Gemma 4 and generated data) runs end to end, and its metric gates pass under `posttrain check`."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.cli.main import main

pytestmark = pytest.mark.integration

RECIPES_ROOT = Path(__file__).resolve().parents[2] / "recipes"
TWINS = sorted((RECIPES_ROOT / "tiny").glob("*-it-tiny.yaml")) + sorted((RECIPES_ROOT / "tiny").glob("*-geo3k-tiny.yaml"))


def test_there_is_a_twin_per_real_recipe():
    assert len(TWINS) == 6  # the DAPO E2B, 26B-A4B and 31B twins, SFT E2B, DPO E2B, and the VLM one


@pytest.mark.parametrize("twin", TWINS, ids=lambda p: p.stem)
def test_cpu_twin_trains_and_passes_its_gates(twin, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", str(twin), f"logger.log_dir={run_dir}", "logger.progress=false"]) == 0
    capsys.readouterr()
    assert main(["check", str(run_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("PASS") for line in lines), lines
