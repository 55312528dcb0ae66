"""Per-token logprobs (models/logprobs.py) against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.models.loading import load_policy
from posttrain.models.logprobs import logprobs_from_logits, position_ids_from_mask, token_logprobs

pytestmark = pytest.mark.unit


TEMPERATURE = 0.7
CAP = 30.0


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """The tiny policy with a final norm scaled up so raw logits go well past the softcap (|x| > 30)."""
    policy = load_policy(tiny_checkpoint).eval()
    policy = copy.deepcopy(policy)
    with torch.no_grad():
        policy.model.norm.weight.mul_(200.0)
    return policy


def _reference_logprobs(model, input_ids_BT, attention_mask_BT, position_ids_BT, temperature):
    """lm_head -> softcap (by hand) -> temperature -> log_softmax -> gather, from hidden states."""
    hidden_BTH = model.model(
        input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT, use_cache=False
    ).last_hidden_state
    raw_BTV = model.lm_head(hidden_BTH)
    capped_BTV = CAP * torch.tanh(raw_BTV / CAP)
    logprobs_BTV = torch.log_softmax(capped_BTV / temperature, dim=-1)
    gathered_BT = logprobs_BTV[:, :-1].gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    return gathered_BT, raw_BTV


SEQ_A = [2, 4, 40, 41, 22, 23, 60, 5]
SEQ_B = [2, 4, 77, 30, 31]


@torch.no_grad()
def test_token_logprobs_match_hand_softcap_and_temperature(model):
    input_ids_BT = torch.tensor([SEQ_A, SEQ_B + [0, 0, 0]])
    mask_BT = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    positions_BT = torch.tensor([list(range(8)), [0, 1, 2, 3, 4, 4, 4, 4]])

    got_BT = token_logprobs(model, input_ids_BT, mask_BT, temperature=TEMPERATURE)
    expected_BT, raw_BTV = _reference_logprobs(model, input_ids_BT, mask_BT, positions_BT, TEMPERATURE)

    assert raw_BTV.abs().max() > 2 * CAP  # precondition: the cap changes these logits a lot
    assert got_BT.dtype == torch.float32
    assert got_BT.shape == (2, 7)  # [B, T-1]: token t+1 given tokens 0..t
    torch.testing.assert_close(got_BT[0], expected_BT[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_BT[1, :4], expected_BT[1, :4], rtol=0, atol=1e-5)


@torch.no_grad()
def test_softcap_and_temperature_both_matter(model):
    """The reference is sensitive to what it checks: without the cap, or at T=1, values move."""
    input_ids_BT = torch.tensor([SEQ_A])
    mask_BT = torch.ones_like(input_ids_BT)
    got_BT = token_logprobs(model, input_ids_BT, mask_BT, temperature=TEMPERATURE)
    raw_BTV = model.lm_head(model.model(input_ids=input_ids_BT, use_cache=False).last_hidden_state)
    uncapped_BT = torch.log_softmax(raw_BTV[:, :-1] / TEMPERATURE, -1).gather(-1, input_ids_BT[:, 1:, None])[..., 0]
    assert (got_BT - uncapped_BT).abs().max() > 1e-2
    at_t1_BT = token_logprobs(model, input_ids_BT, mask_BT, temperature=1.0)
    assert (got_BT - at_t1_BT).abs().max() > 1e-2


@torch.no_grad()
def test_left_and_right_padding_agree_on_real_tokens(model):
    seqs = [SEQ_A, SEQ_B, [2, 4, 50, 51, 52, 53]]
    width = max(map(len, seqs))
    right_ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    right_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    left_ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    left_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])

    right_BT = token_logprobs(model, right_ids, right_mask, temperature=TEMPERATURE)
    left_BT = token_logprobs(model, left_ids, left_mask, temperature=TEMPERATURE)
    for row, seq in enumerate(seqs):
        n, pad = len(seq), width - len(seq)
        alone_T = token_logprobs(model, torch.tensor([seq]), torch.ones(1, n, dtype=torch.long), temperature=TEMPERATURE)[0]
        # column t scores token t+1: compare tokens 1..n-1
        torch.testing.assert_close(right_BT[row, : n - 1], alone_T, rtol=0, atol=1e-5)
        torch.testing.assert_close(left_BT[row, pad:], alone_T, rtol=0, atol=1e-5)


def test_position_ids_from_mask_hand_values():
    mask_BT = torch.tensor(
        [
            [1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 0, 0],
        ]
    )
    expected_BT = torch.tensor(
        [
            [0, 1, 2, 3, 4],
            [0, 0, 0, 1, 2],
            [0, 1, 2, 2, 2],
            [0, 0, 1, 1, 1],
        ]
    )
    assert torch.equal(position_ids_from_mask(mask_BT), expected_BT)
    assert torch.equal(position_ids_from_mask(mask_BT.bool()), expected_BT)


def test_logprobs_from_logits_hand_values():
    # logits [0, ln 3] at T=1: probs [1/4, 3/4]; at T=0.5: logits [0, 2 ln 3] -> probs [1/10, 9/10]
    logits_BTV = torch.tensor([[[0.0, float(torch.log(torch.tensor(3.0)))]]])
    target_BT = torch.tensor([[1]])
    assert logprobs_from_logits(logits_BTV, target_BT, 1.0).item() == pytest.approx(float(torch.log(torch.tensor(0.75))), abs=1e-6)
    assert logprobs_from_logits(logits_BTV, target_BT, 0.5).item() == pytest.approx(float(torch.log(torch.tensor(0.9))), abs=1e-6)
    assert logprobs_from_logits(logits_BTV.bfloat16(), target_BT, 1.0).dtype == torch.float32
