"""Environments: math (math-verify, DAPO), reasoning-gym, failure containment and `build`."""

import logging
import threading

import pytest
from _verifiers import MATH_EQUIVALENCE_CASES

import posttrain.environments.math as math_env
from posttrain.data.sources import load_reasoning_gym
from posttrain.data.types import Sample
from posttrain.environments import (
    Environment,
    MathEnvironment,
    ReasoningGymEnvironment,
    build,
    scoring_metadata,
)

pytestmark = pytest.mark.unit


def score(env, responses, ground_truth):
    metadata = [
        {"ground_truth": ground_truth, "origin": f"test:{i}"} for i in range(len(responses))
    ]
    return env.score([""] * len(responses), responses, metadata)


def test_math_verify_rewards():
    env = MathEnvironment()
    responses = [
        r"\boxed{68}",
        "68",
        "The answer is 68.",
        "69",
        "",
        "68 68 7",
        "7 68 68",
        "sixty-eight",
    ]
    assert score(env, responses, "68") == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert score(env, ["68"], r"\boxed{68}") == [
        1.0
    ]  # an already boxed ground truth is not re-wrapped
    assert env.pop_metrics() == {"env/scored": 9.0, "env/verifier_errors": 0.0, "env/verifier_timeouts": 0.0}
    assert env.pop_metrics() == {"env/scored": 0.0, "env/verifier_errors": 0.0, "env/verifier_timeouts": 0.0}


def test_math_verify_fraction_equivalence():
    env = MathEnvironment()
    # math-verify compares values: 1/2 and 0.5 are equal in both directions.
    assert score(env, ["0.5", "1/2", r"$\frac{1}{2}$", "0.499999"], r"\frac{1}{2}") == [
        1.0,
        1.0,
        1.0,
        0.0,
    ]
    assert score(env, [r"\boxed{\frac{1}{2}}"], "0.5") == [1.0]


def test_math_verify_timeout_is_contained_and_counted():
    env = MathEnvironment(timeout_s=1)
    assert score(env, [r"$9^{9^{9^{9}}}$", "3"], "3") == [
        0.0,
        1.0,
    ]  # sympy never finishes the first
    assert env.pop_metrics()["env/verifier_errors"] == 1.0


def test_unparsable_ground_truth_is_a_verifier_error():
    env = MathEnvironment()
    assert score(env, ["68"], "") == [0.0]
    assert env.pop_metrics()["env/verifier_errors"] == 1.0


def test_raising_verifier_is_contained_counted_and_logged_once(monkeypatch, caplog):
    def broken_verifier(response, ground_truth, *, timeout_s):
        raise RuntimeError("verifier bug")

    monkeypatch.setattr(math_env, "math_verify_reward", broken_verifier)
    env = MathEnvironment()
    with caplog.at_level(logging.DEBUG, logger="posttrain.environments.base"):
        assert score(env, ["68", "68", "68"], "68") == [0.0, 0.0, 0.0]
    assert env.pop_metrics() == {"env/scored": 3.0, "env/verifier_errors": 3.0, "env/verifier_timeouts": 0.0}
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "test:0 (batch index 0)" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None


def test_math_environment_rejects_wiring_errors():
    env = MathEnvironment()
    with pytest.raises(ValueError, match="needs a string 'ground_truth'"):
        env.score(["p"], ["68"], [{"origin": "x:0"}])
    with pytest.raises(ValueError, match="one prompt and one metadata dict per response"):
        env.score(["p"], ["68", "69"], [{"ground_truth": "68"}])
    with pytest.raises(ValueError, match="unknown math verifier"):
        MathEnvironment(verifier="sympy")


def test_math_verify_timeout_needs_main_thread():
    errors = []
    thread = threading.Thread(target=lambda: _score_capturing(MathEnvironment(), errors))
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    rewards = []
    thread = threading.Thread(
        target=lambda: rewards.append(score(MathEnvironment(timeout_s=None), ["68"], "68"))
    )
    thread.start()
    thread.join()
    assert rewards == [[1.0]]


def _score_capturing(env, errors):
    try:
        score(env, ["68"], "68")
    except RuntimeError as error:
        errors.append(error)


def test_dapo_verifier():
    env = MathEnvironment(verifier="dapo")
    responses = [
        "Let me think... so the total is 68.\nAnswer: 68",
        "answer: $68$ dollars",
        "Answer: 69",
        "Answer: 7\nWait, no.\nAnswer: 68",  # the last "Answer:" counts
        "68",  # no "Answer:" line
        "Answer: 68" + "x" * 300,  # "Answer:" outside the last 300 characters
        "Answer: 1,000",
    ]
    assert score(env, responses[:6], "68") == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert score(env, [responses[6]], "1000") == [1.0]
    assert score(env, [r"Answer: \frac12"], r"\frac{1}{2}") == [1.0]
    assert math_env.minerva_normalize(r"x = \boxed{\text{5 } cm}") == "5"


