"""Activation checkpointing per decoder layer, always non-reentrant.

Reentrant checkpointing (`use_reentrant=True`) re-runs each layer's forward inside autograd's
backward with fresh inputs. Gemma 4's KV-shared layers read K/V computed by an earlier layer and
passed through forward outside the layer's inputs, so under reentrant checkpointing the gradient
through them is wrong, silently (measured on the tiny E-series model: gradients off by up to
~240 against the plain backward, while a model without KV sharing is exact either way; see
tests/unit/test_model_parity.py). Non-reentrant checkpointing is exact.
"""

from __future__ import annotations

import torch

NON_REENTRANT = {"use_reentrant": False}


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (transformers' per-layer hook)."""
    # transformers 5.24 renamed gradient_checkpointing_enable (deprecated until v6) to
    # activation_checkpointing_enable; the device image runs 5.17, which has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=NON_REENTRANT)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NON_REENTRANT)


def is_activation_checkpointing(model: torch.nn.Module) -> bool:
    """True when some layer of `model` recomputes its activations in backward."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
