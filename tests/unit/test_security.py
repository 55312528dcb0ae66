"""Security: no pickle weights, no checkpoint code unless allowed, no Python evaluated from a recipe.

- A source scan (src/ and benchmarks/) rejects `torch.load` without `weights_only=True`, pickle
  loads outside the verifier pool's own parent-to-worker channel, eval/exec/compile/__import__,
  unsafe YAML loaders, `trust_remote_code=True`, `from_pretrained` calls that leave
  `trust_remote_code` to transformers (which may then prompt on stdin), and posttrain's own
  loaders called inside the package without passing the recipe's flag on.
- A checkpoint whose configs name custom code (`auto_map`) is refused, and its Python files are
  never imported: they write a marker file when imported, and the marker must not exist.
- A directory with both safetensors and a pickle file loads the safetensors and never opens the
  pickle (a pickle that would write a marker when unpickled).
- Recipes: YAML python tags and a custom environment's import path run nothing at load time.
"""

from __future__ import annotations

import ast
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Qwen3Config, Qwen3ForCausalLM

import posttrain.models.generic as generic
import posttrain.models.loading as loading
from posttrain.config.loader import ConfigError, _RecipeYamlLoader, apply_overrides, load_recipe, validate_config
from posttrain.config.schema import RecipeConfig
from posttrain.environments.reward_model import load_reward_model
from posttrain.models.loading import RemoteCodeError, check_remote_code, load_policy, load_tokenizer

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SCANNED = sorted([*(REPO / "src").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")])

# (file relative to the repository, dotted call) -> why it is safe.
ALLOWED_PICKLE = {
    ("src/posttrain/environments/workers.py", "pickle.loads"): (
        "the verifier pool's worker unpickles the score function its own parent process pickled a moment "
        "before (posttrain code, sent over a private pipe); no file or network data is ever unpickled"
    ),
}
UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "cPickle.loads", "dill.load",
              "dill.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads", "shelve.open",
              "joblib.load", "pandas.read_pickle", "pd.read_pickle"}
EVALUATORS = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec"}
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all", "yaml.load_all"}
SAFE_YAML_LOADERS = {"_RecipeYamlLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}
# posttrain's own loaders: inside the package every call passes the recipe's flag on explicitly.
POSTTRAIN_LOADERS = {"load_policy", "load_tokenizer", "load_processor", "load_reward_model"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _scan(path: Path, root: Path = REPO) -> list[str]:
    relative = path.relative_to(root).as_posix()
    problems = []
    for node in ast.walk(ast.parse(path.read_text(), filename=relative)):
        if not isinstance(node, ast.Call):
            continue
        name, where = _dotted(node.func), f"{relative}:{node.lineno}"
        if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            problems.append(f"{where}: torch.load without weights_only=True")
        if name in UNPICKLERS and (relative, name) not in ALLOWED_PICKLE:
            problems.append(f"{where}: {name} (unpickling runs arbitrary code)")
        if name in EVALUATORS:
            problems.append(f"{where}: {name}() evaluates Python")
        if name in UNSAFE_YAML or (name == "yaml.load" and _dotted(_keyword(node, "Loader") or ast.Name("?")) not in SAFE_YAML_LOADERS):
            problems.append(f"{where}: {name} with a loader that can build Python objects")
        if _is_true(_keyword(node, "trust_remote_code")):
            problems.append(f"{where}: trust_remote_code=True hard-coded")
        if _is_true(_keyword(node, "allow_pickle")):
            problems.append(f"{where}: allow_pickle=True")
        if name in POSTTRAIN_LOADERS and relative.startswith("src/") and _keyword(node, "trust_remote_code") is None:
            problems.append(f"{where}: {name} without an explicit trust_remote_code (the recipe's flag must reach it)")
        receiver = name.rsplit(".", 1)[0]
        if name.endswith(".from_pretrained") and (receiver.startswith("Auto") or receiver[:1].islower()):
            if _keyword(node, "trust_remote_code") is None:
                problems.append(f"{where}: {name} without an explicit trust_remote_code")
    return problems


def test_source_scan_finds_no_unsafe_loading_or_evaluation():
    assert len(SCANNED) > 50
    problems = [problem for path in SCANNED for problem in _scan(path)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_claims_to(tmp_path):
    bad = tmp_path / "src" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import pickle, torch, yaml\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\npickle.loads(b'')\neval('1')\n"
        "yaml.load('a', Loader=yaml.Loader)\nAutoConfig.from_pretrained('p')\nf(trust_remote_code=True)\n"
        "load_policy('p')\ntorch.load('x', weights_only=True)\nyaml.load('a', Loader=yaml.SafeLoader)\n"
    )
    problems = _scan(bad, root=tmp_path)
    assert [int(problem.split(":")[1]) for problem in problems] == [2, 3, 4, 5, 6, 7, 8, 9], problems


def test_allow_listed_unpickling_is_still_there():
    """An allow-list entry whose call is gone must be removed, not left to cover a new one."""
    for relative, name in ALLOWED_PICKLE:
        tree = ast.parse((REPO / relative).read_text())
        assert any(isinstance(n, ast.Call) and _dotted(n.func) == name for n in ast.walk(tree)), (relative, name)


def test_recipe_yaml_loader_is_a_safe_loader():
    assert issubclass(_RecipeYamlLoader, yaml.SafeLoader)


# --- checkpoints with custom code ----------------------------------------------------------------


def _tiny_qwen3(path: Path) -> Path:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory) -> Path:
    return _tiny_qwen3(tmp_path_factory.mktemp("clean"))


def _with_custom_code(path: Path, *, model_type: str, config_file: str = "config.json") -> Path:
    """Add an auto_map and the Python files it names; importing either file writes `EXECUTED`."""
    marker = path / "EXECUTED"
    side_effect = f"from pathlib import Path\nPath({str(marker)!r}).write_text('custom code ran')\n"
    (path / "configuration_evil.py").write_text(side_effect + "from transformers import Qwen3Config as EvilConfig\n")
    (path / "modeling_evil.py").write_text(side_effect + "from transformers import Qwen3ForCausalLM as EvilModel\n")
    settings_file = path / config_file
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    settings["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    if config_file == "config.json":
        settings["model_type"] = model_type
    settings_file.write_text(json.dumps(settings))
    return marker


@pytest.mark.parametrize("model_type", ["evil_custom", "qwen3"], ids=["unknown-type", "known-type"])
def test_checkpoint_with_custom_code_is_refused_and_its_code_never_runs(tmp_path, model_type):
    """Unknown type: transformers would need the code. Known type: transformers would silently use
    its own class and ignore the auto_map; posttrain refuses both, before transformers reads a file."""
    path = _tiny_qwen3(tmp_path / "ckpt")
    marker = _with_custom_code(path, model_type=model_type)
    with pytest.raises(RemoteCodeError) as error:
        load_policy(path)
    message = str(error.value)
    assert "config.json: auto_map" in message and "policy.trust_remote_code: true" in message
    with pytest.raises(RemoteCodeError):
        load_tokenizer(path)
    with pytest.raises(RemoteCodeError, match="trust_remote_code: true"):
        load_reward_model(path, dtype=torch.float32)
    assert not marker.exists()
    assert "configuration_evil" not in sys.modules and "modeling_evil" not in sys.modules


def test_custom_code_named_by_the_tokenizer_config_is_refused_too(tmp_path):
    path = _tiny_qwen3(tmp_path / "ckpt")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    marker = _with_custom_code(path, model_type="qwen3", config_file="tokenizer_config.json")
    with pytest.raises(RemoteCodeError, match=r"tokenizer_config\.json: auto_map"):
        load_tokenizer(path)
    assert not marker.exists()


def test_nested_auto_map_is_found_and_trust_allows_it(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"auto_map": {"x": "m.X"}}}))
    with pytest.raises(RemoteCodeError, match=r"processor_config\.json: image_processor\.auto_map"):
        check_remote_code(tmp_path, trust_remote_code=False)
    check_remote_code(tmp_path, trust_remote_code=True)