def test_reasoning_gym_scores_with_its_own_scorer():
    samples = load_reasoning_gym("basic_arithmetic", size=3, seed=11)
    env = ReasoningGymEnvironment()
    metadata = [scoring_metadata(sample) for sample in samples]
    prompts = [sample.prompt for sample in samples]
    right = [f"<think>easy</think><answer>{sample.ground_truth}</answer>" for sample in samples]
    wrong = [f"<answer>{int(sample.ground_truth) + 1}</answer>" for sample in samples]
    untagged = [sample.ground_truth for sample in samples]
    assert env.score(prompts, right, metadata) == [1.0, 1.0, 1.0]
    assert env.score(prompts, wrong, metadata) == [0.0, 0.0, 0.0]
    assert env.score(prompts, untagged, metadata) == [0.0, 0.0, 0.0]  # no <answer> tags: no answer
    raw = ReasoningGymEnvironment(answer_format="raw")
    assert raw.score(prompts, untagged, metadata) == [1.0, 1.0, 1.0]
    assert env.pop_metrics() == {"env/scored": 9.0, "env/verifier_errors": 0.0, "env/verifier_timeouts": 0.0}


def test_reasoning_gym_partial_credit_and_tripwire():
    [sample] = load_reasoning_gym("chain_sum", size=1, seed=3)
    env = ReasoningGymEnvironment()
    meta = scoring_metadata(sample)
    answer = sample.ground_truth
    # the base scorer gives len(oracle)/len(answer) when the oracle is a substring of the answer
    [partial] = env.score([sample.prompt], [f"<answer>x{answer}</answer>"], [meta])
    assert partial == pytest.approx(len(answer) / (len(answer) + 1))
    tampered = {**meta, "ground_truth": answer + "0"}
    assert env.score([sample.prompt], [f"<answer>{answer}</answer>"], [tampered]) == [0.0]
    assert env.pop_metrics()["env/verifier_errors"] == 1.0


def test_scoring_metadata_rejects_reserved_keys():
    sample = Sample(prompt="p", ground_truth="1", metadata={"ground_truth": "2"}, origin="f:0")
    with pytest.raises(ValueError, match="reserved"):
        scoring_metadata(sample)


class ConstantEnvironment:
    """A user environment for `build("custom", ...)`."""

    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, prompts, responses, metadata):
        return [self.value] * len(responses)

    def pop_metrics(self):
        return {}


def test_build_builtin_and_custom():
    assert isinstance(build("math", verifier="dapo"), MathEnvironment)
    assert isinstance(build("reasoning_gym"), ReasoningGymEnvironment)
    custom = build("custom", import_path=f"{__name__}:ConstantEnvironment", value=0.25)
    assert isinstance(custom, Environment) and custom.score(["p"], ["r"], [{}]) == [0.25]


def test_build_errors():
    with pytest.raises(ValueError, match="unknown environment 'mathh'; did you mean 'math'"):
        build("mathh")
    with pytest.raises(ValueError, match="pkg.module:ClassName"):
        build("custom")
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        build("custom", import_path=f"{__name__}:Missing")
    with pytest.raises(TypeError, match="must define score"):
        build(
            "custom",
            import_path="posttrain.data.types:Sample",
            prompt="p",
            ground_truth=None,
            metadata={},
            origin="o",
        )


@pytest.mark.parametrize(("ground_truth", "response", "math_verify", "dapo"), MATH_EQUIVALENCE_CASES)
def test_math_answer_equivalences(ground_truth, response, math_verify, dapo):
    assert score(MathEnvironment(), [response], ground_truth) == [math_verify]
    assert score(MathEnvironment(verifier="dapo"), [response], ground_truth) == [dapo]


def test_worker_options_are_validated():
    with pytest.raises(ValueError, match="needs num_workers > 0"):
        MathEnvironment(call_timeout_s=5.0)
    with pytest.raises(ValueError, match="needs num_workers > 0"):
        ReasoningGymEnvironment(call_timeout_s=5.0)
    with pytest.raises(ValueError, match="num_workers must be"):
        MathEnvironment(num_workers=-1)
    with pytest.raises(ValueError, match="call_timeout_s must be a positive"):
        MathEnvironment(num_workers=1, call_timeout_s=0.0)
