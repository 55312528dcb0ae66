"""reasoning-gym tasks scored by reasoning-gym's own `score_answer`.

The samples come from `posttrain.data.sources.load_reasoning_gym`, whose metadata names the task,
the dataset's size and seed, and the entry's index. The environment rebuilds that dataset and
entry (cached per process: the trainer's, or each worker's with num_workers > 0): generation is deterministic in the seed,
and the rebuilt entry keeps the exact Python values (tuples, sets) that some scorers compare,
which a JSON copy of the entry would not. As a tripwire, the rebuilt entry's answer must equal the
sample's ground truth (it would not if the reasoning-gym version changed between loading and
scoring); a mismatch counts as a verifier error.

Answer extraction (reasoning-gym 0.1.25): scorers expect the bare answer. With the default
answer_format="answer_tags", the answer is `reasoning_gym.utils.extract_answer(response)`: the
content of the *last* <answer>...</answer> pair, stripped, or None when there is none, which
every scorer treats as 0.0 (prompt the model accordingly, e.g. reasoning_gym.utils.SYSTEM_PROMPTS).
answer_format="raw" passes the whole stripped response instead.

Rewards are in [0, 1] and NOT always binary: the base `ProceduralDataset.score_answer` gives 1.0
for an exact match and len(answer_oracle)/len(answer) when the oracle is a substring of the
answer (chain_sum, oracle "1692": "x1692" -> 0.8, "The answer is 1692" -> 0.22); a wrong number
such as "1693" gets 0.0. Task-specific scorers have their own rules.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from posttrain.environments.base import ScoringStats, score_each
from posttrain.environments.workers import verifier_pool

AnswerFormat = Literal["answer_tags", "raw"]


class ReasoningGymEnvironment:
    """Reward = reasoning-gym's `score_answer(extracted answer, entry)` for the sample's task.

    Options (the recipe's `env.options`):
      answer_format: "answer_tags" (default) or "raw"; see the module docstring.
      num_workers: 0 (default) scores in this process; N > 0 scores in a pool of N worker
        processes (`posttrain.environments.workers`), in parallel. Each worker rebuilds and caches
        the datasets it needs.
      call_timeout_s: with num_workers > 0, the bound in seconds on one response's call
        (default 10.0; the first call of a task in a worker includes rebuilding its dataset);
        a call past it is killed (its worker replaced) and counts in env/verifier_timeouts.
        Setting it without workers is an error (in-process calls have no bound).
    """

    overlaps_generation = True  # CPU verifiers (see Environment)

    def __init__(
        self,
        answer_format: AnswerFormat = "answer_tags",
        *,
        num_workers: int = 0,
        call_timeout_s: float | None = None,
    ) -> None:
        if answer_format not in ("answer_tags", "raw"):
            raise ValueError(f"answer_format must be 'answer_tags' or 'raw', got {answer_format!r}")
        self.answer_format = answer_format
        self._score_one = functools.partial(score_reasoning_gym, answer_format=answer_format)
        self._pool = verifier_pool(num_workers, call_timeout_s)
        self._stats = ScoringStats()

    def score(
        self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]
    ) -> list[float]:
        return score_each(self._score_one, prompts, responses, metadata, self._stats, self._pool)

    def pop_metrics(self) -> dict[str, float]:
        return self._stats.pop()

    def close(self) -> None:
        """Stop the worker processes, if any (they also stop at interpreter exit)."""
        if self._pool is not None:
            self._pool.close()


def score_reasoning_gym(
    prompt: str, response: str, metadata: dict[str, Any], *, answer_format: AnswerFormat
) -> float:
    """One response's reward. Module-level with plain options, so that worker processes can unpickle it."""
    config_json = json.dumps(metadata["reasoning_gym_config"], sort_keys=True)
    dataset_key = (metadata["reasoning_gym_task"], metadata["reasoning_gym_size"], metadata["reasoning_gym_seed"])
    dataset = _dataset(*dataset_key, config_json)
    entry = _entry(*dataset_key, config_json, metadata["entry_index"])
    if metadata["ground_truth"] is not None and str(entry["answer"]) != metadata["ground_truth"]:
        raise RuntimeError(
            f"rebuilt reasoning_gym entry has answer {entry['answer']!r} but the sample's "
            f"ground truth is {metadata['ground_truth']!r}; was reasoning_gym upgraded since "
            "the data was loaded?"
        )
    return dataset.score_answer(_extract(response, answer_format), entry)


def _extract(response: str, answer_format: AnswerFormat) -> str | None:
    if answer_format == "raw":
        return response.strip()
    from reasoning_gym.utils import extract_answer

    return extract_answer(response)


# Rebuilt once per process (the trainer's, or each worker's) and kept: generation is deterministic.
@functools.cache
def _dataset(task: str, size: int, seed: int, config_json: str) -> Any:
    from posttrain.data.sources import reasoning_gym_dataset

    return reasoning_gym_dataset(task, size=size, seed=seed, config=json.loads(config_json))


@functools.cache
def _entry(task: str, size: int, seed: int, config_json: str, index: int) -> dict[str, Any]:
    return _dataset(task, size, seed, config_json)[index]
