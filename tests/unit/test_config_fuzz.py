"""Config fuzzing: mutated recipes give a valid config or a `ConfigError` naming a key, never a traceback.

Every shipped recipe (resolved through its `defaults:`) is mutated in memory: keys deleted,
misspelt or added at any depth, values replaced by values of any type (nan, inf, negatives,
strings, lists, mappings, null, bools), dotted overrides malformed. Loading the result must
return a `RecipeConfig` or raise posttrain's `ConfigError` whose every problem line starts with
a key path; a TypeError, KeyError, AttributeError, a validator's ValueError or a YAML error
escaping the loader is a bug. A few mutated files also go through `posttrain validate`.

Runs are derandomized (same examples every run, no example database): a unit test is hermetic.
"""

from __future__ import annotations

import copy
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from posttrain.cli.main import main
from posttrain.config.loader import (
    ROOT_LOCATION,
    ConfigError,
    _parse_yaml,  # the recipe YAML dialect (1e-6 is a float), to reread dumps as load_config does
    apply_overrides,
    dump_config,
    load_config,
    load_recipe,
    validate_config,
)
from posttrain.config.reference import _models_in
from posttrain.config.schema import RecipeConfig

pytestmark = pytest.mark.unit

RECIPES_DIR = Path(__file__).resolve().parents[2] / "src" / "posttrain" / "recipes"
RECIPE_PATHS = sorted(p for p in RECIPES_DIR.rglob("*.yaml") if p.parent.name != "twins")  # twins/: overlays, not recipes
RESOLVED = {path.relative_to(RECIPES_DIR).as_posix(): load_recipe(path) for path in RECIPE_PATHS}

# Valid sections that the shipped recipes do not use, so that mutations reach their validators too.
ENV_SEEDS = [
    {"name": "weighted", "options": {"components": [
        {"name": "format", "weight": 0.1, "options": {"match": "search"}},
        {"name": "math", "weight": 0.9, "options": {"verifier": "dapo"}, "label": "answer"}]}},
    {"name": "reward_model", "options": {"model": "rm/", "batch_size": 4, "input_format": "chat", "trust_remote_code": False}},
    {"name": "custom", "options": {"import_path": "pkg.module:Env", "alpha": 1}},
    {"name": "geometry3k", "options": {"timeout_s": 5}},
]  # fmt: skip
SOURCE_SEEDS = [
    {"type": "dataset", "name": "gsm8k", "split": "test", "limit": 8},
    {"type": "file", "path": "data/train.jsonl", "prompt_key": "q.text", "answer_key": None},
    {"type": "reasoning_gym", "task": "chain_sum", "size": 3, "config": {"max_terms": 2}},
]


def _seeded_variants() -> dict[str, dict[str, Any]]:
    variants = {}
    for index, (env, source) in enumerate(zip(ENV_SEEDS, [*SOURCE_SEEDS, SOURCE_SEEDS[0]], strict=True)):
        variant = copy.deepcopy(RESOLVED["quickstart.yaml"])
        variant["env"], variant["data"]["validation"] = env, source
        variant["data"]["prompt_template_file"] = "math_cot_boxed"
        variants[f"quickstart.yaml+seed{index}"] = variant
    return variants


RESOLVED.update(_seeded_variants())

FUZZ = settings(max_examples=2000, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def _schema_keys(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every field name of the schema (for realistic renames and additions)."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    keys = set(model.model_fields)
    for field in model.model_fields.values():
        for sub in _models_in(field.annotation):
            keys |= _schema_keys(sub, seen)
    return keys


SCHEMA_KEYS = sorted(_schema_keys(RecipeConfig))
# Keys the free-form sections read (env.options, the weighted components, reasoning-gym configs).
OPTION_KEYS = ["components", "name", "weight", "options", "label", "import_path", "model", "pattern", "match",
               "batch_size", "max_length", "dtype", "input_format", "device", "timeout_s", "num_workers"]
WORDS = ["math", "custom", "weighted", "reward_model", "format", "answer_math", "reasoning_gym", "geometry3k",
         "file", "dataset", "arithmetic", "gsm8k", "test", "train", "auto", "cpu", "cuda", "float32", "bfloat16",
         "token", "tis", "icepop", "{prompt}", "math_cot_boxed", "a/b.txt", "nan", "inf", "-1", "1e-3", "", " ",
         "os:system", "pkg.module:Class", "~nobody/x", "\x00", "é", "null", "1e5", "a\x85b", "\u2028", "multi\nline"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, -1, 2, 3, 7, 64, 256])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.0, 1e-300, 1e300])
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
any_key = st.sampled_from(SCHEMA_KEYS + OPTION_KEYS) | st.text(max_size=8) | st.integers(-3, 3)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(any_key, children, max_size=3),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths (key or index tuples) to every value below `node`."""
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


def _containers(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths to every mapping (the root included)."""
    found = [prefix] if isinstance(node, dict) else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found += _containers(child, (*prefix, key))
    return found


