import math

import pytest
import torch

from posttrain.algorithms.advantages import clip_advantages, group_advantages

pytestmark = pytest.mark.unit

EPS = 1e-6


def test_mean_baseline_without_normalization():
    # baseline = (1 + 0 + 0 + 1) / 4 = 0.5; A = r - 0.5
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    advantages_PG = group_advantages(
        rewards_PG, leave_one_out_baseline=False, normalize_rewards=False
    )
    torch.testing.assert_close(advantages_PG, torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_mean_baseline_with_normalization():
    # deviations +-0.5, sum of squares 4 * 0.25 = 1, Bessel: 1 / (4 - 1) = 1/3, std = sqrt(1/3)
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    advantages_PG = group_advantages(
        rewards_PG, leave_one_out_baseline=False, normalize_rewards=True
    )
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(advantages_PG, torch.tensor([[a, -a, -a, a]]))


def test_leave_one_out_baseline():
    # r=1: others {0, 0, 1}, mean 1/3, A = 2/3.  r=0: others {1, 0, 1}, mean 2/3, A = -2/3.
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    advantages_PG = group_advantages(
        rewards_PG, leave_one_out_baseline=True, normalize_rewards=False
    )
    torch.testing.assert_close(advantages_PG, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))


def test_leave_one_out_with_normalization():
    # set {0, 0, 1}: E[r] = 1/3, E[r^2] = 1/3, biased var = 1/3 - 1/9 = 2/9, x 3/2 = 1/3.
    # set {1, 0, 1}: E[r] = 2/3, E[r^2] = 2/3, biased var = 2/3 - 4/9 = 2/9, x 3/2 = 1/3.
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    advantages_PG = group_advantages(
        rewards_PG, leave_one_out_baseline=True, normalize_rewards=True
    )
    a = (2 / 3) / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(advantages_PG, torch.tensor([[a, -a, -a, a]]))


def test_rows_are_independent_and_equal_rewards_are_not_divided():
    # row 1: all rewards 2, baseline 2, std 0 -> A = 0 without division by eps
    rewards_PG = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    advantages_PG = group_advantages(
        rewards_PG, leave_one_out_baseline=False, normalize_rewards=True
    )
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(advantages_PG, torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]]))


def test_invalid_samples_are_ignored_and_get_zero():
    # valid rewards {1, 0}: baseline 0.5; the invalid 5 enters neither baseline nor A
    rewards_PG = torch.tensor([[1.0, 0.0, 5.0]])
    valid_PG = torch.tensor([[True, True, False]])
    advantages_PG = group_advantages(
        rewards_PG, valid_PG, leave_one_out_baseline=False, normalize_rewards=False
    )
    torch.testing.assert_close(advantages_PG, torch.tensor([[0.5, -0.5, 0.0]]))


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_groups_with_at_most_one_valid_sample_get_zero(leave_one_out):
    rewards_PG = torch.tensor([[1.0, 0.0], [3.0, 7.0]])
    valid_PG = torch.tensor([[True, False], [False, False]])
    advantages_PG = group_advantages(
        rewards_PG, valid_PG, leave_one_out_baseline=leave_one_out, normalize_rewards=True
    )
    torch.testing.assert_close(advantages_PG, torch.zeros(2, 2))


def test_leave_one_out_with_two_samples_has_no_std():
    # each baseline set has one element: b = the other reward, std undefined -> 0, no division
    rewards_PG = torch.tensor([[1.0, 0.0]])
    advantages_PG = group_advantages(
        rewards_PG, leave_one_out_baseline=True, normalize_rewards=True
    )
    torch.testing.assert_close(advantages_PG, torch.tensor([[1.0, -1.0]]))


def test_clip_advantages():
    advantages = torch.tensor([-3.0, -0.5, 0.0, 2.5])
    torch.testing.assert_close(
        clip_advantages(advantages, 1.0), torch.tensor([-1.0, -0.5, 0.0, 1.0])
    )
    with pytest.raises(ValueError, match="max_abs"):
        clip_advantages(advantages, 0.0)