class _Spy:
    """Stands in for a transformers Auto class: records the trust_remote_code it was given, then loads."""

    def __init__(self, real: type, calls: list[tuple[str, object]]) -> None:
        self.real, self.calls = real, calls

    def from_pretrained(self, *args, **kwargs):
        self.calls.append((self.real.__name__, kwargs.get("trust_remote_code", "not passed")))
        return self.real.from_pretrained(*args, **kwargs)


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_transformers_call_explicitly(clean_checkpoint, monkeypatch, trust):
    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(loading, "AutoConfig", _Spy(loading.AutoConfig, calls))
    monkeypatch.setattr(generic, "AutoModelForCausalLM", _Spy(generic.AutoModelForCausalLM, calls))
    load_policy(clean_checkpoint, trust_remote_code=trust)
    assert calls == [("AutoConfig", trust), ("AutoModelForCausalLM", trust)]


def test_recipe_flag_is_off_by_default_and_validated():
    raw = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert validate_config(raw, RecipeConfig).policy.trust_remote_code is False
    assert validate_config(apply_overrides(raw, ["policy.trust_remote_code=true"]), RecipeConfig).policy.trust_remote_code
    with pytest.raises(ConfigError, match="policy.trust_remote_code"):
        validate_config(apply_overrides(raw, ["policy.trust_remote_code=sure"]), RecipeConfig)


def test_reward_model_environment_takes_the_option():
    raw = load_recipe(REPO / "recipes" / "quickstart.yaml")
    raw["env"] = {"name": "reward_model", "options": {"model": "rm/", "trust_remote_code": False}}
    assert validate_config(raw, RecipeConfig).env.options["trust_remote_code"] is False


# --- safetensors only ---------------------------------------------------------------------------


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_beside_safetensors_is_never_read(clean_checkpoint, tmp_path):
    import shutil

    path = tmp_path / "both"
    shutil.copytree(clean_checkpoint, path)
    marker = tmp_path / "UNPICKLED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(marker)))
    (path / "model.bin").write_bytes(b"\x80\x04 not even a pickle")
    loaded = load_policy(path)
    expected = load_policy(clean_checkpoint)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not marker.exists()


# --- recipes never run Python ---------------------------------------------------------------------


def test_yaml_python_tags_are_config_errors_and_run_nothing(tmp_path):
    marker = tmp_path / "YAML_RAN"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"policy: !!python/object/apply:builtins.open [{str(marker)!r}, w]\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, [f"policy=!!python/object/apply:builtins.open [{str(marker)!r}, w]"])
    assert not marker.exists()


def test_custom_environment_import_path_is_not_imported_at_load_time(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_env_module.py").write_text(f"open({str(marker)!r}, 'w')\nclass Env: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raw = load_recipe(REPO / "recipes" / "quickstart.yaml")
    raw["env"] = {"name": "custom", "options": {"import_path": "evil_env_module:Env"}}
    validate_config(raw, RecipeConfig)
    raw["env"] = {"name": "weighted", "options": {"components": [
        {"name": "custom", "weight": 1.0, "options": {"import_path": "evil_env_module:Env"}}]}}  # fmt: skip
    validate_config(raw, RecipeConfig)
    assert not marker.exists() and "evil_env_module" not in sys.modules
