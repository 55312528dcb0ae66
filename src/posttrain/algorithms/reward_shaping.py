"""Reward shaping: linear rescaling and DAPO's overlong handling (Yu et al. 2025, 2503.14476)."""

import torch
from torch import Tensor


def scale_rewards(
    rewards: Tensor,
    source_min: float,
    source_max: float,
    target_min: float,
    target_max: float,
) -> Tensor:
    """Clamp rewards to [source_min, source_max], then map that range linearly onto the target.

    r' = target_min + (clamp(r, source_min, source_max) - source_min)
                      * (target_max - target_min) / (source_max - source_min)
    e.g. source {0, 1} -> target {-1, +1} as in NeMo-RL's DAPO recipes.
    """
    if source_max <= source_min:
        raise ValueError(
            f"source_max ({source_max}) must be greater than source_min ({source_min})"
        )
    clamped = rewards.clamp(min=source_min, max=source_max)
    scale = (target_max - target_min) / (source_max - source_min)
    return target_min + (clamped - source_min) * scale


def overlong_reward_penalty(
    response_lengths_B: Tensor,
    *,
    max_response_length: int,
    overlong_buffer_length: int,
    penalty_factor: float,
) -> Tensor:
    """DAPO soft overlong punishment, to be added to the reward of each response.

    With L the response length in tokens, L_max = max_response_length and
    buf = overlong_buffer_length:
        penalty = min(-(L - (L_max - buf)) / buf * penalty_factor, 0)
    i.e. 0 while L <= L_max - buf, falling linearly to -penalty_factor at L = L_max. Lengths
    beyond L_max (which a correctly capped engine never produces) get -penalty_factor, as in
    the paper.

    Returns:
        penalty_B, float, <= 0, in reward units.
    """
    if not 0 < overlong_buffer_length <= max_response_length:
        raise ValueError(
            f"overlong_buffer_length must be in (0, max_response_length={max_response_length}],"
            f" got {overlong_buffer_length}"
        )
    expected_length = max_response_length - overlong_buffer_length
    excess_B = response_lengths_B.double() - expected_length
    penalty_B = (-excess_B / overlong_buffer_length * penalty_factor).clamp(
        min=-penalty_factor, max=0.0
    )
    return penalty_B.to(torch.get_default_dtype())


def overlong_filter_mask(truncated_B: Tensor) -> Tensor:
    """DAPO overlong filtering: keep_B is False for truncated responses (masked out of the loss)."""
    return ~truncated_B.bool()
