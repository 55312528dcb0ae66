"""Group-relative advantages (GRPO), as NeMo-RL's `calculate_baseline_and_std_per_prompt`.

Rewards come as a [P, G] matrix: one row per prompt, one column per generation of that prompt.
"""

import torch
from torch import Tensor


def group_advantages(
    rewards_PG: Tensor,
    valid_PG: Tensor | None = None,
    *,
    leave_one_out_baseline: bool,
    normalize_rewards: bool,
    eps: float = 1e-6,
) -> Tensor:
    """Advantages A = r - b, optionally divided by (std + eps), per prompt group.

    For sample i of a group whose valid samples form the set V (n = |V|):
      - baseline set S_i = V (mean baseline) or V without i (leave-one-out, RLOO);
        k = |S_i| = n or n - 1.
      - b_i = mean_{j in S_i} r_j
      - std_i = sqrt((mean_{j in S_i} r_j^2 - b_i^2) * k / (k - 1))  (Bessel-corrected);
        0 when k <= 1.
      - A_i = r_i - b_i; if normalize_rewards and std_i > 0: A_i = A_i / (std_i + eps).
    Groups with n <= 1 and invalid samples get A = 0.

    Args:
        rewards_PG: rewards, float [P, G] (any units; A is in reward units unless normalized).
        valid_PG: bool [P, G], False for samples to ignore (default: all valid).
        leave_one_out_baseline: use the mean of the other valid samples as baseline.
        normalize_rewards: divide by the group std where it is > 0.
        eps: added to the std before dividing.

    Returns:
        advantages_PG, same shape and dtype as rewards_PG.
    """
    if rewards_PG.dim() != 2:
        raise ValueError(f"rewards_PG must be [P, G], got shape {tuple(rewards_PG.shape)}")
    if valid_PG is None:
        valid_PG = torch.ones_like(rewards_PG, dtype=torch.bool)
    valid_PG = valid_PG.bool()
    # float64 keeps E[r^2] - E[r]^2 from leaving round-off where all rewards agree.
    r_PG = torch.where(valid_PG, rewards_PG.double(), 0.0)
    n_P1 = valid_PG.sum(dim=1, keepdim=True).double()
    sum_P1 = r_PG.sum(dim=1, keepdim=True)
    sq_sum_P1 = r_PG.square().sum(dim=1, keepdim=True)
    if leave_one_out_baseline:
        k_PG = (n_P1 - 1).expand_as(r_PG)
        sum_PG = sum_P1 - r_PG
        sq_sum_PG = sq_sum_P1 - r_PG.square()
    else:
        k_PG = n_P1.expand_as(r_PG)
        sum_PG = sum_P1.expand_as(r_PG)
        sq_sum_PG = sq_sum_P1.expand_as(r_PG)

    k_safe_PG = k_PG.clamp(min=1)
    baseline_PG = sum_PG / k_safe_PG
    biased_var_PG = (sq_sum_PG / k_safe_PG - baseline_PG.square()).clamp(min=0)
    var_PG = torch.where(k_PG > 1, biased_var_PG * k_PG / (k_PG - 1).clamp(min=1), 0.0)
    std_PG = var_PG.sqrt()

    advantages_PG = r_PG - baseline_PG
    if normalize_rewards:
        advantages_PG = torch.where(std_PG > 0, advantages_PG / (std_PG + eps), advantages_PG)
    advantages_PG = torch.where(valid_PG & (n_P1 > 1), advantages_PG, 0.0)
    return advantages_PG.to(rewards_PG.dtype)


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Clamp advantages to [-max_abs, max_abs] (same units as the advantages)."""
    if max_abs <= 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    return advantages.clamp(min=-max_abs, max=max_abs)
