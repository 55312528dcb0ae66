"""Token sampling shared by the rollout engines: truncation (top-k, top-p) and exponential-race draws."""

from __future__ import annotations

import torch


def truncate_logits(logits_BV: torch.Tensor, top_p: float, top_k: int | None) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. The most likely token is always kept."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_value_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_value_B1, float("-inf"))
    if top_p < 1.0:
        sorted_logits_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        sorted_probs_BV = torch.softmax(sorted_logits_BV, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        mass_before_BV = sorted_probs_BV.cumsum(dim=-1) - sorted_probs_BV
        drop_sorted_BV = mass_before_BV >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def exponential_race(logits_BV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row drawn from softmax(logits_BV): argmax of p / E with E ~ Exp(1) i.i.d.
    (the Gumbel-max trick). Unlike torch.multinomial it never asserts on a row of NaNs, which an
    empty slot of the continuous-batching engine may hold, and needs no normalization."""
    noise_BV = torch.empty_like(logits_BV).exponential_(generator=generator)
    return (logits_BV - noise_BV.log()).argmax(dim=-1)
