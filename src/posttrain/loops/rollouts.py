"""One generation batch: sample a group of responses per prompt, score them, shape rewards.

The result is a dict of tensors whose first dimension indexes prompt groups (P), padded to a
fixed width W = policy.max_total_sequence_length so that groups from different generation
batches (dynamic sampling) concatenate.

An empty response (nothing but special tokens, e.g. the model ends its turn at once, or only
whitespace) is kept: the environment scores it like any other (a verifier finds no answer: 0),
it trains like any other, and it is counted in train/empty_responses.

Prompts with images: the engine gets each prompt's images, and the groups carry an `image_index`
[P, G] into the run's `PromptImages` table (-1: text only), so that groups stay tensors through
dynamic sampling, its checkpointed carry-over and the gather over ranks.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algorithms.reward_shaping import overlong_reward_penalty, scale_rewards
from posttrain.config.schema import GRPOConfig
from posttrain.data.batching import right_padded_rows
from posttrain.data.prompts import Prompt
from posttrain.environments import Environment, scoring_metadata
from posttrain.rollout.base import MultimodalPrompt, Rollout, RolloutEngine, SamplingParams


class PromptImages:
    """The run's prompt images by index (prompts' order, text-only prompts skipped): a rollout
    group names its rows' images by index, and the training batch looks them up."""

    def __init__(self, prompts: list[Prompt]):
        self.table: list[MultimodalPrompt] = [p.multimodal for p in prompts if p.multimodal is not None]
        self._index = {id(m): i for i, m in enumerate(self.table)}

    def index(self, prompt: Prompt) -> int:
        return -1 if prompt.multimodal is None else self._index[id(prompt.multimodal)]

    def rows(self, index_B: torch.Tensor) -> tuple[MultimodalPrompt | None, ...]:
        return tuple(None if i < 0 else self.table[i] for i in index_B.tolist())


def pack_rollouts(rollouts: list[Rollout], width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + response (see `right_padded_rows`) plus the generator's logprobs."""
    packed = right_padded_rows(
        [r.prompt_token_ids for r in rollouts], [r.token_ids for r in rollouts], pad_token_id=pad_token_id, width=width
    )
    gen_logprobs = torch.zeros((len(rollouts), width), dtype=torch.float32)
    for row, rollout in enumerate(rollouts):
        start = len(rollout.prompt_token_ids)
        gen_logprobs[row, start : start + len(rollout.logprobs)] = torch.tensor(rollout.logprobs)
    return {**packed, "gen_logprobs": gen_logprobs}


def generate_and_score(
    prompts: list[Prompt],
    *,
    engine: RolloutEngine,
    params: SamplingParams,
    env: Environment,
    tokenizer: PreTrainedTokenizerBase,
    grpo: GRPOConfig,
    num_generations: int,
    width: int,
    images: PromptImages | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sample `num_generations` responses per prompt and score them. Tensors are [P, G, ...].

    The second result holds additive metrics, which the caller sums over generation batches:
    timings in seconds and train/empty_responses (a count of responses).
    """
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    repeated = [prompt for prompt in prompts for _ in range(num_generations)]
    multimodal = [p.multimodal for p in repeated] if images is not None else None
    rollouts = engine.generate([p.token_ids for p in repeated], params, multimodal)
    metrics["timing/generation"] = time.perf_counter() - start

    start = time.perf_counter()
    responses = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rollouts]
    raw_rewards_N = torch.tensor(
        env.score([p.text for p in repeated], responses, [scoring_metadata(p.sample) for p in repeated]),
        dtype=torch.float32,
    )
    metrics["timing/scoring"] = time.perf_counter() - start
    metrics["train/empty_responses"] = float(sum(not response.strip() for response in responses))

    lengths_N = torch.tensor([len(r.token_ids) for r in rollouts], dtype=torch.float32)
    truncated_N = torch.tensor([r.finish_reason == "length" for r in rollouts])
    rewards_N = raw_rewards_N.clone()
    if grpo.reward_scaling.enabled:
        s = grpo.reward_scaling
        rewards_N = scale_rewards(rewards_N, s.source_min, s.source_max, s.target_min, s.target_max)
    if grpo.reward_shaping.enabled:
        shaping = grpo.reward_shaping
        rewards_N = rewards_N + overlong_reward_penalty(
            lengths_N,
            max_response_length=shaping.max_response_length or params.max_new_tokens,
            overlong_buffer_length=shaping.overlong_buffer_length,
            penalty_factor=shaping.overlong_buffer_penalty,
        )

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(len(prompts), num_generations, *t.shape[1:])

    packed = pack_rollouts(rollouts, width, tokenizer.pad_token_id)
    groups = {key: grouped(value) for key, value in packed.items()}
    groups.update(
        rewards=grouped(rewards_N),
        raw_rewards=grouped(raw_rewards_N),
        lengths=grouped(lengths_N),
        truncated=grouped(truncated_N),
    )
    if images is not None:
        groups["image_index"] = grouped(torch.tensor([images.index(p) for p in repeated]))
    return groups, metrics
