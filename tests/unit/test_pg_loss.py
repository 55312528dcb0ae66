import math

import pytest
import torch

from posttrain.algorithms.pg_loss import clipped_pg_loss
from posttrain.config.loss import LossConfig

pytestmark = pytest.mark.unit

LOG = math.log


def _loss(lp, old, adv, mask, cfg=None, normalizer=None, **kwargs):
    """lp/old/mask as nested lists [B][T], adv as a list [B]; returns (loss, metrics, grad)."""
    lp_BT = torch.tensor(lp, requires_grad=True)
    mask_BT = torch.tensor(mask)
    normalizer = float(mask_BT.sum()) if normalizer is None else normalizer
    loss, metrics = clipped_pg_loss(
        lp_BT,
        torch.tensor(old),
        torch.tensor(adv),
        mask_BT,
        cfg or LossConfig(),
        global_normalizer=normalizer,
        **kwargs,
    )
    loss.backward()
    return loss, metrics, lp_BT.grad


def test_clip_higher_is_asymmetric():
    # A = +1, r = 1.3: max(-1.3, -1.28) = -1.28 (clipped at 1 + 0.28, no gradient)
    loss, metrics, grad = _loss([[LOG(1.3)]], [[0.0]], [1.0], [[1]])
    assert loss.item() == pytest.approx(-1.28, rel=1e-6)
    assert grad.item() == 0.0
    assert metrics["clip_fraction"] == 1.0
    assert metrics["probs_ratio"] == pytest.approx(1.3, rel=1e-6)
    assert metrics["probs_ratio_clamped"] == pytest.approx(1.28, rel=1e-6)
    # A = -1, r = 0.7: max(0.7, 0.8) = 0.8 (clipped at 1 - 0.2, no gradient)
    loss, metrics, grad = _loss([[LOG(0.7)]], [[0.0]], [-1.0], [[1]])
    assert loss.item() == pytest.approx(0.8, rel=1e-6)
    assert grad.item() == 0.0
    assert metrics["clip_fraction"] == 1.0


def test_ratios_on_the_improving_side_are_not_clipped():
    # A = -1, r = 1.3: max(1.3, 1.28) = 1.3; d/dlp (-A r) = -A r = 1.3
    loss, metrics, grad = _loss([[LOG(1.3)]], [[0.0]], [-1.0], [[1]])
    assert loss.item() == pytest.approx(1.3, rel=1e-6)
    assert grad.item() == pytest.approx(1.3, rel=1e-6)
    assert metrics["clip_fraction"] == 0.0
    # A = +1, r = 0.7: max(-0.7, -0.8) = -0.7; gradient -A r = -0.7
    loss, _, grad = _loss([[LOG(0.7)]], [[0.0]], [1.0], [[1]])
    assert loss.item() == pytest.approx(-0.7, rel=1e-6)
    assert grad.item() == pytest.approx(-0.7, rel=1e-6)


def test_gradient_hand_computed():
    # one sequence, A = 2, r = [1, 1.5], N = 2 tokens:
    # l = [-2 * 1, -2 * 1.28] -> loss = (-2 - 2.56) / 2 = -2.28
    # dloss/dlp = [-A r / N, 0 (clipped)] = [-1, 0]
    loss, metrics, grad = _loss([[-1.0, -1.0 + LOG(1.5)]], [[-1.0, -1.0]], [2.0], [[1, 1]])
    assert loss.item() == pytest.approx(-2.28, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0]]))
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(-2.28, rel=1e-6)


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, r = [5, 2], c = 3: plain l = [5, 2]; dual min(5, 3) = 3 -> (3 + 2) / 2 = 2.5
    lp, old = [[LOG(5.0), LOG(2.0)]], [[0.0, 0.0]]
    loss, metrics, grad = _loss(lp, old, [-1.0], [[1, 1]], LossConfig(ratio_clip_c=3.0))
    assert loss.item() == pytest.approx(2.5, rel=1e-6)
    # gradient: capped token 0, the other -A r / N = 2 / 2 = 1
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0]]))
    assert metrics["dual_clip_fraction"] == pytest.approx(0.5)
    # without dual clip: (5 + 2) / 2 = 3.5
    loss, metrics, _ = _loss(lp, old, [-1.0], [[1, 1]])
    assert loss.item() == pytest.approx(3.5, rel=1e-6)
    assert "dual_clip_fraction" not in metrics


