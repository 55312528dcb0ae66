"""The environment protocol and the per-sample scoring loop that contains verifier failures.

An environment turns (prompt, response) pairs into scalar rewards. The loop hands it, for each
response, the metadata dict built by `scoring_metadata(sample)`: the sample's own metadata plus
"ground_truth" and "origin".

A verifier that raises must not kill a training run: `score_each` gives that response reward
0.0, counts it in `env/verifier_errors`, logs the first traceback at WARNING (later ones at
DEBUG) and carries on. Mismatched batch lengths are a wiring bug and do raise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from posttrain.data.types import Sample

logger = logging.getLogger(__name__)

ScoreOne = Callable[[str, str, dict[str, Any]], float]


@runtime_checkable
class Environment(Protocol):
    """Scores a batch of responses; keeps counters that the loop pops once per step."""

    def score(
        self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]
    ) -> list[float]:
        """One reward per response; metadata[i] carries "ground_truth" and the task's extras."""
        ...

    def pop_metrics(self) -> dict[str, float]:
        """Counters accumulated since the last call (e.g. "env/verifier_errors"), then reset."""
        ...


def scoring_metadata(sample: Sample) -> dict[str, Any]:
    """The metadata dict an environment receives for a response to `sample`."""
    reserved = {"ground_truth", "origin"} & sample.metadata.keys()
    if reserved:
        raise ValueError(
            f"{sample.origin}: metadata keys {sorted(reserved)} are reserved for the environment"
        )
    return {**sample.metadata, "ground_truth": sample.ground_truth, "origin": sample.origin}


@dataclass
class ScoringStats:
    """Counters behind an environment's `pop_metrics`."""

    scored: int = 0
    verifier_errors: int = 0
    traceback_logged: bool = False  # only the first failure of an environment gets a traceback

    def pop(self) -> dict[str, float]:
        metrics = {
            "env/scored": float(self.scored),
            "env/verifier_errors": float(self.verifier_errors),
        }
        self.scored = 0
        self.verifier_errors = 0
        return metrics


def score_each(
    score_one: ScoreOne,
    prompts: list[str],
    responses: list[str],
    metadata: list[dict[str, Any]],
    stats: ScoringStats,
) -> list[float]:
    """Rewards from `score_one(prompt, response, metadata)` for each response, failures contained.

    A `score_one` that raises (any Exception) or returns a non-finite number gives 0.0 and counts
    as a verifier error.
    """
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(
            "score() needs one prompt and one metadata dict per response, got "
            f"{len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata dicts"
        )
    rewards = []
    for index, (prompt, response, meta) in enumerate(
        zip(prompts, responses, metadata, strict=True)
    ):
        stats.scored += 1
        try:
            reward = float(score_one(prompt, response, meta))
            if not math.isfinite(reward):
                raise ValueError(f"verifier returned a non-finite reward {reward}")
        except Exception:
            stats.verifier_errors += 1
            where = f"{meta.get('origin', '<no origin>')} (batch index {index})"
            if not stats.traceback_logged:
                stats.traceback_logged = True
                logger.warning(
                    "verifier failed on %s; reward 0.0 (further failures logged at DEBUG)",
                    where,
                    exc_info=True,
                )
            else:
                logger.debug("verifier failed on %s; reward 0.0", where, exc_info=True)
            reward = 0.0
        rewards.append(reward)
    return rewards
