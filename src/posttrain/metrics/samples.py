"""Sample generations of a GRPO step as text, for the loggers (logger.sample_generations)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def rollout_samples(
    groups: dict[str, torch.Tensor], tokenizer: PreTrainedTokenizerBase, *, step: int, count: int
) -> list[dict[str, Any]]:
    """The first `count` responses of a step's [P, G, ...] prompt groups, whole groups first, with
    their prompt (decoded from the row, chat template included, special tokens dropped), raw reward
    (the environment's score), shaped reward (after scaling and overlong shaping), length in tokens
    and whether generation hit max_new_tokens."""
    num_groups, num_generations = groups["rewards"].shape
    samples = []
    for row in range(min(count, num_groups * num_generations)):
        group, member = divmod(row, num_generations)
        input_ids_T = groups["input_ids"][group, member]
        response_T = groups["response_mask"][group, member].bool()
        prompt_T = groups["attention_mask"][group, member].bool() & ~response_T
        samples.append(
            {
                "step": step,
                "group": group,
                "prompt": tokenizer.decode(input_ids_T[prompt_T].tolist(), skip_special_tokens=True),
                "response": tokenizer.decode(input_ids_T[response_T].tolist(), skip_special_tokens=True),
                "reward": float(groups["raw_rewards"][group, member]),
                "shaped_reward": float(groups["rewards"][group, member]),
                "response_tokens": int(groups["lengths"][group, member]),
                "truncated": bool(groups["truncated"][group, member]),
            }
        )
    return samples