def test_dual_clip_leaves_positive_advantages_alone():
    # A = +1, r = 5 -> clipped at 1.28: l = -1.28, and -c A = -3 is not applied
    loss, _, _ = _loss([[LOG(5.0)]], [[0.0]], [1.0], [[1]], LossConfig(ratio_clip_c=3.0))
    assert loss.item() == pytest.approx(-1.28, rel=1e-6)


# Two sequences with r = 1 everywhere, so l = -A per token.
# seq 0: 1 valid token (A = 1); seq 1: 3 valid tokens (A = 2). Padding holds nan.
NAN = math.nan
LP = [[-1.0, NAN, NAN], [-1.0, -2.0, -3.0]]
OLD = [[-1.0, 0.0, 0.0], [-1.0, -2.0, -3.0]]
ADV = [1.0, 2.0]
MASK = [[1, 0, 0], [1, 1, 1]]
SEQUENCE_LEVEL = LossConfig(token_level_loss=False)


def test_token_level_aggregation():
    # sum l = -1 + 3 * (-2) = -7 over N = 4 tokens -> -1.75
    loss, metrics, grad = _loss(LP, OLD, ADV, MASK, normalizer=4.0)
    assert loss.item() == pytest.approx(-1.75)
    # dloss/dlp = -A r / N on valid tokens, 0 on padding (and not nan)
    torch.testing.assert_close(grad, torch.tensor([[-0.25, 0.0, 0.0], [-0.5, -0.5, -0.5]]))
    assert metrics["probs_ratio"] == pytest.approx(1.0)


def test_sequence_level_aggregation():
    # sequence means -1 and -2; sum -3 over N = 2 sequences -> -1.5
    loss, _, grad = _loss(LP, OLD, ADV, MASK, SEQUENCE_LEVEL, normalizer=2.0)
    assert loss.item() == pytest.approx(-1.5)
    # seq 0: -1 / (1 token * 2 seqs) = -0.5; seq 1: -2 / (3 tokens * 2 seqs) = -1/3
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.0, 0.0], [-1 / 3, -1 / 3, -1 / 3]]))


@pytest.mark.parametrize(
    ("cfg", "normalizer", "full"), [(None, 4.0, -1.75), (SEQUENCE_LEVEL, 2.0, -1.5)]
)
def test_micro_batches_sum_to_the_full_batch(cfg, normalizer, full):
    # each micro-batch holds one sequence and divides by the shared global normalizer
    total, ratio_total = 0.0, 0.0
    for b in range(2):
        loss, metrics, _ = _loss([LP[b]], [OLD[b]], [ADV[b]], [MASK[b]], cfg, normalizer)
        total += loss.item()
        ratio_total += metrics["probs_ratio"]
    assert total == pytest.approx(full)
    assert ratio_total == pytest.approx(1.0)


def test_truncated_importance_sampling_weights_the_loss():
    # A = 1, r = 1, w = exp(lp_old - lp_gen) = [0.5, 3] -> tis [0.5, 2]
    # loss = (-0.5 - 2) / 2 = -1.25; sampling_importance_ratio = 1.25; 1 of 2 tokens truncated
    cfg = LossConfig(
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="tis",
        truncated_importance_sampling_ratio=2.0,
    )
    gen_BT = torch.tensor([[LOG(2.0), -LOG(3.0)]])
    loss, metrics, grad = _loss(
        [[0.0, 0.0]], [[0.0, 0.0]], [1.0], [[1, 1]], cfg, gen_logprobs_BT=gen_BT
    )
    assert loss.item() == pytest.approx(-1.25, rel=1e-6)
    # gradient -w A r / N = [-0.25, -1]
    torch.testing.assert_close(grad, torch.tensor([[-0.25, -1.0]]))
    assert metrics["sampling_importance_ratio"] == pytest.approx(1.25, rel=1e-6)
    assert metrics["is_oob_ratio"] == pytest.approx(0.5)


def test_icepop_and_seq_mask_tis_in_the_loss():
    # w = [0.5, 3], A = 1, r = 1
    gen_BT = torch.tensor([[LOG(2.0), -LOG(3.0)]])
    icepop = LossConfig(
        use_importance_sampling_correction=True,
        truncated_importance_sampling_type="icepop",
        truncated_importance_sampling_ratio=2.0,
        truncated_importance_sampling_ratio_min=0.25,
    )
    # icepop keeps 0.5, zeroes 3: loss = -0.5 / 2 = -0.25
    loss, _, _ = _loss([[0.0, 0.0]], [[0.0, 0.0]], [1.0], [[1, 1]], icepop, gen_logprobs_BT=gen_BT)
    assert loss.item() == pytest.approx(-0.25, rel=1e-6)
    # seq-mask-tis: geometric mean sqrt(0.5 * 3) = 1.2247 in [0.25, 2] -> kept with raw
    # weights: loss = (-0.5 - 3) / 2 = -1.75
    seq_mask = LossConfig(
        **{**icepop.model_dump(), "truncated_importance_sampling_type": "seq-mask-tis"}
    )
    loss, metrics, _ = _loss(
        [[0.0, 0.0]], [[0.0, 0.0]], [1.0], [[1, 1]], seq_mask, gen_logprobs_BT=gen_BT
    )
    assert loss.item() == pytest.approx(-1.75, rel=1e-6)
    assert metrics["is_oob_ratio"] == 0.0


