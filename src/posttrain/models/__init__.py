"""Models: loading local checkpoints through the family registry, and the logprobs everything shares.

    from posttrain.models import load_policy, token_logprobs

    policy = load_policy("path/to/checkpoint")              # fp32 masters; multimodal if the checkpoint is
    text = load_policy("path/to/checkpoint", text_only=True)  # only the language model, real weights
    logprobs_BT1 = token_logprobs(policy, input_ids_BT, attention_mask_BT, temperature=1.0)

See docs/models.md for each family's quirks and how posttrain handles them.
"""

from posttrain.models.activation_checkpointing import enable_activation_checkpointing
from posttrain.models.freezing import FreezeConfigError, apply_freeze_config
from posttrain.models.loading import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    RemoteCodeError,
    load_policy,
    load_processor,
    load_tokenizer,
    stop_token_ids,
)
from posttrain.models.logprobs import token_logprobs
from posttrain.models.registry import FAMILIES, family_for

__all__ = [
    "FAMILIES",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "FreezeConfigError",
    "RemoteCodeError",
    "apply_freeze_config",
    "enable_activation_checkpointing",
    "family_for",
    "load_policy",
    "load_processor",
    "load_tokenizer",
    "stop_token_ids",
    "token_logprobs",
]
