"""What posttrain needs to know about a model family, as plain data plus small pure functions.

Each family's quirks live in its own file (`gemma4.py`, `generic.py`) as one `ModelFamily`
value; `registry.py` maps a config's `model_type` to it. Nothing else in posttrain branches on
model names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig, ProcessorMixin


@dataclass(frozen=True)
class KeyRule:
    """Rename checkpoint keys matching `pattern` (a regex anchored at the key's start) to `replacement`.

    A family's rules must be idempotent: applying them to already-renamed keys changes nothing,
    so a checkpoint saved by posttrain (already in the target layout) loads through the same rules.
    """

    pattern: str
    replacement: str


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # (config) -> the transformers class that trains on text only / with its multimodal towers.
    text_model_class: Callable[[PretrainedConfig], type]
    multimodal_model_class: Callable[[PretrainedConfig], type] | None
    # The multimodal config's model types (a text-only load of one keeps only its text config).
    multimodal_model_types: tuple[str, ...] = ()
    # Applied to checkpoint keys when loading text-only from a multimodal checkpoint.
    text_only_key_rules: tuple[KeyRule, ...] = ()
    # Regexes of checkpoint keys a text-only load drops on purpose (the towers it does not build).
    text_only_dropped_keys: tuple[str, ...] = ()
    # Freezable parts of the multimodal model: name -> parameter-name prefixes.
    towers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Config attributes holding token ids that stand for multimodal content (never generated).
    placeholder_token_attrs: tuple[str, ...] = ()
    # (config, input_ids_BT) -> mm_token_type_ids_BT, for families whose multimodal forward reads them.
    mm_token_type_ids: Callable[[PretrainedConfig, torch.Tensor], torch.Tensor] | None = None
    # Logprobs from the backbone's hidden states through lm_head + softcap (exactly what the
    # transformers head does for this family), instead of the model's own full forward.
    head_from_hidden_states: bool = False
    # Inputs the multimodal forward accepts beside input_ids / attention_mask / position_ids.
    multimodal_input_names: tuple[str, ...] = ()
    # The continuous engine's decoder stack can embed this family's images (else: the torch engine).
    continuous_engine_images: bool = False
    # (checkpoint dir) -> its multimodal processor; None: transformers' AutoProcessor.
    load_processor: Callable[[Path], ProcessorMixin] | None = None
    # (config) -> whether it is a multimodal config, for families without a fixed list of types.
    multimodal_config: Callable[[PretrainedConfig], bool] | None = None
    # (model, input_ids_BT, attention_mask_BT, multimodal inputs) -> the forward's position_ids,
    # for families whose positions are not the real tokens' count (multimodal rotary positions).
    position_ids: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor] | None = None

    def is_multimodal(self, config: PretrainedConfig) -> bool:
        if self.multimodal_config is not None:
            return self.multimodal_config(config)
        return config.model_type in self.multimodal_model_types

    def model_class_and_config(self, config: PretrainedConfig, *, text_only: bool) -> tuple[type, PretrainedConfig]:
        if self.is_multimodal(config) and not text_only:
            if self.multimodal_model_class is None:
                raise ValueError(f"model_type {config.model_type!r}: multimodal loading is not supported; load text-only")
            return self.multimodal_model_class(config), config
        text_config = config.get_text_config() if self.is_multimodal(config) else config
        return self.text_model_class(text_config), text_config

    def placeholder_token_ids(self, config: PretrainedConfig) -> tuple[int, ...]:
        if not self.is_multimodal(config):
            return ()
        ids = (getattr(config, attr, None) for attr in self.placeholder_token_attrs)
        return tuple(i for i in ids if i is not None)


def map_checkpoint_key(key: str, rules: tuple[KeyRule, ...]) -> str:
    for rule in rules:
        key = re.sub(f"^(?:{rule.pattern})", rule.replacement, key)
    return key


def is_dropped_key(key: str, dropped_patterns: tuple[str, ...]) -> bool:
    return any(re.match(pattern, key) for pattern in dropped_patterns)


def final_logit_softcap(config: PretrainedConfig) -> float | None:
    """The cap of logits = cap * tanh(logits / cap), or None (Gemma 2/3/4 set it; most families do not)."""
    return getattr(config.get_text_config(), "final_logit_softcapping", None)


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): the order Gemma's head uses (not logits * tanh(logits / cap))."""
    if cap is None:
        return logits
    return cap * torch.tanh(logits / cap)
