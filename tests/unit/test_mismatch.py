import math

import pytest
import torch

from posttrain.algorithms.mismatch import gen_kl_error, token_mult_prob_error

pytestmark = pytest.mark.unit

# third token is masked out and its huge difference must not count
GEN_BT = torch.tensor([[-1.0, -2.0, -30.0]])
OLD_BT = torch.tensor([[-1.1, -2.0, 0.0]])
MASK_BT = torch.tensor([[1, 1, 0]])


def test_token_mult_prob_error():
    # |lp_gen - lp_old| = [0.1, 0]: (e^0.1 + e^0) / 2
    expected = (math.exp(0.1) + 1.0) / 2
    assert token_mult_prob_error(GEN_BT, OLD_BT, MASK_BT) == pytest.approx(expected, rel=1e-6)


def test_gen_kl_error():
    # logr = lp_old - lp_gen = [-0.1, 0]; k3 = e^-0.1 - 1 + 0.1 and 0
    expected = (math.exp(-0.1) - 0.9 + 0.0) / 2
    assert gen_kl_error(GEN_BT, OLD_BT, MASK_BT) == pytest.approx(expected, rel=1e-5)


def test_empty_mask():
    empty_BT = torch.zeros(1, 3)
    assert token_mult_prob_error(GEN_BT, OLD_BT, empty_BT) == 1.0
    assert gen_kl_error(GEN_BT, OLD_BT, empty_BT) == 0.0
