"""A short supervised warm start: teacher-forced cross-entropy on solved training prompts.

RL can only reinforce what the policy sometimes does; a random-init model never answers, so
the quickstart first shows it a few solved examples. The loss covers the answer tokens and the
end-of-turn token only (the prompt is context, not a target).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.schema import WarmStartConfig
from posttrain.data.batching import right_padded_rows
from posttrain.data.prompts import Prompt
from posttrain.models.logprobs import token_logprobs
from posttrain.rollout.base import image_inputs


def supervised_rows(
    prompts: list[Prompt], answers: list[str], tokenizer: PreTrainedTokenizerBase, end_of_turn_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer + end-of-turn rows, and the mask of supervised tokens."""
    answer_ids = [tokenizer.encode(answer, add_special_tokens=False) + [end_of_turn_id] for answer in answers]
    rows = right_padded_rows([p.token_ids for p in prompts], answer_ids, pad_token_id=tokenizer.pad_token_id)
    return rows["input_ids"], rows["attention_mask"], rows["response_mask"].float()


def warm_start(
    model: torch.nn.Module,
    prompts: list[Prompt],
    answer_of: Callable[[Prompt], str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: WarmStartConfig,
    *,
    end_of_turn_id: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run `cfg.num_steps` AdamW steps of answer-token cross-entropy; returns the loss per step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    model.train()
    losses = []
    device = next(model.parameters()).device
    for step in range(cfg.num_steps):
        batch = rng.sample(prompts, min(cfg.batch_size, len(prompts)))
        # An imperfect teacher: some answers are another prompt's answer (usually wrong).
        answers = [answer_of(rng.choice(prompts) if rng.random() < cfg.label_noise else p) for p in batch]
        input_ids, attention_mask, target_mask = (
            t.to(device) for t in supervised_rows(batch, answers, tokenizer, end_of_turn_id)
        )
        images = image_inputs([p.multimodal for p in batch], device=device)  # empty for text-only prompts
        logprobs_BT1 = token_logprobs(model, input_ids, attention_mask, **images)
        loss = -(logprobs_BT1 * target_mask[:, 1:]).sum() / target_mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses
