"""Test suites: every recipe has a launcher, every launcher is in exactly one suite, and the
nightly suite's GPU-hours (runs x nodes x GPUs x minutes) stay under the cap."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RECIPES_ROOT = (REPO / "recipes").resolve()
_spec = importlib.util.spec_from_file_location("suite_budget", REPO / "tests" / "suites" / "budget.py")
budget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budget)


def _runnable_recipes() -> set[str]:
    """Every recipe but the shared base and the twin overlays, relative to recipes/."""
    paths = RECIPES_ROOT.rglob("*.yaml")
    return {str(p.relative_to(RECIPES_ROOT)) for p in paths if p.parent.name not in ("twins", "prompts") and p.name != "gemma4-base.yaml"}


def _launched_recipe(launcher: Path) -> str:
    [recipe] = re.findall(r"^RECIPE=(\S+)$", launcher.read_text(), re.MULTILINE)
    return recipe


def test_every_recipe_has_exactly_one_launcher():
    launched = [_launched_recipe(path) for path in budget.launchers()]
    assert sorted(launched) == sorted(_runnable_recipes())


def test_every_launcher_is_in_exactly_one_suite():
    listed = [path for name in budget.SUITES for path in budget.suite_entries(name)]
    assert sorted(listed) == budget.launchers()


def test_the_nightly_suite_is_under_its_gpu_hour_cap():
    assert budget.suite_gpu_hours("nightly") <= budget.NIGHTLY_GPU_HOURS_CAP


def test_gpu_hours_are_runs_times_nodes_times_gpus_times_minutes(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.sh").write_text("NUM_NODES=4\nGPUS_PER_NODE=8\nNUM_MINUTES=90\nRECIPE=llm/x.yaml\n")
    (tmp_path / "a" / "y.sh").write_text("NUM_NODES=1\nGPUS_PER_NODE=1\nNUM_MINUTES=30\n")
    (tmp_path / "nightly.txt").write_text("# two runs of y, one of x\na/y.sh\na/x.sh\n\na/y.sh\n")
    monkeypatch.setattr(budget, "SUITES_DIR", tmp_path)
    assert budget.suite_gpu_hours("nightly") == 4 * 8 * 90 / 60 + 2 * 0.5
    (tmp_path / "nightly.txt").write_text("a/z.sh\n")
    with pytest.raises(ValueError, match="lists a/z.sh, which does not exist"):
        budget.suite_entries("nightly")
    (tmp_path / "a" / "y.sh").write_text("NUM_NODES=1\n")
    with pytest.raises(ValueError, match="no GPUS_PER_NODE, NUM_MINUTES line"):
        budget.launcher_settings(tmp_path / "a" / "y.sh")


def test_launchers_are_executable_and_source_the_common_script():
    for path in budget.launchers():
        assert path.stat().st_mode & 0o111, path
        assert 'source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"' in path.read_text(), path


def test_multi_gpu_launchers_launch_recipes_that_split_over_their_ranks():
    """A launcher's recipe passes the loop's torchrun checks for its world size (nodes x GPUs)."""
    from posttrain.config import RecipeConfig, load_config
    from posttrain.loops.grpo import check_distributed_recipe

    checked = 0
    for path in budget.launchers():
        settings = budget.launcher_settings(path)
        world = settings["NUM_NODES"] * settings["GPUS_PER_NODE"]
        if world > 1:
            cfg = load_config(RECIPES_ROOT / _launched_recipe(path), RecipeConfig)
            check_distributed_recipe(cfg, world)
            checked += 1
    assert checked == 6  # E2B, 26B-A4B, 31B, the VLM recipe, E2B SFT and E2B DPO
