"""The model-family registry: one table from a config's `model_type` to its family."""

from __future__ import annotations

from transformers import PretrainedConfig

from posttrain.models.family import ModelFamily
from posttrain.models.gemma4 import GEMMA4
from posttrain.models.generic import GENERIC

FAMILIES: dict[str, ModelFamily] = {
    "gemma4": GEMMA4,
    "gemma4_text": GEMMA4,
}


def family_for(config: PretrainedConfig) -> ModelFamily:
    """The registered family of `config.model_type`, else the generic causal-LM entry."""
    return FAMILIES.get(config.model_type, GENERIC)
