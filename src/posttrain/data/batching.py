"""Right-padded rows of prompt + response tokens: the one layout the trainer consumes."""

from __future__ import annotations

import torch


def right_padded_rows(
    prompts: list[list[int]], responses: list[list[int]], *, pad_token_id: int, width: int | None = None
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (real tokens) and response_mask (response tokens), each [B, W].

    W is `width` when given (fixed-width rows concatenate across batches), else the longest row.
    """
    totals = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = width if width is not None else max(totals)
    if max(totals) > width:
        raise ValueError(f"a prompt + response of {max(totals)} tokens does not fit rows of width {width}")
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, response, total) in enumerate(zip(prompts, responses, totals)):
        input_ids[row, :total] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :total] = 1
        response_mask[row, len(prompt) : total] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
