"""The environment protocol and the per-sample scoring loop that contains verifier failures.

An environment turns (prompt, response) pairs into scalar rewards. The loop hands it, for each
response, the metadata dict built by `scoring_metadata(sample)`: the sample's own metadata plus
"ground_truth" and "origin".

A verifier must not kill a training run. `score_each` runs a per-sample function in this process
or, given a `VerifierPool` (`posttrain.environments.workers`), in worker processes with a per-call
timeout. Every failure gives that response reward 0.0 and is counted:
  - env/verifier_errors: the function raised (any Exception, including a verifier's own
    TimeoutError such as math-verify's), returned a non-finite number, or its worker process
    died (os._exit, a segfault, the OOM killer);
  - env/verifier_timeouts: its worker ran past the pool's call timeout and was killed.
The first failure of an environment is logged at WARNING with the sample's origin and the
traceback, later ones at DEBUG. Mismatched batch lengths are a wiring bug and do raise.
"""

from __future__ import annotations

import logging
import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from posttrain.data.types import Sample

if TYPE_CHECKING:
    from posttrain.environments.workers import VerifierPool

logger = logging.getLogger(__name__)

ScoreOne = Callable[[str, str, dict[str, Any]], float]


@runtime_checkable
class Environment(Protocol):
    """Scores a batch of responses; keeps counters that the loop pops once per step.

    An environment with a true `overlaps_generation` attribute is scored on a worker thread while
    the rollout engine still decodes (loops/rollouts.py): it must use no GPU (the engine's CUDA
    graph captures allow no other work on the device) and tolerate being called from another
    thread than the one that built it. Without the attribute it is scored after generation.
    """

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


@dataclass(frozen=True)
class Outcome:
    """What became of one call: "ok" with its reward, or a failure that scores 0.0."""

    status: Literal["ok", "error", "timeout", "crash"]
    reward: float = 0.0
    detail: str = ""  # for failures: the traceback, or what happened to the worker
    # The exception itself, for logging with exc_info; in-process only (it is not sent between processes).
    exception: BaseException | None = field(default=None, compare=False)


def call_contained(score_one: ScoreOne, prompt: str, response: str, metadata: dict[str, Any]) -> Outcome:
    """`score_one(prompt, response, metadata)` as an Outcome: an Exception or a non-finite reward is an "error"."""
    try:
        reward = float(score_one(prompt, response, metadata))
    except Exception as error:
        return Outcome("error", detail=traceback.format_exc(), exception=error)
    if not math.isfinite(reward):
        return Outcome("error", detail=f"verifier returned a non-finite reward {reward}")
    return Outcome("ok", reward)


@dataclass
class ScoringStats:
    """Counters behind an environment's `pop_metrics`."""

    scored: int = 0
    verifier_errors: int = 0  # raised, non-finite, or the worker process died
    verifier_timeouts: int = 0  # killed at the pool's call timeout
    traceback_logged: bool = False  # only the first failure of an environment gets a warning

    def pop(self) -> dict[str, float]:
        metrics = {
            "env/scored": float(self.scored),
            "env/verifier_errors": float(self.verifier_errors),
            "env/verifier_timeouts": float(self.verifier_timeouts),
        }
        self.scored = 0
        self.verifier_errors = 0
        self.verifier_timeouts = 0
        return metrics


def score_each(
    score_one: ScoreOne,
    prompts: list[str],
    responses: list[str],
    metadata: list[dict[str, Any]],
    stats: ScoringStats,
    pool: VerifierPool | None = None,
) -> list[float]:
    """Rewards from `score_one(prompt, response, metadata)` for each response, failures contained.

    pool=None calls `score_one` here, one response after the other, with no time bound; with a
    pool, the calls run in its worker processes (`score_one` must then be picklable).
    """
    if not len(prompts) == len(responses) == len(metadata):
        raise ValueError(
            "score() needs one prompt and one metadata dict per response, got "
            f"{len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata dicts"
        )
    items = list(zip(prompts, responses, metadata, strict=True))
    if pool is None:
        outcomes = [call_contained(score_one, *item) for item in items]
    else:
        outcomes = pool.map(score_one, items)
    rewards = []
    for index, (outcome, meta) in enumerate(zip(outcomes, metadata, strict=True)):
        stats.scored += 1
        if outcome.status == "ok":
            rewards.append(outcome.reward)
            continue
        if outcome.status == "timeout":
            stats.verifier_timeouts += 1
        else:
            stats.verifier_errors += 1
        _log_failure(outcome, f"{meta.get('origin', '<no origin>')} (batch index {index})", stats)
        rewards.append(0.0)
    return rewards


_FAILED = {"error": "failed", "timeout": "timed out", "crash": "crashed"}


def _log_failure(outcome: Outcome, where: str, stats: ScoringStats) -> None:
    first = not stats.traceback_logged
    stats.traceback_logged = True
    # An in-process exception is logged with exc_info; a worker's failure arrives as text.
    detail = f"\n{outcome.detail}" if outcome.exception is None and outcome.detail else ""
    logger.log(
        logging.WARNING if first else logging.DEBUG,
        "verifier %s on %s; reward 0.0%s%s",
        _FAILED[outcome.status],
        where,
        " (further failures logged at DEBUG)" if first else "",
        detail,
        exc_info=outcome.exception,
    )
