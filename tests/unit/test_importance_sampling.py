import math

import pytest
import torch

from posttrain.algorithms.importance_sampling import (
    importance_out_of_bounds,
    truncated_importance_weights,
)

pytestmark = pytest.mark.unit

# w = exp(lp_old - lp_gen) = [0.5, 1, 3] with lp_gen = 0
GEN_BT = torch.zeros(1, 3)
OLD_BT = torch.log(torch.tensor([[0.5, 1.0, 3.0]]))
MASK_BT = torch.ones(1, 3)


def test_no_truncation_returns_raw_weights():
    weights_BT = truncated_importance_weights(OLD_BT, GEN_BT, MASK_BT, None, None)
    torch.testing.assert_close(weights_BT, torch.tensor([[0.5, 1.0, 3.0]]))


def test_tis_clamps():
    # clamp([0.5, 1, 3], 0, 2) = [0.5, 1, 2]; with min 0.6: [0.6, 1, 2]
    weights_BT = truncated_importance_weights(OLD_BT, GEN_BT, MASK_BT, "tis", 2.0)
    torch.testing.assert_close(weights_BT, torch.tensor([[0.5, 1.0, 2.0]]))
    weights_BT = truncated_importance_weights(OLD_BT, GEN_BT, MASK_BT, "tis", 2.0, 0.6)
    torch.testing.assert_close(weights_BT, torch.tensor([[0.6, 1.0, 2.0]]))
    oob_BT = importance_out_of_bounds(OLD_BT, GEN_BT, MASK_BT, "tis", 2.0, 0.6)
    assert oob_BT.tolist() == [[True, False, True]]


def test_icepop_zeroes_out_of_bounds_tokens():
    # keep w in [0.6, 2]: [0, 1, 0]
    weights_BT = truncated_importance_weights(OLD_BT, GEN_BT, MASK_BT, "icepop", 2.0, 0.6)
    torch.testing.assert_close(weights_BT, torch.tensor([[0.0, 1.0, 0.0]]))


def test_seq_mask_tis_zeroes_whole_sequences_and_keeps_token_weights():
    # seq 0: w = [0.5, 2], geometric mean exp((log 0.5 + log 2) / 2) = 1 -> kept, weights
    #        stay untruncated [0.5, 2] even though 0.5 < min.
    # seq 1: w = [3, 3], geometric mean 3 > 2 -> all zero.
    # seq 2: w = [1.5, 100] but the 100 is masked out: geometric mean 1.5 -> kept, [1.5, 0].
    w_BT = torch.tensor([[0.5, 2.0], [3.0, 3.0], [1.5, 100.0]])
    old_BT = torch.log(w_BT)
    gen_BT = torch.zeros(3, 2)
    mask_BT = torch.tensor([[1, 1], [1, 1], [1, 0]])
    weights_BT = truncated_importance_weights(old_BT, gen_BT, mask_BT, "seq-mask-tis", 2.0, 0.8)
    torch.testing.assert_close(weights_BT, torch.tensor([[0.5, 2.0], [0.0, 0.0], [1.5, 0.0]]))
    oob_BT = importance_out_of_bounds(old_BT, gen_BT, mask_BT, "seq-mask-tis", 2.0, 0.8)
    assert oob_BT.tolist() == [[False, False], [True, True], [False, False]]


def test_weights_are_detached_and_masked():
    old_BT = OLD_BT.clone().requires_grad_(True)
    mask_BT = torch.tensor([[1, 1, 0]])
    weights_BT = truncated_importance_weights(old_BT, GEN_BT, mask_BT, None, None)
    assert not weights_BT.requires_grad
    torch.testing.assert_close(weights_BT, torch.tensor([[0.5, 1.0, 0.0]]))


def test_non_finite_logprobs_give_zero_weight():
    # -inf - -inf = nan -> weight 0
    old_BT = torch.tensor([[-math.inf]])
    gen_BT = torch.tensor([[-math.inf]])
    weights_BT = truncated_importance_weights(old_BT, gen_BT, torch.ones(1, 1), "tis", 2.0)
    torch.testing.assert_close(weights_BT, torch.zeros(1, 1))
