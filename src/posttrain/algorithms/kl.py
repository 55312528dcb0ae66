"""Per-token KL estimators between the policy and a reference (Schulman 2020,
http://joschu.net/blog/kl-approx.html), as NeMo-RL's `calculate_kl`."""

from typing import Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]

K3_LOG_RATIO_CLAMP = 20.0
K3_OUTPUT_CLAMP = 10.0


def kl_penalty(logprobs_BT: Tensor, ref_logprobs_BT: Tensor, kind: KLKind) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token logprobs (nats).

    k1 = lp - lp_ref
    k2 = (lp - lp_ref)^2 / 2
    k3 = exp(logr) - 1 - logr with logr = clamp(lp_ref - lp, -20, 20), output clamped to
         [-10, 10] (k3 >= 0, so effectively <= 10).

    Gradients flow through logprobs_BT (and ref_logprobs_BT if it requires grad).
    """
    if kind == "k1":
        return logprobs_BT - ref_logprobs_BT
    if kind == "k2":
        return (logprobs_BT - ref_logprobs_BT).square() / 2
    if kind == "k3":
        log_ratio_BT = (ref_logprobs_BT - logprobs_BT).clamp(
            min=-K3_LOG_RATIO_CLAMP, max=K3_LOG_RATIO_CLAMP
        )
        k3_BT = torch.exp(log_ratio_BT) - 1 - log_ratio_BT
        return k3_BT.clamp(min=-K3_OUTPUT_CLAMP, max=K3_OUTPUT_CLAMP)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of 'k1', 'k2', 'k3'")
