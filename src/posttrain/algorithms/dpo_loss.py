"""Direct preference optimization loss (Rafailov et al. 2023, arXiv 2305.18290), with an optional
NLL term on the chosen responses (as in RPO, Pang et al. 2024).

Per pair p, with sequence logprobs summed over the response's scored tokens under the policy
(pc_p, pr_p: chosen, rejected) and under the reference policy (rc_p, rr_p):

    reward_chosen_p   = beta (pc_p - rc_p)          reward_rejected_p = beta (pr_p - rr_p)
    margin_p          = reward_chosen_p - reward_rejected_p
    loss = sum_p -log sigmoid(margin_p) / P  +  sft_weight * (-sum_p pc_p / T)

P = pairs and T = chosen-response tokens of the WHOLE global batch: the trainer hands every
micro-batch the same P and T (counted over the step's pairs and all ranks), so the micro-batch
losses sum to the global-batch loss and their gradients to its gradient. T counts at least 1
here, the one place it is clamped: a batch without chosen tokens has an sft_loss of 0, not 0/0,
in training and validation alike. Gradients:

    d loss / d pc_p = -beta sigmoid(-margin_p) / P - sft_weight / T
    d loss / d pr_p = +beta sigmoid(-margin_p) / P

Metrics are shares of global means in the same way (they sum over micro-batches and ranks):
rewards/chosen, rewards/rejected, rewards/margin (means), rewards/accuracy (share of pairs with
margin > 0, a tie counting one half: every margin is 0 at the start, chance), logps/chosen and
logps/rejected (mean summed logprob), preference_loss, sft_loss (mean NLL per chosen token, logged
whatever sft_weight) and loss.
"""

import torch
from torch import Tensor
from torch.nn.functional import logsigmoid


def sequence_logprobs(logprobs_BT: Tensor, loss_mask_BT: Tensor) -> Tensor:
    """Each row's logprob summed over its masked tokens, [B] (nats); masked-out positions may
    hold any finite value. The reference logprobs and the policy's go through this one function."""
    return torch.where(loss_mask_BT.bool(), logprobs_BT, 0.0).sum(dim=-1)


def dpo_loss(
    policy_chosen_P: Tensor,
    policy_rejected_P: Tensor,
    reference_chosen_P: Tensor,
    reference_rejected_P: Tensor,
    *,
    beta: float,
    sft_weight: float,
    global_pairs: float,
    global_chosen_tokens: float,
) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of the global-batch loss (0-d, gradients through the policy's
    logprobs) and of each metric (see the module docstring). All inputs are per-pair sequence
    logprobs in nats; the reference ones are constants."""
    reward_chosen_P = beta * (policy_chosen_P - reference_chosen_P)
    reward_rejected_P = beta * (policy_rejected_P - reference_rejected_P)
    margin_P = reward_chosen_P - reward_rejected_P
    preference_loss = -logsigmoid(margin_P).sum() / global_pairs
    sft_loss = -policy_chosen_P.sum() / max(global_chosen_tokens, 1.0)
    loss = preference_loss + sft_weight * sft_loss if sft_weight else preference_loss
    share = lambda values_P: float(values_P.detach().sum()) / global_pairs  # noqa: E731
    correct_P = (margin_P > 0).float() + 0.5 * (margin_P == 0).float()
    metrics = {
        "loss": float(loss.detach()),
        "preference_loss": float(preference_loss.detach()),
        "sft_loss": float(sft_loss.detach()),
        "rewards/chosen": share(reward_chosen_P),
        "rewards/rejected": share(reward_rejected_P),
        "rewards/margin": share(margin_P),
        "rewards/accuracy": share(correct_P),
        "logps/chosen": share(policy_chosen_P),
        "logps/rejected": share(policy_rejected_P),
    }
    return loss, metrics