def _get(node: Any, path: tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _typo(draw: st.DrawFn, key: str) -> str:
    if not key:
        return "x"
    i = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(["drop", "double", "swap", "case", "replace"]))
    if kind == "drop":
        return key[:i] + key[i + 1 :] or "x"
    if kind == "double":
        return key[:i] + key[i] + key[i:]
    if kind == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    if kind == "case":
        return key.upper()
    return key[:i] + draw(st.characters(codec="utf-8")) + key[i + 1 :]


def _perturbed(draw: st.DrawFn, value: Any) -> Any:
    """A value one step from `value`: same type but out of range, or a near type (the usual slip)."""
    if isinstance(value, bool):
        return draw(st.sampled_from(["yes", "true", 1, 0, None, [value]]))
    if isinstance(value, int | float):
        return draw(st.sampled_from([math.nan, math.inf, -math.inf, -value, 0, -1, value + 0.5, value * 10**12,
                                     str(value), f"{value}x", True, None, [value], {"value": value}]))
    if isinstance(value, str):
        return draw(st.sampled_from(["", " ", value.upper(), value + "s", 1, None, [value], {value: 1}])) if value else 0
    if isinstance(value, list):
        return draw(st.sampled_from([[], [None], [*value, "x"], value[:1] * 3, {"0": value}, None, "list"]))
    if isinstance(value, dict):
        return draw(st.sampled_from([{}, None, [value], "mapping", 0, {**value, "type": "file"}, {**value, "type": 3}]))
    return draw(st.sampled_from([0, "", {}, [], False]))


@st.composite
def mutated_recipes(draw: st.DrawFn) -> tuple[str, dict[str, Any], list[str]]:
    """(recipe name, mutated dict, what was done), from 1 to 4 mutations."""
    name = draw(st.sampled_from(sorted(RESOLVED)))
    raw = copy.deepcopy(RESOLVED[name])
    done = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "rename", "replace", "perturb", "perturb", "add"]))
        paths = _paths(raw)
        if kind in ("delete", "rename", "replace", "perturb") and paths:
            path = draw(st.sampled_from(paths))
            parent, key = _get(raw, path[:-1]), path[-1]
            if kind == "delete":
                del parent[key]
            elif kind == "rename" and isinstance(parent, dict):
                new_key = _typo(draw, str(key)) if draw(st.booleans()) else draw(any_key)
                parent[new_key] = parent.pop(key)
                path = (*path[:-1], f"{key}->{new_key}")
            else:
                parent[key] = _perturbed(draw, parent[key]) if kind == "perturb" else draw(values)
                path = (*path, f"= {parent[key]!r}")
            done.append(f"{kind} {path}")
        else:
            path = draw(st.sampled_from(_containers(raw)))
            key = draw(any_key)
            _get(raw, path)[key] = draw(values)
            done.append(f"add {(*path, key)}")
    return name, raw, done


def _check_error(error: ConfigError, top_keys: list[str]) -> None:
    """Every problem line starts with a key path: the recipe root, a schema section or a top-level key given."""
    message = str(error)
    assert "Traceback" not in message and "pydantic" not in message.lower(), message
    head, *problems = message.split("\n")
    assert head.startswith("invalid recipe ("), message
    assert problems, message
    starts = (ROOT_LOCATION, *RecipeConfig.model_fields, *top_keys)
    for line in problems:
        assert line.startswith("  ") and line[2:].startswith(starts), f"problem line without a key path: {line!r}"


def _load(raw: Any, overrides: list[str] = ()) -> RecipeConfig | None:
    """The config, or None after checking the ConfigError; any other exception fails the test."""
    try:
        raw = apply_overrides(raw, overrides)
    except ConfigError as error:
        assert any(repr(text) in str(error) for text in overrides), str(error)
        return None
    try:
        cfg = validate_config(raw, RecipeConfig)
    except ConfigError as error:
        _check_error(error, [text for key in raw for text in (str(key), repr(str(key)))])
        return None
    assert isinstance(cfg, RecipeConfig)
    return cfg


