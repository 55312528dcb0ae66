import pytest
import torch

from posttrain.algorithms.reward_shaping import (
    overlong_filter_mask,
    overlong_reward_penalty,
    scale_rewards,
)

pytestmark = pytest.mark.unit


def test_scale_rewards_zero_one_to_plus_minus_one():
    # clamp to [0, 1] then r' = -1 + 2 r: 0 -> -1, 1 -> 1, 0.5 -> 0, 2 -> 1, -1 -> -1
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0, -1.0])
    scaled = scale_rewards(rewards, 0.0, 1.0, -1.0, 1.0)
    torch.testing.assert_close(scaled, torch.tensor([-1.0, 1.0, 0.0, 1.0, -1.0]))


def test_scale_rewards_rejects_empty_source_range():
    with pytest.raises(ValueError, match="source_max"):
        scale_rewards(torch.tensor([0.0]), 1.0, 1.0, -1.0, 1.0)


def test_overlong_penalty_below_inside_and_at_max():
    # L_max = 100, buf = 20: free up to 80, then -(L - 80) / 20
    # 50 -> 0, 80 -> 0, 90 -> -0.5, 100 -> -1
    lengths_B = torch.tensor([50, 80, 90, 100])
    penalty_B = overlong_reward_penalty(
        lengths_B, max_response_length=100, overlong_buffer_length=20, penalty_factor=1.0
    )
    torch.testing.assert_close(penalty_B, torch.tensor([0.0, 0.0, -0.5, -1.0]))


def test_overlong_penalty_scales_with_factor():
    # L = 95: -(95 - 80) / 20 * 2 = -1.5; L = 100: -2
    lengths_B = torch.tensor([95, 100])
    penalty_B = overlong_reward_penalty(
        lengths_B, max_response_length=100, overlong_buffer_length=20, penalty_factor=2.0
    )
    torch.testing.assert_close(penalty_B, torch.tensor([-1.5, -2.0]))


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(ValueError, match="overlong_buffer_length"):
        overlong_reward_penalty(
            torch.tensor([1]), max_response_length=10, overlong_buffer_length=0, penalty_factor=1.0
        )


def test_overlong_filter_masks_truncated_samples():
    truncated_B = torch.tensor([True, False, True])
    assert overlong_filter_mask(truncated_B).tolist() == [False, True, False]
