import math

import pytest
import torch

from posttrain.algorithms.kl import kl_penalty

pytestmark = pytest.mark.unit


def test_k1_k2_k3_values():
    # lp - lp_ref = [1, -1]
    lp_BT = torch.tensor([[-1.0, -2.0]])
    ref_BT = torch.tensor([[-2.0, -1.0]])
    # k1 = lp - lp_ref
    torch.testing.assert_close(kl_penalty(lp_BT, ref_BT, "k1"), torch.tensor([[1.0, -1.0]]))
    # k2 = (lp - lp_ref)^2 / 2
    torch.testing.assert_close(kl_penalty(lp_BT, ref_BT, "k2"), torch.tensor([[0.5, 0.5]]))
    # k3: logr = lp_ref - lp = [-1, 1]; e^-1 - 1 + 1 = e^-1; e^1 - 1 - 1 = e - 2
    torch.testing.assert_close(
        kl_penalty(lp_BT, ref_BT, "k3"), torch.tensor([[math.exp(-1), math.e - 2]])
    )


def test_k3_is_clamped():
    # logr = -50 -> -20: e^-20 + 19 ~ 19 -> 10;  logr = 50 -> 20: e^20 - 21 -> 10
    lp_BT = torch.tensor([[0.0, -50.0]])
    ref_BT = torch.tensor([[-50.0, 0.0]])
    torch.testing.assert_close(kl_penalty(lp_BT, ref_BT, "k3"), torch.tensor([[10.0, 10.0]]))


def test_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")  # type: ignore[arg-type]
