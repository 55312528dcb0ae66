"""Train/generate mismatch metrics, NeMo-RL names (see ALGORITHMS.md "Mismatch metrics").

Both are means over the valid tokens passed in (not globally normalized); they are logged
as floats. NeMo-RL investigates token_mult_prob_error above 1.05; gen_kl_error around 1e-3
is called acceptable.
"""

import torch
from torch import Tensor


def token_mult_prob_error(
    gen_logprobs_BT: Tensor, old_logprobs_BT: Tensor, mask_BT: Tensor
) -> float:
    """train/token_mult_prob_error = sum(m * exp(|lp_gen - lp_old|)) / sum(m).

    Dimensionless, >= 1; 1 means the engine and the trainer agree exactly. An empty mask
    returns 1.0 (no evidence of mismatch).
    """
    valid_BT = mask_BT.bool()
    num_valid = int(valid_BT.sum())
    if num_valid == 0:
        return 1.0
    abs_diff_BT = (gen_logprobs_BT.detach() - old_logprobs_BT.detach()).abs()
    error_BT = torch.where(valid_BT, torch.exp(torch.where(valid_BT, abs_diff_BT, 0.0)), 0.0)
    return float(error_BT.sum() / num_valid)


def gen_kl_error(gen_logprobs_BT: Tensor, old_logprobs_BT: Tensor, mask_BT: Tensor) -> float:
    """train/gen_kl_error = masked mean of k3 with logr = lp_old - lp_gen (nats), unclamped.

    k3 = exp(logr) - 1 - logr estimates KL(pi_gen || pi_old) on tokens sampled from pi_gen.
    An empty mask returns 0.0.
    """
    valid_BT = mask_BT.bool()
    num_valid = int(valid_BT.sum())
    if num_valid == 0:
        return 0.0
    log_ratio_BT = torch.where(valid_BT, old_logprobs_BT.detach() - gen_logprobs_BT.detach(), 0.0)
    k3_BT = torch.exp(log_ratio_BT) - 1 - log_ratio_BT
    return float(torch.where(valid_BT, k3_BT, 0.0).sum() / num_valid)
