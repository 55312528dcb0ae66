"""reasoning-gym tasks scored by reasoning-gym's own `score_answer`.

The samples come from `posttrain.data.sources.load_reasoning_gym`, whose metadata names the task,
the dataset's size and seed, and the entry's index. The environment rebuilds that dataset (cached
per (task, size, seed)) and the entry (cached per index): generation is deterministic in the seed,
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

import json
from typing import Any, Literal

from posttrain.environments.base import ScoringStats, score_each

AnswerFormat = Literal["answer_tags", "raw"]


class ReasoningGymEnvironment:
    """Reward = reasoning-gym's `score_answer(extracted answer, entry)` for the sample's task."""

    def __init__(self, answer_format: AnswerFormat = "answer_tags") -> None:
        if answer_format not in ("answer_tags", "raw"):
            raise ValueError(f"answer_format must be 'answer_tags' or 'raw', got {answer_format!r}")
        self.answer_format = answer_format
        self._stats = ScoringStats()
        self._datasets: dict[tuple[str, int, int], Any] = {}
        self._entries: dict[tuple[str, int, int, int], dict[str, Any]] = {}

    def score(
        self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]
    ) -> list[float]:
        return score_each(self._score_one, prompts, responses, metadata, self._stats)

    def pop_metrics(self) -> dict[str, float]:
        return self._stats.pop()

    def _score_one(self, prompt: str, response: str, metadata: dict[str, Any]) -> float:
        dataset, entry = self._entry(metadata)
        if (
            metadata["ground_truth"] is not None
            and str(entry["answer"]) != metadata["ground_truth"]
        ):
            raise RuntimeError(
                f"rebuilt reasoning_gym entry has answer {entry['answer']!r} but the sample's "
                f"ground truth is {metadata['ground_truth']!r}; was reasoning_gym upgraded since "
                "the data was loaded?"
            )
        return dataset.score_answer(self._extract(response), entry)

    def _extract(self, response: str) -> str | None:
        if self.answer_format == "raw":
            return response.strip()
        from reasoning_gym.utils import extract_answer

        return extract_answer(response)

    def _entry(self, metadata: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The reasoning-gym dataset and entry a sample came from, rebuilt once and cached."""
        from posttrain.data.sources import reasoning_gym_dataset

        task = metadata["reasoning_gym_task"]
        size = metadata["reasoning_gym_size"]
        seed = metadata["reasoning_gym_seed"]
        config = metadata["reasoning_gym_config"]
        index = metadata["entry_index"]
        dataset_key = (task, size, seed, json.dumps(config, sort_keys=True))
        if dataset_key not in self._datasets:
            self._datasets[dataset_key] = reasoning_gym_dataset(task, size=size, seed=seed, config=config)
        dataset = self._datasets[dataset_key]
        entry_key = (*dataset_key, index)
        if entry_key not in self._entries:
            self._entries[entry_key] = dataset[index]
        return dataset, self._entries[entry_key]
