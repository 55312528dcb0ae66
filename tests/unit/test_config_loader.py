"""Recipe loading: `defaults:` inheritance, dotted overrides, and the wording of config errors.

The models here are small stand-ins for the real schema, built the same way (extra="forbid",
nested sections, a discriminated union, named validators), so these tests pin the loader alone.
"""

from pathlib import Path
from textwrap import dedent
from typing import Annotated, Literal

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.config.loader import (
    ConfigError,
    apply_overrides,
    dump_config,
    load_config,
    load_recipe,
    validate_config,
)

pytestmark = pytest.mark.unit


class GrpoSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_prompts_per_step: int = Field(ge=1)
    num_generations_per_prompt: int = 8
    max_num_steps: int = 100


class KlSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kl_penalty_coef: float = 0.0
    estimator: Literal["k1", "k3"] = "k3"


class LossSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio_clip_min: float = 0.2
    ratio_clip_max: float = 0.28
    normalization: Literal["token", "sequence"] = "token"
    kl: KlSection = KlSection()

    @model_validator(mode="after")
    def clip_max_not_below_clip_min(self) -> "LossSection":
        if self.ratio_clip_max < self.ratio_clip_min:
            raise ValueError(
                f"ratio_clip_max ({self.ratio_clip_max}) must be >= "
                f"ratio_clip_min ({self.ratio_clip_min})"
            )
        return self


