"""Loading a local Hugging Face checkpoint directory as a trainable policy.

Weights load from safetensors only (transformers refuses pickle files when `use_safetensors`
is set). A checkpoint whose weights do not match the model exactly (missing or unexpected keys)
is an error listing the keys, never a silently random-initialized model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


class CheckpointMismatchError(ValueError):
    """The checkpoint's weights do not cover the model exactly."""


def load_policy(path: str | Path) -> torch.nn.Module:
    """Load a causal LM with fp32 master weights (whatever dtype the checkpoint stores)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=torch.float32, use_safetensors=True, output_loading_info=True
    )
    problems = {kind: keys for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if (keys := info.get(kind))}
    if problems:
        listed = "; ".join(f"{kind}: {sorted(map(str, keys))[:10]}" for kind, keys in problems.items())
        raise CheckpointMismatchError(f"{path}: the checkpoint does not match {type(model).__name__}: {listed}")
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path}: the tokenizer has no chat template; posttrain renders prompts with it")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no pad token")
    return tokenizer


def stop_token_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """The model config's eos ids (Gemma 4 instruction-tuned: <eos> and <turn|>)."""
    eos = model.config.eos_token_id
    return tuple(eos if isinstance(eos, list) else [eos])
