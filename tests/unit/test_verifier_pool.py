"""The verifier pool: failures (raise, non-finite, hang, process death) score 0.0, are counted, and
never stop the pool; environments give the same rewards in workers as in-process."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _verifiers import MATH_EQUIVALENCE_CASES, by_response

from posttrain.data.sources import load_reasoning_gym
from posttrain.environments import MathEnvironment, ReasoningGymEnvironment, ScoringStats, score_each, scoring_metadata
from posttrain.environments.workers import VerifierPool

pytestmark = pytest.mark.unit


def items(*responses):
    return [("", response, {"origin": f"test:{i}"}) for i, response in enumerate(responses)]


def running(pid: int) -> bool:
    """True while `pid` is a live (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_failures_score_zero_are_counted_and_the_pool_keeps_working(caplog):
    responses = ["ok:1", "raise", "sleep", "ok:0.5", "nan", "exit", "sigkill", "spin", "ok:2"]
    stats = ScoringStats()
    with VerifierPool(num_workers=2, call_timeout_s=0.5) as pool:
        with caplog.at_level(logging.DEBUG, logger="posttrain.environments.base"):
            rewards = score_each(by_response, *zip(*items(*responses), strict=True), stats, pool)
        assert rewards == [1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 2.0]
        # raise, nan, exit and sigkill are errors; sleep and spin were killed at the timeout
        assert stats.pop() == {"env/scored": 9.0, "env/verifier_errors": 4.0, "env/verifier_timeouts": 2.0}
        warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1 and "test:1 (batch index 1)" in warnings[0].getMessage()
        assert "RuntimeError: verifier bug" in warnings[0].getMessage()  # the worker's traceback

        outcomes = pool.map(by_response, items("exit", "sleep", "ok:3"))
        assert [outcome.status for outcome in outcomes] == ["crash", "timeout", "ok"]
        assert "exit code 1" in outcomes[0].detail
        # the dead and killed workers were replaced: two live workers answer the next batch
        pids = {int(outcome.reward) for outcome in pool.map(by_response, items("nap:0.3", "nap:0.3"))}
        assert len(pids) == 2 and all(running(pid) for pid in pids)
        # a worker killed while idle, between batches, is replaced too; its call is not lost
        killed = pids.pop()
        os.kill(killed, signal.SIGKILL)
        while running(killed):
            time.sleep(0.01)
        outcomes = pool.map(by_response, items("pid", "pid", "ok:4"))
        assert killed not in {int(outcome.reward) for outcome in outcomes} and outcomes[2].reward == 4.0


def test_calls_run_in_parallel_on_reused_workers_and_close_stops_them():
    with VerifierPool(num_workers=2, call_timeout_s=5.0) as pool:
        first = {outcome.reward for outcome in pool.map(by_response, items("nap:0.1", "nap:0.1"))}
        start = time.monotonic()
        outcomes = pool.map(by_response, items(*["nap:0.4"] * 4))
        elapsed = time.monotonic() - start
        assert {outcome.reward for outcome in outcomes} == first  # the same two workers, reused
        assert elapsed < 1.4  # two at a time: about 0.8 s; one at a time would be 1.6 s
    assert not any(running(int(pid)) for pid in first)
    with pytest.raises(RuntimeError, match="closed"):
        pool.map(by_response, items("ok:1"))


def test_unpicklable_score_one_is_a_wiring_error():
    with VerifierPool(num_workers=1, call_timeout_s=1.0) as pool:
        with pytest.raises(TypeError, match="cannot be pickled"):
            pool.map(lambda prompt, response, metadata: 1.0, items("ok:1"))


def run_python(code: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, env=environment
    )


def test_workers_stop_when_the_trainer_exits_or_is_killed():
    # a pool never closed: interpreter exit stops its workers
    child = run_python("""
        from _verifiers import by_response
        from posttrain.environments.workers import VerifierPool
        pool = VerifierPool(num_workers=2, call_timeout_s=5.0)
        print(*[int(o.reward) for o in pool.map(by_response, [("", "nap:0.2", {})] * 2)], flush=True)
    """)
    pids = [int(pid) for pid in child.stdout.readline().split()]
    assert child.wait(timeout=10) == 0 and len(pids) == 2
    assert not any(running(pid) for pid in pids)
    # a trainer killed in the middle of a hung call: its workers notice and exit within about 1 s
    child = run_python("""
        from _verifiers import by_response
        from posttrain.environments.workers import VerifierPool
        pool = VerifierPool(num_workers=1, call_timeout_s=100.0)
        print(int(pool.map(by_response, [("", "pid", {})])[0].reward), flush=True)
        pool.map(by_response, [("", "sleep", {})])
    """)
    pid = int(child.stdout.readline())
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    deadline = time.monotonic() + 5.0
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(pid)


def test_math_environment_in_workers_matches_in_process():
    for verifier in ("math_verify", "dapo"):
        ground_truths = [case[0] for case in MATH_EQUIVALENCE_CASES]
        responses = [case[1] for case in MATH_EQUIVALENCE_CASES]
        metadata = [{"ground_truth": truth, "origin": f"case:{i}"} for i, truth in enumerate(ground_truths)]
        prompts = [""] * len(responses)
        in_process = MathEnvironment(verifier)
        pooled = MathEnvironment(verifier, num_workers=2)
        try:
            expected = [case[2] if verifier == "math_verify" else case[3] for case in MATH_EQUIVALENCE_CASES]
            assert pooled.score(prompts, responses, metadata) == expected
            assert in_process.score(prompts, responses, metadata) == expected
            assert pooled.pop_metrics() == in_process.pop_metrics()
        finally:
            pooled.close()


def test_math_environment_in_workers_kills_a_hung_verifier():
    # timeout_s=None: no signal.alarm, so only the pool's call timeout stops sympy's endless work
    # 5 s: the first call also imports math-verify and sympy, which a slow machine may take seconds for
    env = MathEnvironment(timeout_s=None, num_workers=1, call_timeout_s=5.0)
    metadata = [{"ground_truth": "3", "origin": f"test:{i}"} for i in range(2)]
    try:
        assert env.score(["", ""], ["3", r"$9^{9^{9^{9}}}$"], metadata) == [1.0, 0.0]
        assert env.pop_metrics() == {"env/scored": 2.0, "env/verifier_errors": 0.0, "env/verifier_timeouts": 1.0}
    finally:
        env.close()


def test_reasoning_gym_in_workers_matches_in_process():
    samples = load_reasoning_gym("basic_arithmetic", size=3, seed=11)
    metadata = [scoring_metadata(sample) for sample in samples]
    prompts = [sample.prompt for sample in samples]
    responses = [f"<answer>{sample.ground_truth}</answer>" for sample in samples[:2]] + ["<answer>x</answer>"]
    pooled = ReasoningGymEnvironment(num_workers=1)
    try:
        assert pooled.score(prompts, responses, metadata) == [1.0, 1.0, 0.0]
        assert ReasoningGymEnvironment().score(prompts, responses, metadata) == [1.0, 1.0, 0.0]
    finally:
        pooled.close()
