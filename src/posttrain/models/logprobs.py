"""Per-token logprobs of a causal LM: the one definition trainer and generator share.

The order is fixed: lm_head -> final-logit softcap (inside the transformers model for Gemma) ->
temperature -> log_softmax over the full vocabulary -> gather. The rollout engine reports
logprobs of exactly this distribution, so `train/token_mult_prob_error` compares like with like.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens, so left- and right-padded rows get the same positions."""
    return (attention_mask_BT.long().cumsum(dim=-1) - 1).clamp(min=0)


def logprobs_from_logits(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target], computed in fp32."""
    logprobs_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return logprobs_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def token_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """logprobs_BT[b, t] = log p(input_ids[b, t] | input_ids[b, :t]); column 0 is 0.

    Padding positions get meaningless values; callers mask them.
    """
    logits_BTV = model(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids_from_mask(attention_mask_BT),
        use_cache=False,
    ).logits
    shifted_BT = logprobs_from_logits(logits_BTV[:, :-1], input_ids_BT[:, 1:], temperature)
    return torch.nn.functional.pad(shifted_BT, (1, 0), value=0.0)
