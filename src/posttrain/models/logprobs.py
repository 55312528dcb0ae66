"""Per-token logprobs of a causal LM: the one definition trainer, reference and generator share.

The order is fixed: lm_head -> final-logit softcap -> temperature -> log_softmax over the full
vocabulary -> gather. For families whose head posttrain knows exactly (Gemma 4), the logprobs are
computed here from the backbone's hidden states, chunk by chunk (`chunked_logprobs.py`), so the
softcap is visible in posttrain's code (and tested against transformers' forward) and the
262k-vocabulary logits never exist for the whole batch; other families use the model's own forward. The
rollout engine reports logprobs of exactly this distribution, so `train/token_mult_prob_error`
compares like with like.
"""

from __future__ import annotations

import torch

from posttrain.models.chunked_logprobs import chunked_token_logprobs
from posttrain.models.family import final_logit_softcap
from posttrain.models.registry import family_for


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions counting only real tokens, so left- and right-padded rows get the same positions."""
    return (attention_mask_BT.long().cumsum(dim=-1) - 1).clamp(min=0)


def logprobs_from_logits(logits_BTV: torch.Tensor, targets_BT: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target], computed in fp32."""
    logprobs_BTV = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    return logprobs_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1)


def forward_inputs(
    model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, multimodal_inputs: dict
) -> dict:
    """Keyword inputs for `model`'s forward: ids, mask, positions, plus its family's multimodal inputs.

    A multimodal model of a family that reads `mm_token_type_ids` gets them derived from the
    placeholder ids in `input_ids_BT` (as its processor makes them; zeros for text) when the
    caller leaves them out. Multimodal inputs for a text-only model, or names the family does not
    know, are errors: transformers would accept and silently ignore them.
    """
    family = family_for(model.config)
    multimodal = family.is_multimodal(model.config)
    unknown = sorted(set(multimodal_inputs) - set(family.multimodal_input_names if multimodal else ()))
    if unknown:
        kind = f"{type(model).__name__} (family {family.name})"
        raise TypeError(f"{kind} does not take multimodal inputs {unknown}; it takes {list(family.multimodal_input_names) if multimodal else 'none'}")
    inputs = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT, **multimodal_inputs}
    if multimodal and family.mm_token_type_ids is not None and inputs.get("mm_token_type_ids") is None:
        inputs["mm_token_type_ids"] = family.mm_token_type_ids(model.config, input_ids_BT)
    if family.position_ids is not None:
        multimodal_only = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        inputs["position_ids"] = family.position_ids(model, input_ids_BT, attention_mask_BT, multimodal_only)
    else:
        inputs["position_ids"] = position_ids_from_mask(attention_mask_BT)
    return inputs


def token_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    **multimodal_inputs,
) -> torch.Tensor:
    """logprobs_BT1[b, t] = log p(input_ids[b, t + 1] | input_ids[b, : t + 1]), shape [B, T-1].

    Multimodal inputs (e.g. Gemma 4's `pixel_values`, `image_position_ids`, `mm_token_type_ids`)
    go to the model's forward. Padding positions get meaningless values; callers mask them.
    For families whose head posttrain computes (Gemma 4) the logits are never materialized for
    the whole batch: `chunked_token_logprobs` goes through `chunk_tokens` tokens at a time, in the
    forward and the backward.
    """
    inputs = forward_inputs(model, input_ids_BT, attention_mask_BT, multimodal_inputs)
    batch, width = input_ids_BT.shape
    sources_N = torch.arange(batch * width, device=input_ids_BT.device).view(batch, width)[:, :-1].reshape(-1)
    targets_BT1 = input_ids_BT[:, 1:]
    logprobs_N = _logprobs_from_positions(model, inputs, sources_N, targets_BT1.reshape(-1), temperature, chunk_tokens)
    return logprobs_N.view(targets_BT1.shape)


def _logprobs_from_positions(
    model: torch.nn.Module,
    inputs: dict,
    sources_N: torch.Tensor,
    targets_N: torch.Tensor,
    temperature: float,
    chunk_tokens: int | None,
) -> torch.Tensor:
    """logprobs_N of targets_N predicted at the flattened [B * T] positions sources_N."""
    if not family_for(model.config).head_from_hidden_states:
        logits_NV = model(**inputs, use_cache=False).logits.flatten(0, 1)[sources_N]
        return logprobs_from_logits(logits_NV, targets_N, temperature)
    hidden_NH = model.base_model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[sources_N]
    return chunked_token_logprobs(
        hidden_NH,
        model.get_output_embeddings().weight,
        targets_N,
        softcap=final_logit_softcap(model.config),
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )


def packed_token_logprobs(
    model: torch.nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """`token_logprobs` of right-padded rows computed as ONE packed sequence: the rows' real tokens
    are concatenated, positions restart at 0 for each row, and transformers' attention masks
    (which detect restarting positions when no 2-D mask is given) keep the rows from seeing each
    other. No compute is spent on padding. Returns the aligned layout: logprobs_BT[b, t] scores
    token t of row b (column 0 and padding are 0). Text only."""
    lengths = attention_mask_BT.sum(dim=-1).tolist()
    if any(attention_mask_BT[b, :n].sum() != n for b, n in enumerate(lengths)):
        raise ValueError("packing needs right-padded rows (each row's real tokens first)")
    device = input_ids_BT.device
    ids_1L = torch.cat([input_ids_BT[b, :n] for b, n in enumerate(lengths)]).unsqueeze(0)
    positions_1L = torch.cat([torch.arange(n, device=device) for n in lengths]).unsqueeze(0)
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    # scored token j + 1 from the hidden state at j, within each row
    source_N = torch.cat([torch.arange(s, s + n - 1, device=device) for s, n in zip(starts, lengths, strict=True)])
    rows_N = torch.cat([torch.full((n - 1,), b, device=device) for b, n in enumerate(lengths)])
    columns_N = torch.cat([torch.arange(1, n, device=device) for n in lengths])
    targets_N = ids_1L[0, source_N + 1]
    inputs = {"input_ids": ids_1L, "position_ids": positions_1L, "attention_mask": None}
    logprobs_N = _logprobs_from_positions(model, inputs, source_N, targets_N, temperature, chunk_tokens)
    logprobs_BT = torch.zeros(input_ids_BT.shape, dtype=logprobs_N.dtype, device=device)
    return logprobs_BT.index_put((rows_N, columns_N), logprobs_N)
