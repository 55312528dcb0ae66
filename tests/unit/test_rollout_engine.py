"""The rollout engines' shared behaviour (rollout/torch_engine.py, rollout/continuous_engine.py) and
sampling truncation. Engine-specific parts of the continuous engine: test_continuous_engine.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.models.loading import load_policy
from posttrain.models.logprobs import token_logprobs
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.continuous_engine import ContinuousBatchingEngine
from posttrain.rollout.sampling import truncate_logits
from posttrain.rollout.torch_engine import TorchRolloutEngine, cache_keyword

pytestmark = pytest.mark.unit


TEMPERATURE = 0.8
PAD = 0
# chat-like prompts of different lengths (ids < 277, the tiny vocab)
PROMPTS = [
    [2, 4, 40, 41, 22, 23, 60, 5, 4, 70],
    [2, 4, 77, 5],
    [2, 4, 30, 31, 32, 5, 4],
    [2, 4, 50],
    [2, 4, 90, 91, 92, 93, 94, 5, 4, 70, 71, 72],
    [2, 4, 33, 34, 5, 4, 70],
]


# -------------------------------------------------------------------------------- truncation

LOGITS_1V = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3]]))  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
NEG_INF = float("-inf")


def _kept(logits_BV: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits_BV[0])).flatten().tolist()


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [
        # rule: drop a token when the mass strictly before it is >= top_p
        (1.0, [0, 1, 2, 3]),
        (0.96, [0, 1, 2, 3]),  # mass before 0.05 is 0.95 < 0.96
        (0.95, [0, 1, 3]),  # ... 0.95 >= 0.95: dropped
        (0.81, [0, 1, 3]),  # mass before 0.15 is 0.8 < 0.81
        (0.8, [1, 3]),  # 0.8 >= 0.8: 0.15 dropped
        (0.7, [1, 3]),  # mass before 0.3 is 0.5 < 0.7
        (0.5, [1]),  # 0.5 >= 0.5: 0.3 dropped
        (0.01, [1]),  # the argmax is always kept
    ],
)
def test_top_p_hand_values(top_p, kept):
    out_1V = truncate_logits(LOGITS_1V, top_p, None)
    assert _kept(out_1V) == kept
    # kept logits are untouched
    assert torch.equal(out_1V[0, kept], LOGITS_1V[0, kept])


@pytest.mark.parametrize(("top_k", "kept"), [(1, [1]), (2, [1, 3]), (3, [0, 1, 3]), (4, [0, 1, 2, 3]), (10, [0, 1, 2, 3])])
def test_top_k_hand_values(top_k, kept):
    assert _kept(truncate_logits(LOGITS_1V, 1.0, top_k)) == kept


def test_top_k_and_top_p_combine_per_row():
    logits_BV = torch.log(torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.05, 0.05, 0.1, 0.8]]))
    out_BV = truncate_logits(logits_BV, 0.9, 3)
    # row 0: top-3 {1, 3, 0}, renormalized 0.5/0.95, 0.3/0.95 -> mass before token 0 is 0.842 < 0.9: kept
    assert torch.isfinite(out_BV[0]).tolist() == [True, True, False, True]
    # row 1: top-3 {3, 2, and one of the 0.05 ties}; mass before 2 is 0.8/0.95 = 0.842 < 0.9, before the tie 0.947: dropped
    assert torch.isfinite(out_BV[1]).tolist() == [False, False, True, True]


def test_argmax_always_kept_for_peaked_and_flat_rows():
    logits_BV = torch.tensor([[0.0, 50.0, 0.0], [1.0, 1.0 + 1e-3, 1.0]])
    out_BV = truncate_logits(logits_BV, 1e-6, 1)
    assert torch.isfinite(out_BV).sum(dim=-1).tolist() == [1, 1]
    assert out_BV.argmax(dim=-1).tolist() == [1, 1]


# -------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    return load_policy(tiny_checkpoint).eval()


ENGINES = {
    "torch": lambda model: TorchRolloutEngine(model, pad_token_id=PAD, dtype=torch.float32),
    # 4 slots for 6+ prompts: later prompts join as earlier ones finish
    "continuous": lambda model: ContinuousBatchingEngine(
        model, pad_token_id=PAD, precision="float32", max_batch_size=4, sync_every=3
    ),
}


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine_kind(request):
    return request.param


@pytest.fixture(scope="module")
def engine(policy, engine_kind):
    return ENGINES[engine_kind](policy)


def _recomputed_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    ids = prompt + response
    with torch.no_grad():
        lp_T = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), temperature=temperature)
    return lp_T[0, len(prompt) - 1 :]


def _assert_logprobs_match(model, rollouts, temperature=TEMPERATURE):
    for rollout in rollouts:
        assert len(rollout.logprobs) == len(rollout.token_ids)
        expected_N = _recomputed_logprobs(model, rollout.prompt_token_ids, rollout.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(rollout.logprobs), expected_N, rtol=0, atol=1e-5)


def test_reported_logprobs_equal_recomputed_with_stops_mid_batch(policy, engine):
    """Left-padded prompts of different lengths; some rows stop while others keep decoding."""
    stop_ids = tuple(range(100, 160))
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=8, stop_token_ids=stop_ids, seed=1)
    rollouts = engine.generate(PROMPTS, params)
    reasons = [r.finish_reason for r in rollouts]
    lengths = [len(r.token_ids) for r in rollouts]
    # precondition (fixed seed): a mix of rows that stopped early and rows that ran to the limit
    assert "stop" in reasons and "length" in reasons and min(lengths) < 8
    assert [r.prompt_token_ids for r in rollouts] == PROMPTS
    _assert_logprobs_match(policy, rollouts)


def test_reported_logprobs_are_full_vocab_even_with_top_p(policy, engine):
    params = SamplingParams(temperature=TEMPERATURE, top_p=0.5, top_k=20, max_new_tokens=5, seed=3)
    _assert_logprobs_match(policy, engine.generate(PROMPTS[:3], params))


def test_same_seed_same_tokens_different_seed_different(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)
    first = [r.token_ids for r in engine.generate(PROMPTS, params)]
    again = [r.token_ids for r in engine.generate(PROMPTS, params)]
    other = [r.token_ids for r in engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, seed=12))]
    assert first == again
    assert first != other


def test_batching_does_not_change_a_row(engine):
    """A prompt alone and the same prompt in a padded batch give the same distribution (greedy-ish check)."""
    params = SamplingParams(temperature=1e-4, max_new_tokens=6, seed=0)
    batched = engine.generate(PROMPTS, params)
    alone = engine.generate([PROMPTS[1]], params)
    assert batched[1].token_ids == alone[0].token_ids


def test_stop_token_ends_row_and_is_included(engine):
    stop_ids = tuple(range(6, 277, 2))  # about half the vocabulary: rows stop quickly
    params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=stop_ids, seed=5)
    rollouts = engine.generate(PROMPTS, params)
    assert any(r.finish_reason == "stop" for r in rollouts)
    for r in rollouts:
        if r.finish_reason == "stop":
            assert r.token_ids[-1] in stop_ids
            assert not any(t in stop_ids for t in r.token_ids[:-1])
        else:
            assert len(r.token_ids) == 12
            assert not any(t in stop_ids for t in r.token_ids)
        assert PAD not in r.token_ids


def test_max_new_tokens_gives_length(engine):
    rollouts = engine.generate(PROMPTS, SamplingParams(max_new_tokens=3, seed=0))
    assert [r.finish_reason for r in rollouts] == ["length"] * len(PROMPTS)
    assert [len(r.token_ids) for r in rollouts] == [3] * len(PROMPTS)
    assert [len(r.logprobs) for r in rollouts] == [3] * len(PROMPTS)


def test_min_new_tokens_forbids_early_stops(engine):
    allowed = {40, 41, 42}
    stop_ids = tuple(t for t in range(277) if t not in allowed)
    prompts = PROMPTS * 4
    control = engine.generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=stop_ids, seed=9))
    # control: with nearly every token a stop token, rows end at once
    assert sum(len(r.token_ids) == 1 for r in control) > len(prompts) // 2

    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=6, min_new_tokens=3, stop_token_ids=stop_ids, seed=9))
    for r in rollouts:
        assert len(r.token_ids) >= 4 or r.finish_reason == "length"
        assert set(r.token_ids[:3]) <= allowed
    assert all(r.finish_reason == "stop" for r in rollouts)


def test_refresh_weights_switches_to_the_new_model(policy, engine_kind):
    other = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5 * torch.randn(param.shape, generator=gen))
    engine = ENGINES[engine_kind](policy)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=6, seed=4)
    before = engine.generate(PROMPTS, params)

    engine.refresh_weights(other.named_parameters())
    after = engine.generate(PROMPTS, params)

    assert [r.token_ids for r in before] != [r.token_ids for r in after]
    _assert_logprobs_match(other, after)
    # and they are not the old model's logprobs
    old_N = _recomputed_logprobs(policy, after[0].prompt_token_ids, after[0].token_ids, TEMPERATURE)
    assert (torch.tensor(after[0].logprobs) - old_N).abs().max() > 1e-3
    # the engine holds a copy: refreshing it leaves the trainer's model alone
    assert not torch.equal(policy.model.norm.weight, other.model.norm.weight)


def test_bf16_engine_keeps_its_own_copy(policy):
    engine = TorchRolloutEngine(policy, pad_token_id=PAD, dtype=torch.bfloat16)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    rollouts = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, seed=0))
    assert all(math.isfinite(x) and x <= 0 for r in rollouts for x in r.logprobs)


def test_cache_keyword_is_the_forward_s_own(policy):
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (deprecated until 5.40);
    the engine passes the one the installed forward declares."""
    import inspect

    keyword = cache_keyword(policy)
    assert keyword in inspect.signature(policy.forward).parameters
    assert keyword in ("cache", "past_key_values")


