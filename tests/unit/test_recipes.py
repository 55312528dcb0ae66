"""Shipped recipes validate; the CLI and schema report bad recipes clearly; config imports without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli.main import main
from posttrain.config import ConfigError, RecipeConfig, load_config, load_recipe
from posttrain.config.loader import repeated_inherited_values

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RECIPES_ROOT = (REPO / "recipes").resolve()
# twins/ holds overlays (a real recipe's CPU or one-GPU changes), validated through the twins using them
RECIPES = sorted(p for p in RECIPES_ROOT.rglob("*.yaml") if p.parent.name != "twins")
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
# The real-shape recipes (users supply checkpoints and data) and the base they inherit
REAL = sorted([*(RECIPES_ROOT / "llm").glob("*.yaml"), RECIPES_ROOT / "vlm" / "vlm_grpo-gemma4-e4b-geo3k.yaml"])


def _is_partial_base(path: Path) -> bool:
    """A base*.yaml meant only as a `defaults:` parent (no data section of its own) is not a recipe."""
    return path.name.startswith("base") and "data" not in load_recipe(path)


def test_recipes_found():
    assert QUICKSTART.resolve() in RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to((REPO / "recipes").resolve())))
def test_recipe_validates(path, capsys):
    if _is_partial_base(path):
        pytest.skip(f"{path.name} is a partial base recipe")
    cfg = load_config(path, RecipeConfig)
    assert isinstance(cfg, RecipeConfig)
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().err


@pytest.mark.parametrize("path", [*RECIPES, *sorted((RECIPES_ROOT / "twins").glob("*.yaml"))], ids=lambda p: str(p.relative_to(RECIPES_ROOT)))
def test_no_recipe_repeats_an_inherited_value(path):
    assert repeated_inherited_values(path) == []


def test_repeated_inherited_values_are_found(tmp_path):
    (tmp_path / "base.yaml").write_text("grpo: {max_num_steps: 5, val_period: 2}\ndata: {train: {type: arithmetic, size: 10}}\n")
    child = tmp_path / "child.yaml"
    child.write_text(
        "defaults: base.yaml\ngrpo: {max_num_steps: 5, val_period: 3}\n"
        "data: {train: {type: shapes, size: 10}}\n"  # another type replaces the mapping: not a repeat
    )
    assert repeated_inherited_values(child) == ["grpo.max_num_steps: 5 (inherited)"]


@pytest.mark.parametrize("real", REAL, ids=lambda p: p.name)
def test_every_real_recipe_inherits_the_base_and_has_a_cpu_and_a_one_gpu_twin(real):
    assert "defaults: ../gemma4-base.yaml" in real.read_text()
    stem = real.stem.removesuffix("-1n8g-fsdp2").removesuffix("-4n8g-fsdp2")
    for twin, overlay in ((RECIPES_ROOT / "tiny" / f"{stem}-tiny.yaml", "cpu"), (RECIPES_ROOT / "gpu1" / f"{stem}-1gpu.yaml", "gpu1")):
        text = twin.read_text()
        assert f"../{real.parent.name}/{real.name}" in text and f"../twins/{overlay}.yaml" in text, twin
        cfg = load_config(twin, RecipeConfig)
        real_cfg = load_config(real, RecipeConfig)
        # the twin keeps the real recipe's algorithm
        assert cfg.loss_fn == real_cfg.loss_fn
        assert cfg.grpo.use_leave_one_out_baseline == real_cfg.grpo.use_leave_one_out_baseline
        assert (cfg.tiny_model.preset is not None) == (overlay == "gpu1")


def test_quickstart_values():
    cfg = load_config(QUICKSTART, RecipeConfig)
    assert cfg.tiny_model is not None and cfg.policy.model_name is None
    assert cfg.loss_fn.truncated_importance_sampling_type == "tis"
    assert cfg.loss_fn.truncated_importance_sampling_ratio == 2.0
    samples = cfg.grpo.num_prompts_per_step * cfg.grpo.num_generations_per_prompt
    assert samples % cfg.policy.train_global_batch_size == 0


def test_cli_typo_suggests_the_key(capsys):
    assert main(["validate", str(QUICKSTART), "grpo.num_prompt_per_step=3"]) == 2
    err = capsys.readouterr().err
    assert "grpo.num_prompt_per_step: unknown key" in err
    assert "did you mean 'num_prompts_per_step'" in err


def test_batch_arithmetic_error_names_the_numbers():
    overrides = [
        "grpo.num_prompts_per_step=3",
        "grpo.num_generations_per_prompt=5",
        "policy.train_global_batch_size=4",
        "policy.train_micro_batch_size=4",
    ]
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, RecipeConfig, overrides)
    message = str(info.value)
    assert "3 x 5 = 15" in message
    assert "train_global_batch_size = 4" in message
    assert str(QUICKSTART) in message


def test_micro_batch_must_divide_global_batch():
    with pytest.raises(ConfigError, match=r"train_global_batch_size \(256\) must be a multiple of .*train_micro_batch_size \(3\)"):
        load_config(QUICKSTART, RecipeConfig, ["policy.train_micro_batch_size=3"])


def test_truncation_ratio_without_type_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, RecipeConfig, ["loss_fn.truncated_importance_sampling_type=null"])
    message = str(info.value)
    assert "loss_fn" in message
    assert "truncated_importance_sampling_ratio is set but truncated_importance_sampling_type is null" in message


def test_int_for_float_is_accepted():
    cfg = load_config(QUICKSTART, RecipeConfig, ["loss_fn.ratio_clip_c=10"])
    assert cfg.loss_fn.ratio_clip_c == 10.0
    assert isinstance(cfg.loss_fn.ratio_clip_c, float)


def test_constraint_violation_names_the_key():
    with pytest.raises(ConfigError, match=r"loss_fn\.ratio_clip_c: .*got 1"):
        load_config(QUICKSTART, RecipeConfig, ["loss_fn.ratio_clip_c=1"])


def test_config_imports_without_torch():
    code = "import posttrain.config, posttrain.config.loss, posttrain.config.schema, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_cli_validate_does_not_import_torch():
    code = (
        "import sys; from posttrain.cli.main import main; "
        f"rc = main(['validate', {str(QUICKSTART)!r}]); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_config_reference_doc_is_up_to_date():
    """docs/config.md is generated from the schema; regenerate it with
    `python -m posttrain.config.reference > docs/config.md` after changing a field."""
    from posttrain.config.reference import markdown_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text() == markdown_reference()
