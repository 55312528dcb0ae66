"""Truncated importance sampling for the train/generate mismatch (Yao et al. 2025, "Your
efficient RL framework secretly brings you off-policy RL training").

The rollout engine samples from pi_gen, the trainer recomputes lp_old with the same weights;
numerics differ, so each token is reweighted by w = pi_old / pi_gen = exp(lp_old - lp_gen),
with no gradient, and w is truncated so that a few tokens cannot dominate the update.
"""

from typing import Literal

import torch
from torch import Tensor

TruncationKind = Literal["tis", "icepop", "seq-mask-tis"]


def raw_importance_weights(old_logprobs_BT: Tensor, gen_logprobs_BT: Tensor) -> Tensor:
    """w = exp(lp_old - lp_gen), detached; non-finite values (e.g. -inf - -inf) become 0."""
    weights_BT = torch.exp(old_logprobs_BT.detach() - gen_logprobs_BT.detach())
    return torch.nan_to_num(weights_BT, nan=0.0, posinf=0.0, neginf=0.0)


def sequence_geometric_mean_weights(
    old_logprobs_BT: Tensor, gen_logprobs_BT: Tensor, mask_BT: Tensor
) -> Tensor:
    """exp(masked mean over a sequence's tokens of (lp_old - lp_gen)), [B].

    A sequence without valid tokens gets 1 (mean log ratio 0).
    """
    valid_BT = mask_BT.bool()
    log_ratio_BT = torch.where(valid_BT, (old_logprobs_BT - gen_logprobs_BT).detach(), 0.0)
    log_ratio_BT = torch.nan_to_num(log_ratio_BT, nan=0.0, posinf=0.0, neginf=0.0)
    tokens_B = valid_BT.sum(dim=-1).clamp(min=1)
    return torch.exp(log_ratio_BT.sum(dim=-1) / tokens_B)


def importance_out_of_bounds(
    old_logprobs_BT: Tensor,
    gen_logprobs_BT: Tensor,
    mask_BT: Tensor,
    kind: TruncationKind,
    ratio_max: float,
    ratio_min: float = 0.0,
) -> Tensor:
    """bool [B, T]: True where truncation changed the weight.

    tis and icepop: the token's w is outside [ratio_min, ratio_max].
    seq-mask-tis: every token of a sequence whose geometric-mean weight is outside the bounds.
    Only positions where mask_BT is set can be True.
    """
    if kind == "seq-mask-tis":
        seq_weights_B = sequence_geometric_mean_weights(old_logprobs_BT, gen_logprobs_BT, mask_BT)
        oob_B = (seq_weights_B < ratio_min) | (seq_weights_B > ratio_max)
        oob_BT = oob_B.unsqueeze(-1).expand_as(mask_BT)
    elif kind in ("tis", "icepop"):
        weights_BT = raw_importance_weights(old_logprobs_BT, gen_logprobs_BT)
        oob_BT = (weights_BT < ratio_min) | (weights_BT > ratio_max)
    else:
        raise ValueError(f"unknown truncation kind {kind!r}")
    return oob_BT & mask_BT.bool()


def truncated_importance_weights(
    old_logprobs_BT: Tensor,
    gen_logprobs_BT: Tensor,
    mask_BT: Tensor,
    kind: TruncationKind | None,
    ratio_max: float | None,
    ratio_min: float = 0.0,
) -> Tensor:
    """Per-token importance weights w = exp(lp_old - lp_gen), truncated, no gradient.

    kind:
      None           w unchanged.
      "tis"          clamp(w, ratio_min, ratio_max).
      "icepop"       w if ratio_min <= w <= ratio_max else 0.
      "seq-mask-tis" 0 for every token of a sequence whose geometric-mean weight
                     exp(mean_t (lp_old - lp_gen)) is outside [ratio_min, ratio_max];
                     kept sequences keep their per-token, untruncated w (NeMo-RL's choice).
    Weights at masked-out positions are 0.

    Returns:
        weights_BT, dimensionless, detached.
    """
    valid_BT = mask_BT.bool()
    weights_BT = raw_importance_weights(old_logprobs_BT, gen_logprobs_BT)
    if kind is not None:
        if ratio_max is None:
            raise ValueError(f"truncation kind {kind!r} needs ratio_max")
        if kind == "tis":
            weights_BT = weights_BT.clamp(min=ratio_min, max=ratio_max)
        else:
            oob_BT = importance_out_of_bounds(
                old_logprobs_BT, gen_logprobs_BT, mask_BT, kind, ratio_max, ratio_min
            )
            weights_BT = torch.where(oob_BT, 0.0, weights_BT)
    return torch.where(valid_BT, weights_BT, 0.0)
