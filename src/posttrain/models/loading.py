"""Loading a local Hugging Face checkpoint directory as a trainable policy.

Weights load from safetensors only (single file or sharded with an index): a pickle file
(`pytorch_model.bin`, `*.pt`) is never read, even beside the safetensors. A checkpoint's own
Python code (an `auto_map` in one of its JSON configs) never runs unless the caller passes
`trust_remote_code=True` (recipe: `policy.trust_remote_code`); without it such a checkpoint is a
`RemoteCodeError`, raised before transformers reads anything. The model class and
the checkpoint-key rules come from the model's family (`posttrain.models.registry`). After the
rules, any missing, unexpected or shape-mismatched weight is a `CheckpointMismatchError` listing
the keys, never a silently random-initialized model; the only keys a load may leave out are the
ones its family drops on purpose (the vision/audio towers of a text-only load) and those
transformers itself marks as unused (e.g. Gemma 4's KV-shared layers' k/v projections).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin

from posttrain.models.experts import AUTOCAST_GROUPED_MM
from posttrain.models.family import is_dropped_key
from posttrain.models.registry import family_for

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint's weights do not cover the model exactly."""


class CheckpointNotFoundError(FileNotFoundError):
    """The path is not a Hugging Face checkpoint directory with safetensors weights."""


class RemoteCodeError(ValueError):
    """The checkpoint ships Python code of its own and the caller did not allow running it."""


# JSON files of a checkpoint that are data, not settings: transformers reads no auto_map from them.
_NOT_SETTINGS = ("tokenizer.json", SHARD_INDEX)


def _auto_maps(value: Any, where: str = "") -> list[str]:
    """Key paths of every `auto_map` in a parsed JSON value (processor configs nest them)."""
    if isinstance(value, dict):
        found = [f"{where}auto_map"] if "auto_map" in value else []
        return found + [path for key, child in value.items() for path in _auto_maps(child, f"{where}{key}.")]
    if isinstance(value, list):
        return [path for index, child in enumerate(value) for path in _auto_maps(child, f"{where}{index}.")]
    return []


def check_remote_code(path: str | Path, *, trust_remote_code: bool) -> None:
    """Refuse a checkpoint whose configs name custom code (`auto_map`) unless `trust_remote_code`.

    transformers runs the Python files an `auto_map` names when trust_remote_code=True and, when
    it is left unset, may even ask on stdin; posttrain always passes an explicit value and checks
    here first, so that an untrusted checkpoint fails with one clear error whatever transformers'
    rules for its model type are.
    """
    if trust_remote_code:
        return
    path = Path(path)
    found = []
    for file in sorted(path.glob("*.json")):
        if file.name in _NOT_SETTINGS:
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # not valid JSON: transformers reports it when it reads the file
        found += [f"{file.name}: {key}" for key in _auto_maps(data)]
    if found:
        raise RemoteCodeError(
            f"{path}: the checkpoint ships its own Python code ({'; '.join(found)}), and posttrain does not run a "
            "checkpoint's code unless allowed: set policy.trust_remote_code: true (the reward_model environment: "
            "trust_remote_code: true) only for a checkpoint you trust. If transformers supports the architecture "
            "itself, deleting the auto_map entries loads it with transformers' own code instead."
        )


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints its own load report; posttrain raises with the keys instead."""
    previous, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        if bars:  # `posttrain` turns them off for the whole run (its console shows progress): leave them off
            transformers.logging.enable_progress_bar()


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CheckpointNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    if not (path / SINGLE_FILE).is_file() and not (path / SHARD_INDEX).is_file():
        found = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".safetensors"})
        raise CheckpointNotFoundError(
            f"{path}: no {SINGLE_FILE} or {SHARD_INDEX} (found {found or 'no weight files'}); posttrain loads "
            "safetensors only, never pickle files: convert with transformers' save_pretrained(safe_serialization=True)"
        )


def load_policy(
    path: str | Path, *, text_only: bool = False, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> torch.nn.Module:
    """Load a causal LM (or, for a multimodal checkpoint, its multimodal model) with `dtype` weights.

    `dtype` defaults to fp32: the trainer's master weights, whatever dtype the checkpoint stores.
    `text_only=True` loads only the language model of a multimodal checkpoint: its real weights,
    renamed by the family's key rules; the towers' weights are dropped. `trust_remote_code`: run
    the checkpoint's own modeling code (see `check_remote_code`).
    """
    path = Path(path)
    _check_checkpoint_dir(path)
    check_remote_code(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    family = family_for(config)
    model_class, model_config = family.model_class_and_config(config, text_only=text_only)
    loads_text_only = family.is_multimodal(config) and text_only
    rules = family.text_only_key_rules if loads_text_only else ()
    with _quiet_transformers():
        model, info = model_class.from_pretrained(
            path,
            config=model_config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            key_mapping={f"^(?:{rule.pattern})": rule.replacement for rule in rules} or None,  # as map_checkpoint_key
        )
    dropped = family.text_only_dropped_keys if loads_text_only else ()
    problems = {
        "missing": sorted(map(str, info.get("missing_keys") or [])),
        "unexpected": sorted(str(k) for k in info.get("unexpected_keys") or [] if not is_dropped_key(str(k), dropped)),
        "shape-mismatched": sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []),
    }
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{len(keys)} {kind} keys: {', '.join(keys[:12])}" for kind, keys in problems.items())
        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not match {model_class.__name__} (family {family.name}): {listed}"
        )
    use_grouped_experts(model)
    return model


def use_grouped_experts(model: torch.nn.Module) -> bool:
    """Mixture-of-experts layers run their experts as grouped GEMMs (torch's grouped_mm, with
    transformers' fallback where it is unavailable; in the autocast dtype, `experts.py`) instead of
    transformers' default Python loop over experts; same values (tests/unit/test_loading.py).
    Returns whether the model has experts."""
    if not getattr(model.config.get_text_config(), "enable_moe_block", False):
        return False
    model.set_experts_implementation(AUTOCAST_GROUPED_MM)
    return True


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_remote_code(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; posttrain renders prompts with it")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad token")
    return tokenizer


def has_vision_tower(model: torch.nn.Module) -> bool:
    """The policy was loaded with a vision tower (a multimodal checkpoint, not text-only)."""
    return getattr(model.config, "vision_config", None) is not None


def load_processor(path: str | Path, *, trust_remote_code: bool = False) -> ProcessorMixin:
    """The multimodal processor saved with a checkpoint (images -> pixel values + placeholder tokens)."""
    path = Path(path)
    check_remote_code(path, trust_remote_code=trust_remote_code)
    family = family_for(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    if family.load_processor is not None:
        return family.load_processor(path)  # a family's own processor classes: no remote code
    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def stop_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """The model config's eos ids (Gemma 4 instruction-tuned: <eos> and <turn|>)."""
    eos = model.config.get_text_config().eos_token_id
    return tuple(eos if isinstance(eos, list) else [eos])