def test_unseeded_generation_leaves_the_global_rng_alone(tiny_checkpoint):
    model = load_policy(tiny_checkpoint)
    engine = TorchRolloutEngine(model, pad_token_id=0, dtype=torch.float32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate([[2, 4, 40]], SamplingParams(max_new_tokens=2))
    assert torch.equal(torch.rand(3), expected)


def test_bfloat16_autocast_generator_keeps_fp32_weights_and_matches_an_autocast_trainer(policy):
    """generation.dtype bfloat16_autocast: an fp32 copy sampled under bf16 autocast, the trainer's numerics."""
    engine = TorchRolloutEngine(policy, pad_token_id=PAD, dtype=torch.float32, autocast=True)
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}
    rollouts = engine.generate(PROMPTS, SamplingParams(temperature=TEMPERATURE, max_new_tokens=6, seed=2))
    plain = TorchRolloutEngine(policy, pad_token_id=PAD, dtype=torch.float32).generate(
        PROMPTS, SamplingParams(temperature=TEMPERATURE, max_new_tokens=6, seed=2)
    )
    # the autocast generator computed in bf16: its logprobs differ from fp32 ones, slightly
    worst = max(abs(a - b) for r, p in zip(rollouts, plain, strict=True) if r.token_ids == p.token_ids for a, b in zip(r.logprobs, p.logprobs, strict=True))
    assert 1e-5 < worst < 0.1
    for rollout in rollouts:  # and they equal the bf16-autocast trainer's within bf16 noise
        ids = rollout.prompt_token_ids + rollout.token_ids
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lp_T1 = token_logprobs(policy, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), temperature=TEMPERATURE)
        torch.testing.assert_close(torch.tensor(rollout.logprobs), lp_T1[0, len(rollout.prompt_token_ids) - 1 :], rtol=0, atol=1e-2)  # bf16 noise (max 2.5e-3 measured)
