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

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algorithms.reward_shaping import overlong_reward_penalty, scale_rewards
from posttrain.config.schema import GRPOConfig
from posttrain.data.batching import right_padded_rows
from posttrain.data.prompts import Prompt
from posttrain.environments import Environment, scoring_metadata
from posttrain.metrics.console import Console
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


class GroupScorer:
    """Scores each prompt's group as soon as its last response is final (the engine's
    `on_finished`): on one worker thread while the engine decodes the rest, for an environment
    that `overlaps_generation` (Environment), else all at the end. The worker takes every group
    ready so far in one `score` call, so a verifier pool still sees large batches."""

    def __init__(self, env: Environment, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], num_generations: int):
        self.env, self.tokenizer, self.prompts, self.num_generations = env, tokenizer, prompts, num_generations
        self.rollouts: list[Rollout | None] = [None] * len(prompts)
        self.responses: list[str | None] = [None] * len(prompts)
        self.rewards: list[float | None] = [None] * len(prompts)
        self.busy_seconds = 0.0  # in score calls, overlapped or not
        self._left = [num_generations] * (len(prompts) // num_generations)  # responses each group awaits
        self._ready: list[int] = []  # sample indices of finished groups not yet scored
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="posttrain-scoring") if getattr(env, "overlaps_generation", False) else None
        self._futures: list[Future] = []

    def finished(self, index: int, rollout: Rollout) -> None:
        self.rollouts[index] = rollout
        group = index // self.num_generations
        self._left[group] -= 1
        if self._left[group] == 0:
            with self._lock:
                self._ready += range(group * self.num_generations, (group + 1) * self.num_generations)
            if self._worker is not None:
                self._futures.append(self._worker.submit(self._score_ready))

    def results(self, rollouts: list[Rollout]) -> tuple[list[str], list[float]]:
        """Responses and raw rewards in order, once every group is scored (an engine that never
        called `finished` gets its groups scored here); a scoring error is raised here."""
        for index, rollout in enumerate(rollouts):
            if self.rollouts[index] is None:
                self.finished(index, rollout)
        try:
            for future in self._futures:
                future.result()
        finally:
            if self._worker is not None:
                self._worker.shutdown()
        self._score_ready()  # what is left: everything, without a worker
        return self.responses, self.rewards

    def _score_ready(self) -> None:
        with self._lock:
            indices, self._ready = self._ready, []
        if not indices:
            return
        start = time.perf_counter()
        responses = [self.tokenizer.decode(self.rollouts[i].token_ids, skip_special_tokens=True) for i in indices]
        rewards = self.env.score(
            [self.prompts[i].text for i in indices], responses, [scoring_metadata(self.prompts[i].sample) for i in indices]
        )
        for index, response, reward in zip(indices, responses, rewards, strict=True):
            self.responses[index], self.rewards[index] = response, reward
        self.busy_seconds += time.perf_counter() - start


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
    console: Console | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sample `num_generations` responses per prompt and score them (overlapped with generation
    where the environment allows: GroupScorer). Tensors are [P, G, ...].

    The second result holds additive metrics, which the caller sums over generation batches:
    timings in seconds (timing/scoring: what scoring adds after generation ends;
    timing/scoring_busy: the time in score calls, overlapped or not) and train/empty_responses
    (a count of responses). A `console` shows the rollout's and scoring's progress.
    """
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    repeated = [prompt for prompt in prompts for _ in range(num_generations)]
    multimodal = [p.multimodal for p in repeated] if images is not None else None
    scorer = GroupScorer(env, tokenizer, repeated, num_generations)
    console = console or Console(enabled=False)
    console.phase("rollout", total=len(repeated))

    def finished(index: int, rollout: Rollout) -> None:
        scorer.finished(index, rollout)
        console.phase_advance(tokens=len(rollout.token_ids))

    rollouts = engine.generate([p.token_ids for p in repeated], params, multimodal, on_finished=finished)
    metrics["timing/generation"] = time.perf_counter() - start

    start = time.perf_counter()
    console.phase("scoring")
    responses, raw_rewards = scorer.results(rollouts)
    raw_rewards_N = torch.tensor(raw_rewards, dtype=torch.float32)
    metrics["timing/scoring"] = time.perf_counter() - start
    metrics["timing/scoring_busy"] = scorer.busy_seconds
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