def _finite_floats(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_floats(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite_floats(v) for v in value)
    return True


@FUZZ
@given(mutated_recipes())
def test_mutated_recipe_loads_or_names_the_key(case):
    name, raw, done = case
    cfg = _load(raw)
    if cfg is not None:
        # A config that loads has only finite numbers (the free-form env.options and reasoning-gym
        # configs are their owners' business) and survives its own dump (as the run directory's copy).
        dumped = cfg.model_dump(mode="python")
        dumped["env"].pop("options")
        for source in (dumped["data"]["train"], dumped["data"]["validation"] or {}):
            source.pop("config", None)
        assert _finite_floats(dumped), (name, done)
        again = validate_config(_parse_yaml(dump_config(cfg), "dumped"), RecipeConfig)  # as load_config reads it
        assert again.model_dump(mode="json") == cfg.model_dump(mode="json"), (name, done)


@pytest.mark.parametrize("text", ["1e5", "-2E-3", "a\x85b", "x\u2028y\u2029z", "null", "~", "multi\nline\n", " padded ", "tab\t"])
def test_dumped_config_reads_back_the_same_strings(text):
    """Found by the fuzzer: `1e5` was written bare and read back as a float; NEL (\\x85) was written
    raw into a quoted string and read back as a space."""
    raw = copy.deepcopy(RESOLVED["quickstart.yaml"])
    raw["logger"] = {"log_dir": text}
    raw["data"]["prompt_template"] = "{prompt}" + text
    cfg = validate_config(raw, RecipeConfig)
    assert validate_config(_parse_yaml(dump_config(cfg), "dumped"), RecipeConfig) == cfg


def _error(mutate) -> str:
    raw = copy.deepcopy(RESOLVED["quickstart.yaml"])
    mutate(raw)
    with pytest.raises(ConfigError) as error:
        validate_config(raw, RecipeConfig)
    return str(error.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        # found by the fuzzer: a TypeError from the weighted environment's checks
        (lambda r: r.update(env={"name": "weighted", "options": {"components": [{"name": 3, "weight": 1, "label": "a"}]}}),
         "env: weighted component 0: name must be an environment name (a string), got 3"),
        (lambda r: r.update(env={"name": "weighted", "options": {"components": [{"name": "math", "weight": 1, 1: 2, "x": 3}]}}),
         "env: weighted component 0: unknown keys [1, 'x'], missing keys []"),
        # found by the fuzzer: unreadable key paths
        (lambda r: r.update({0: None}), "  0: Keys should be strings (got 0)"),
        (lambda r: r["env"].update(options={1: 2}), "  env.options.1: invalid key: Input should be a valid string (got 1)"),
        (lambda r: r.update({"\x1e": 1}), "  '\\x1e': unknown key"),  # a control character, quoted
        (lambda r: r.update({"grpo.seed": 3}), "  'grpo.seed': unknown key; a dotted path is for command-line overrides, in YAML nest it: grpo: {seed: ...}"),
        # clearer wording than pydantic's
        (lambda r: r.update(policy="mapping"), "  policy: must be a mapping of keys to values (got 'mapping')"),
        (lambda r: r["data"].update(validation={"size": 3}),
         "  data.validation: needs a 'type' key that says which kind of section it is: one of 'arithmetic', 'arithmetic_chat', 'arithmetic_preferences', 'chat', 'dataset', 'file', 'preferences', 'reasoning_gym'"),
        (lambda r: r.update(WARM_START=r.pop("warm_start")), "  WARM_START: unknown key; did you mean 'warm_start'?"),
        (lambda r: r["data"]["train"].update(type="multi\nline"),  # pydantic's message held the raw tag
         "  data.train: unknown 'type' 'multi\\nline'; expected one of 'arithmetic', 'shapes', 'reasoning_gym', 'file', 'dataset'"),
        # nan/inf: accepted before, now refused everywhere
        (lambda r: r["grpo"]["reward_scaling"].update(source_min=math.nan), "  grpo.reward_scaling.source_min: Input should be a finite number (got nan)"),
        (lambda r: r["loss_fn"].update(reference_policy_kl_penalty=math.inf), "  loss_fn.reference_policy_kl_penalty: Input should be a finite number (got inf)"),
    ],
    ids=["component-name-int", "component-key-int", "int-key", "int-option-key", "control-char-key", "dotted-key",
         "section-scalar", "source-without-type", "case-typo", "tag-with-newline", "nan", "inf"],
)  # fmt: skip
def test_error_messages_for_mutations_the_fuzzer_found(mutate, expected):
    assert expected in _error(mutate)


