"""Scoring overlapped with generation (loops/rollouts.py GroupScorer): a group is scored on a worker
thread as soon as its last response is final, while later groups still decode; rewards come back
in sample order; environments that cannot leave the main thread are scored after generation."""

from __future__ import annotations

import threading

import pytest

from posttrain.data.prompts import Prompt
from posttrain.data.types import Sample
from posttrain.environments import build
from posttrain.loops.rollouts import GroupScorer
from posttrain.rollout.base import Rollout

pytestmark = pytest.mark.unit

GENERATIONS = 2


class DigitsTokenizer:
    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(str(t) for t in token_ids)


class RecordingEnvironment:
    """Reward = the response read as a number; records each call's thread and sample origins."""

    def __init__(self, overlaps_generation: bool, fail: bool = False):
        self.overlaps_generation = overlaps_generation
        self.fail = fail
        self.calls: list[tuple[str, list[str]]] = []
        self.scored = threading.Event()

    def score(self, prompts, responses, metadata):
        self.calls.append((threading.current_thread().name, [m["origin"] for m in metadata]))
        self.scored.set()
        if self.fail:
            raise ValueError("the verifier broke")
        return [float(r) for r in responses]

    def pop_metrics(self):
        return {}


def _prompts(count: int) -> list[Prompt]:
    samples = [Sample(prompt=f"q{i}", ground_truth="0", metadata={}, origin=f"t:{i}") for i in range(count)]
    return [Prompt(sample=s, text=s.prompt, token_ids=[1]) for s in samples for _ in range(GENERATIONS)]


def _rollout(value: int) -> Rollout:
    return Rollout(prompt_token_ids=[1], token_ids=[value], logprobs=[-1.0], finish_reason="stop")


def _generate_in_order(scorer: GroupScorer, order: list[int], wait_for=None) -> list[Rollout]:
    """An engine finishing samples in `order`; with `wait_for`, it holds the last one back until
    the environment has been called (which only a worker thread can do meanwhile)."""
    rollouts = [_rollout(index) for index in range(len(order))]
    for step, index in enumerate(order):
        if wait_for is not None and step == len(order) - 1:
            assert wait_for.wait(timeout=30), "no group was scored while generation was still running"
        scorer.finished(index, rollouts[index])
    return rollouts


def test_finished_groups_are_scored_on_a_worker_while_generation_runs():
    env = RecordingEnvironment(overlaps_generation=True)
    prompts = _prompts(3)
    scorer = GroupScorer(env, DigitsTokenizer(), prompts, GENERATIONS)
    # group 1 (samples 2, 3) finishes first; the last sample of group 2 waits for a score call
    rollouts = _generate_in_order(scorer, [3, 2, 0, 4, 1, 5], wait_for=env.scored)
    responses, rewards = scorer.results(rollouts)
    assert rewards == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and responses == ["0", "1", "2", "3", "4", "5"]
    assert env.calls[0] == ("posttrain-scoring_0", ["t:1", "t:1"])  # group 1 alone, off the main thread
    assert sorted(origin for _, origins in env.calls for origin in origins) == ["t:0", "t:0", "t:1", "t:1", "t:2", "t:2"]
    assert all(thread.startswith("posttrain-scoring") for thread, _ in env.calls)
    assert scorer.busy_seconds > 0


def test_an_environment_without_the_attribute_is_scored_once_on_the_calling_thread():
    env = RecordingEnvironment(overlaps_generation=False)
    scorer = GroupScorer(env, DigitsTokenizer(), _prompts(2), GENERATIONS)
    rollouts = _generate_in_order(scorer, [1, 0, 3, 2])
    assert env.calls == []  # nothing during generation
    assert scorer.results(rollouts)[1] == [0.0, 1.0, 2.0, 3.0]
    assert env.calls == [(threading.current_thread().name, ["t:0", "t:0", "t:1", "t:1"])]


def test_an_engine_that_never_reports_finished_responses_is_still_scored():
    env = RecordingEnvironment(overlaps_generation=True)
    scorer = GroupScorer(env, DigitsTokenizer(), _prompts(2), GENERATIONS)
    assert scorer.results([_rollout(i) for i in range(4)])[1] == [0.0, 1.0, 2.0, 3.0]


def test_a_scoring_error_on_the_worker_reaches_the_caller():
    env = RecordingEnvironment(overlaps_generation=True, fail=True)
    scorer = GroupScorer(env, DigitsTokenizer(), _prompts(1), GENERATIONS)
    rollouts = _generate_in_order(scorer, [0, 1])
    with pytest.raises(ValueError, match="the verifier broke"):
        scorer.results(rollouts)


def test_math_overlaps_generation_unless_it_needs_signal_alarm():
    assert not build("math").overlaps_generation  # timeout_s=5 in process: signal.alarm, main thread only
    assert build("math", timeout_s=None).overlaps_generation
    assert build("math", verifier="dapo").overlaps_generation
    assert build("format", pattern="x").overlaps_generation
