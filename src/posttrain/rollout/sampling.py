"""Token sampling for the rollout engines: truncation (top-k, top-p) and exponential-race draws."""

from __future__ import annotations

from collections.abc import Callable

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


def sample_with_noise(
    logits_BV: torch.Tensor,
    log_noise_BV: torch.Tensor,
    temperature: float,
    top_p: float,
    top_k: int | None,
    banned_ids: torch.Tensor,
    stop_ids: torch.Tensor,
    too_short_B: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_B, logprobs_B): tokens drawn by exponential race (log_noise = log E, E ~ Exp(1))
    from the truncated distribution without banned tokens (and without stop tokens in rows that
    are too short); logprobs of those tokens under the full softmax(logits / temperature).
    A pure function, so that it can be compiled into a few fused kernels."""
    scaled_BV = logits_BV / temperature
    sampling_BV = truncate_logits(scaled_BV, top_p, top_k)
    if len(banned_ids):
        sampling_BV = sampling_BV.index_fill(-1, banned_ids, float("-inf"))
    if len(stop_ids):
        banned_stops_BS = too_short_B.unsqueeze(-1).expand(-1, len(stop_ids))
        sampling_BV = sampling_BV.scatter(
            -1, stop_ids.expand(len(too_short_B), -1),
            sampling_BV.gather(-1, stop_ids.expand(len(too_short_B), -1)).masked_fill(banned_stops_BS, float("-inf")),
        )
    tokens_B = (sampling_BV - log_noise_BV).argmax(dim=-1)
    logprobs_B = scaled_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled_BV, dim=-1)
    return tokens_B, logprobs_B


def first_stop_string_end(token_ids: list[int], decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]) -> int | None:
    """The shortest prefix length whose text contains a stop string, or None."""
    if not any(s in decode(token_ids) for s in stop_strings):
        return None
    return next(k for k in range(1, len(token_ids) + 1) if any(s in decode(token_ids[:k]) for s in stop_strings))