def test_recipe_file_errors_the_fuzzer_found(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(b"grpo:\n  seed: 1\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0xe9 at line 3\)"):
        load_config(path, RecipeConfig)
    path.write_text("defaults: ~nobody_here_at_all/base.yaml\n")
    with pytest.raises(ConfigError, match="`defaults` entry '~nobody_here_at_all/base.yaml'"):
        load_config(path, RecipeConfig)


OVERRIDE_BREAKAGE = ["", "=", "=x", ".", "a..b=1", " =1", "a.b", ".a=1", "a.=1", "x=[1,", "x={a", "x=: :", "x=@x",
                     "x=`x", "x=!!python/object/apply:os.system ['true']", "x=&a *b", "x=%TAG", "x=#c", "x=\t",
                     "x={a: 1, a: 2}", "x=- a\n- b", "x=*alias", "x=!!binary xyz", "x=null", "x=~", "x='é'"]


@st.composite
def override_lists(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    name = draw(st.sampled_from(sorted(RESOLVED)))
    raw = RESOLVED[name]
    overrides = []
    for _ in range(draw(st.integers(1, 3))):
        path = [str(k) for k in draw(st.sampled_from(_paths(raw)))]
        if draw(st.booleans()):  # deeper than the recipe goes, or a misspelt segment
            path.append(draw(st.sampled_from(SCHEMA_KEYS + ["x"])))
        if draw(st.booleans()):
            i = draw(st.integers(0, len(path) - 1))
            path[i] = _typo(draw, path[i])
        key = ".".join(path)
        kind = draw(st.sampled_from(["value", "yaml", "broken"]))
        if kind == "value":
            overrides.append(f"{key}={yaml.safe_dump(draw(values), default_flow_style=True).strip().removesuffix('...').strip()}")
        elif kind == "yaml":
            overrides.append(f"{key}={draw(st.text(max_size=10))}")
        else:
            broken = draw(st.sampled_from(OVERRIDE_BREAKAGE))
            overrides.append(broken.replace("x", key, 1) if draw(st.booleans()) else broken)
    return raw, overrides


@FUZZ
@given(override_lists())
def test_mutated_overrides_load_or_name_the_override(case):
    raw, overrides = case
    _load(raw, overrides)


# --- whole files, through load_config and the CLI ----------------------------------------------

FILE_BREAKAGE = [
    b"\xff\xfe\x00bad utf-8\n",
    b"data: {train: {type: arithmetic, size: 3}}\n\x80\x81\n",
    b"- a list\n- not a mapping\n",
    b"",
    b"key: [unclosed\n",
    b"a: 1\na: 2\n",
    b"policy:\n\tlr: 1\n",
    b"!!python/object/apply:os.system ['touch pwned']\n",
    b"defaults: ~nobody_here/base.yaml\n",
    b"defaults: [1, 2]\n",
    b"defaults: .\n",
    b"defaults: self.yaml\n",
    b"defaults: missing.yaml\n",
    b"defaults: ''\n",
    b"defaults: \"a\\0b.yaml\"\n",
    b"&a [*a]\n",
]


@settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(FILE_BREAKAGE) | st.binary(max_size=40), st.sampled_from(sorted(RESOLVED)))
def test_broken_recipe_files_are_config_errors(tmp_path_factory, text, name):
    path = tmp_path_factory.mktemp("recipe") / "self.yaml"
    path.write_bytes(yaml.safe_dump(RESOLVED[name]).encode() + b"\n" + text if text.startswith(b"data") else text)
    try:
        load_config(path, RecipeConfig)
    except ConfigError as error:
        assert str(path) in str(error)
    assert not (Path.cwd() / "pwned").exists()


@pytest.mark.parametrize(
    "text",
    [
        b"policy: {optimizer: {lr: .nan}}\n",  # a float replaced by nan
        b"grpo: {num_prompts_per_step: [1]}\n",  # an int replaced by a list
        b"env: {name: weighted, options: {components: [{name: 3, weight: 1, label: a}]}}\n",
        b"\xff\xfe not utf-8\n",
    ],
)
def test_cli_validate_on_a_mutated_recipe_prints_the_error_without_traceback(tmp_path, capsys, text):
    base = RECIPES_DIR / "quickstart.yaml"
    path = tmp_path / "mutated.yaml"
    path.write_bytes(f"defaults: {base}\n".encode() + text if not text.startswith(b"\xff") else text)
    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and "Traceback" not in err, err


def test_cli_subprocess_exit_code_and_message(tmp_path):
    path = tmp_path / "mutated.yaml"
    path.write_text(f"defaults: {RECIPES_DIR / 'quickstart.yaml'}\ngrpo: {{seed: [oops]}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "posttrain.cli.main", "validate", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "grpo.seed" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_fuzzed_bases_are_valid():
    """Mutations start from valid configs: the shipped recipes and the seeded variants."""
    for name, raw in RESOLVED.items():
        assert isinstance(validate_config(raw, RecipeConfig), RecipeConfig), name