def test_importance_sampling_needs_gen_logprobs():
    cfg = LossConfig(use_importance_sampling_correction=True)
    with pytest.raises(ValueError, match="gen_logprobs_BT"):
        _loss([[0.0]], [[0.0]], [1.0], [[1]], cfg)


def test_gen_logprobs_without_correction_only_feed_metrics():
    # w = 0.5 is reported but not applied: loss = -A r = -1
    gen_BT = torch.tensor([[LOG(2.0)]])
    loss, metrics, _ = _loss([[0.0]], [[0.0]], [1.0], [[1]], gen_logprobs_BT=gen_BT)
    assert loss.item() == pytest.approx(-1.0)
    assert metrics["sampling_importance_ratio"] == pytest.approx(0.5, rel=1e-6)


def test_kl_penalty_k1():
    # A = 0 so the surrogate is 0; k1 = lp - lp_ref = -1 - (-2) = 1; loss = 0.1 * 1
    # dloss/dlp = beta * dk1/dlp = 0.1
    cfg = LossConfig(reference_policy_kl_penalty=0.1, reference_policy_kl_type="k1")
    ref_BT = torch.tensor([[-2.0]])
    loss, metrics, grad = _loss([[-1.0]], [[-1.0]], [0.0], [[1]], cfg, ref_logprobs_BT=ref_BT)
    assert loss.item() == pytest.approx(0.1, rel=1e-6)
    assert grad.item() == pytest.approx(0.1, rel=1e-6)
    assert metrics["kl_penalty"] == pytest.approx(1.0, rel=1e-6)


def test_kl_penalty_k3_gradient():
    # k3 with logr = lp_ref - lp = -1: e^-1 - 1 + 1 = e^-1; d k3 / d lp = 1 - e^logr = 1 - e^-1
    cfg = LossConfig(reference_policy_kl_penalty=0.5)
    ref_BT = torch.tensor([[-2.0]])
    loss, _, grad = _loss([[-1.0]], [[-1.0]], [0.0], [[1]], cfg, ref_logprobs_BT=ref_BT)
    assert loss.item() == pytest.approx(0.5 * math.exp(-1), rel=1e-6)
    assert grad.item() == pytest.approx(0.5 * (1 - math.exp(-1)), rel=1e-6)


def test_kl_needs_ref_logprobs_only_when_beta_positive():
    with pytest.raises(ValueError, match="ref_logprobs_BT"):
        _loss([[0.0]], [[0.0]], [1.0], [[1]], LossConfig(reference_policy_kl_penalty=0.1))
    _, metrics, _ = _loss([[0.0]], [[0.0]], [1.0], [[1]])
    assert metrics["kl_penalty"] == 0.0


def test_gspo_sequence_ratio():
    # lp - lp_old = [log 2, 0]: mean log 2 / 2 -> r = sqrt(2) for both tokens. A = -1:
    # l = max(sqrt 2, 1.28) = sqrt 2 per token; sequence mean sqrt 2; one sequence -> sqrt 2.
    # (per-token ratios [2, 1] would give (2 + 1) / 2 = 1.5.)
    # d/dlp_t exp(mean(lp - lp_old)) = sqrt(2) / 2 for each token.
    cfg = LossConfig(sequence_level_importance_ratios=True, token_level_loss=False)
    loss, metrics, grad = _loss(
        [[LOG(2.0), 0.0]], [[0.0, 0.0]], [-1.0], [[1, 1]], cfg, normalizer=1.0
    )
    assert loss.item() == pytest.approx(math.sqrt(2), rel=1e-6)
    torch.testing.assert_close(grad, torch.full((1, 2), math.sqrt(2) / 2))
    assert metrics["probs_ratio"] == pytest.approx(math.sqrt(2), rel=1e-6)


def test_rejects_non_positive_normalizer():
    with pytest.raises(ValueError, match="global_normalizer"):
        _loss([[0.0]], [[0.0]], [1.0], [[1]], normalizer=0.0)