class MathEnv(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["math"] = "math"
    timeout_s: float = 5.0


class CodeEnv(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["code"] = "code"
    sandbox_workers: int = 4


EnvConfig = Annotated[MathEnv | CodeEnv, Field(discriminator="type")]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grpo: GrpoSection
    loss_fn: LossSection = LossSection()
    envs: list[EnvConfig] = []
    stop_strings: list[str] = []

    @model_validator(mode="after")
    def groups_have_two_samples(self) -> "Recipe":
        if self.grpo.num_generations_per_prompt < 2:
            raise ValueError("grpo.num_generations_per_prompt must be >= 2 for group advantages")
        return self


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def config_error(raw: dict, source: str | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, Recipe, source=source)
    return str(info.value)


# --- defaults: inheritance -------------------------------------------------------------------


def test_two_level_defaults_deep_merge_lists_replace(tmp_path: Path) -> None:
    write(
        tmp_path / "base.yaml",
        """
        grpo: {num_prompts_per_step: 4, num_generations_per_prompt: 8}
        loss_fn:
          ratio_clip_min: 0.2
          kl: {kl_penalty_coef: 0.1, estimator: k1}
        stop_strings: [a, b]
        """,
    )
    write(
        tmp_path / "mid.yaml",
        """
        defaults: base.yaml
        grpo: {num_generations_per_prompt: 16}
        loss_fn: {kl: {estimator: k3}}
        stop_strings: [c]
        """,
    )
    top = write(
        tmp_path / "top.yaml",
        """
        defaults: [mid.yaml]
        grpo: {max_num_steps: 7}
        loss_fn: {ratio_clip_max: 0.3}
        """,
    )
    assert load_recipe(top) == {
        "grpo": {"num_prompts_per_step": 4, "num_generations_per_prompt": 16, "max_num_steps": 7},
        "loss_fn": {
            "ratio_clip_min": 0.2,
            "kl": {"kl_penalty_coef": 0.1, "estimator": "k3"},
            "ratio_clip_max": 0.3,
        },
        "stop_strings": ["c"],
    }


def test_later_bases_win_and_explicit_null_replaces_a_section(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "x: 1\ny: {p: 1}\nsection: {k: 1}\n")
    write(tmp_path / "b.yaml", "x: 2\ny: {q: 2}\n")
    top = write(tmp_path / "top.yaml", "defaults: [a.yaml, b.yaml]\nsection: null\n")
    assert load_recipe(top) == {"x": 2, "y": {"p": 1, "q": 2}, "section": None}


def test_base_paths_are_relative_to_the_recipe_or_absolute(tmp_path: Path) -> None:
    common = write(tmp_path / "common" / "base.yaml", "grpo: {num_prompts_per_step: 4}\n")
    write(tmp_path / "common" / "extra.yaml", "stop_strings: [x]\n")
    top = write(
        tmp_path / "runs" / "deep" / "top.yaml",
        f"defaults: [../../common/extra.yaml, {common}]\ngrpo: {{max_num_steps: 3}}\n",
    )
    assert load_recipe(top) == {
        "stop_strings": ["x"],
        "grpo": {"num_prompts_per_step": 4, "max_num_steps": 3},
    }


def test_shared_base_reached_twice_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "root.yaml", "x: 1\n")
    write(tmp_path / "left.yaml", "defaults: root.yaml\nl: 1\n")
    write(tmp_path / "right.yaml", "defaults: root.yaml\nr: 1\n")
    top = write(tmp_path / "top.yaml", "defaults: [left.yaml, right.yaml]\n")
    assert load_recipe(top) == {"x": 1, "l": 1, "r": 1}


def test_defaults_cycle_shows_the_chain(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "defaults: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "defaults: c.yaml\n")
    write(tmp_path / "c.yaml", "defaults: b.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(a)
    message = str(info.value)
    assert "cycle" in message
    b, c = tmp_path / "b.yaml", tmp_path / "c.yaml"
    assert f"{b} -> {c} -> {b}" in message


def test_self_reference_is_a_cycle(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "defaults: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(a)


def test_missing_base_names_the_recipe_and_the_entry(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "defaults: nope.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(top)
    assert str(info.value).startswith(f"{top}: `defaults` entry 'nope.yaml' not found")


def test_defaults_must_name_files(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "defaults: {a: 1}\n")
    with pytest.raises(ConfigError, match="`defaults` must be a file name or a list"):
        load_recipe(top)


# --- reading YAML ------------------------------------------------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "grpo:\n  num_prompts_per_step: 4\n  oops: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: invalid YAML at line ")
    assert "line 4" in message  # where PyYAML notices the unclosed bracket: end of input


def test_yaml_error_in_a_base_names_the_base(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "a: 1\n  b: 2\n")
    top = write(tmp_path / "top.yaml", "defaults: base.yaml\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(top)
    assert str(info.value).startswith(f"{tmp_path / 'base.yaml'}: invalid YAML at line 2")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    dup = write(tmp_path / "dup.yaml", "grpo:\n  max_num_steps: 1\n  max_num_steps: 2\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(dup)
    message = str(info.value)
    assert "duplicate key 'max_num_steps' (first at line 2)" in message
    assert "line 3" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", ""])
def test_recipe_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: a recipe must be a YAML mapping")


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_scientific_notation_without_dot_reads_as_float(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "lr: 1e-6\nbig: 3E5\nname: 1e-6x\nver: '1e-6'\n")
    raw = load_recipe(path)
    assert raw == {"lr": 1e-6, "big": 3e5, "name": "1e-6x", "ver": "1e-6"}
    assert isinstance(raw["lr"], float)


# --- overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("a.b=3", 3),
        ("a.b=-2", -2),
        ("a.b=2.5", 2.5),
        ("a.b=1e-6", 1e-6),
        ("a.b=-1E+3", -1000.0),
        ("a.b=null", None),
        ("a.b=[1, 2]", [1, 2]),
        ("a.b=true", True),
        ("a.b=false", False),
        ("a.b=hello", "hello"),
        ("a.b='3'", "3"),
        ("a.b=x=y", "x=y"),
        ("a.b=", ""),
    ],
)
def test_override_values_parse_as_yaml(override: str, expected: object) -> None:
    value = apply_overrides({"a": {"b": "old", "c": 1}}, [override])["a"]
    assert value == {"b": expected, "c": 1}
    assert type(value["b"]) is type(expected)


def test_overrides_apply_after_defaults_and_can_create_keys(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "grpo: {num_prompts_per_step: 4}\nloss_fn: null\n")
    top = write(tmp_path / "top.yaml", "defaults: base.yaml\ngrpo: {max_num_steps: 5}\n")
    raw = load_recipe(
        top, ["grpo.max_num_steps=9", "new.deep.key=1", "loss_fn.kl.estimator=k1", "grpo.x=1"]
    )
    assert raw == {
        "grpo": {"num_prompts_per_step": 4, "max_num_steps": 9, "x": 1},
        "loss_fn": {"kl": {"estimator": "k1"}},  # a null section becomes a mapping
        "new": {"deep": {"key": 1}},
    }


def test_overrides_do_not_mutate_their_input() -> None:
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2"]) == {"a": {"b": 2}}
    assert raw == {"a": {"b": 1}}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("grpo.num_prompts_per_step", "has no '='"),
        ("=3", "has an empty key"),
        ("  =3", "has an empty key"),
        ("grpo..max_num_steps=3", "has an empty segment"),
        ("grpo.=3", "has an empty segment"),
    ],
)
def test_malformed_override_shows_the_right_form(override: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    message = str(info.value)
    assert f"override {override!r} {problem}" in message
    assert "expected key.path=value, e.g. grpo.num_prompts_per_step=64" in message


def test_override_into_a_scalar_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "a: {b: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path, ["a.b.c=1"])
    assert str(info.value) == (
        f"{path}: override 'a.b.c=1': cannot set a.b.c because a.b is 3, not a mapping"
    )


def test_override_with_broken_yaml_value_suggests_quoting() -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML .*quote it"):
        apply_overrides({}, ["a=[1, 2"])
    with pytest.raises(ConfigError, match="reads as YAML null"):
        apply_overrides({}, ["a=#comment"])


# --- validation messages -----------------------------------------------------------------------


def test_valid_recipe_validates_and_yaml_int_zero_fits_a_float(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.yaml",
        """
        grpo: {num_prompts_per_step: 4}
        loss_fn: {ratio_clip_min: 0, kl: {kl_penalty_coef: 0}}
        envs: [{type: code, sandbox_workers: 2}, {type: math}]
        """,
    )
    cfg = load_config(path, Recipe)
    assert isinstance(cfg, Recipe)
    assert cfg.loss_fn.ratio_clip_min == 0.0 and isinstance(cfg.loss_fn.ratio_clip_min, float)
    assert cfg.envs == [CodeEnv(sandbox_workers=2), MathEnv()]


def test_typo_suggests_the_closest_key() -> None:
    message = config_error({"grpo": {"num_prompt_per_step": 4}}, source="r.yaml")
    assert message.startswith("r.yaml: invalid recipe (2 problems):")
    assert "grpo.num_prompt_per_step: unknown key; did you mean 'num_prompts_per_step'?" in message
    assert "grpo.num_prompts_per_step: required key missing" in message


def test_typo_two_levels_deep() -> None:
    message = config_error(
        {"grpo": {"num_prompts_per_step": 4}, "loss_fn": {"kl": {"kl_penalty_coeff": 0.1}}}
    )
    assert "loss_fn.kl.kl_penalty_coeff: unknown key; did you mean 'kl_penalty_coef'?" in message


def test_unrecognisable_key_lists_the_valid_ones() -> None:
    message = config_error({"grpo": {"num_prompts_per_step": 4}, "zzz": 1})
    assert "zzz: unknown key; valid keys here: grpo, loss_fn, envs, stop_strings" in message


def test_typo_inside_a_discriminated_union_in_a_list() -> None:
    message = config_error(
        {
            "grpo": {"num_prompts_per_step": 4},
            "envs": [{"type": "math"}, {"type": "code", "sandbox_worker": 8}],
        }
    )
    # No pydantic member tag ('code') in the path, and suggestions from CodeEnv's fields.
    assert "envs[1].sandbox_worker: unknown key; did you mean 'sandbox_workers'?" in message


def test_unknown_discriminator_value_suggests_a_tag() -> None:
    message = config_error({"grpo": {"num_prompts_per_step": 4}, "envs": [{"type": "maths"}]})
    assert "envs[0]: unknown 'type' 'maths'; expected one of 'math', 'code'" in message
    assert "did you mean 'math'?" in message


def test_missing_required_section() -> None:
    message = config_error({"loss_fn": {}})
    assert message.startswith("invalid recipe (1 problem):")
    assert "  grpo: required key missing" in message


def test_bad_values_show_what_was_given() -> None:
    message = config_error(
        {
            "grpo": {"num_prompts_per_step": 0, "max_num_steps": "many"},
            "loss_fn": {"normalization": "tokens"},
            "stop_strings": "x" * 200,
        }
    )
    assert message.startswith("invalid recipe (4 problems):")
    assert (
        "grpo.num_prompts_per_step: Input should be greater than or equal to 1 (got 0)" in message
    )
    assert "grpo.max_num_steps: Input should be a valid integer" in message
    assert "(got 'many')" in message
    assert (
        "loss_fn.normalization: Input should be 'token' or 'sequence' (got 'tokens'); "
        "did you mean 'token'?"
    ) in message
    assert "stop_strings: Input should be a valid list (got 'xxxxx" in message
    assert "x" * 100 not in message  # long values are truncated


def test_model_validator_messages_come_through_with_their_location() -> None:
    nested = config_error(
        {"grpo": {"num_prompts_per_step": 4}, "loss_fn": {"ratio_clip_max": 0.1}}
    )
    assert "  loss_fn: ratio_clip_max (0.1) must be >= ratio_clip_min (0.2)" in nested
    root = config_error({"grpo": {"num_prompts_per_step": 4, "num_generations_per_prompt": 1}})
    assert "  <recipe>: grpo.num_generations_per_prompt must be >= 2 for group advantages" in root


def test_load_config_errors_start_with_the_recipe_file(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "grpo: {num_prompts_per_step: 4}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, Recipe, ["grpo.num_prompt_per_step=8"])
    assert str(info.value).startswith(f"{path}: invalid recipe (1 problem):")


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- dumping -----------------------------------------------------------------------------------


def test_dump_keeps_field_order_and_round_trips() -> None:
    cfg = Recipe(
        grpo=GrpoSection(num_prompts_per_step=4),
        loss_fn=LossSection(kl=KlSection(kl_penalty_coef=1e-6)),
        envs=[CodeEnv()],
    )
    text = dump_config(cfg)
    assert list(yaml.safe_load(text)) == ["grpo", "loss_fn", "envs", "stop_strings"]
    assert text.startswith("grpo:\n  num_prompts_per_step: 4\n  num_generations_per_prompt: 8\n")
    assert validate_config(yaml.safe_load(text), Recipe) == cfg


def test_a_different_union_type_replaces_the_base_mapping(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "data: {type: arithmetic, size: 10, max_value: 9}\n")
    write(tmp_path / "same.yaml", "defaults: base.yaml\ndata: {size: 20}\n")
    write(tmp_path / "other.yaml", "defaults: base.yaml\ndata: {type: file, path: x.jsonl}\n")
    assert load_recipe(tmp_path / "same.yaml")["data"] == {"type": "arithmetic", "size": 20, "max_value": 9}
    assert load_recipe(tmp_path / "other.yaml")["data"] == {"type": "file", "path": "x.jsonl"}
