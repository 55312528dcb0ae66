"""Supervised fine-tuning loss: negative log-likelihood of the supervised tokens.

    loss = -sum_{b,t} m_bt logprob_bt / N,   N = supervised tokens of the WHOLE global batch

The trainer hands every micro-batch the same N (counted over the step's rows and all ranks), so
the micro-batch losses sum to the global-batch loss and their gradients to its gradient: token
level normalization, identical whatever the micro-batch size, packing or number of processes.
"""

from torch import Tensor

from posttrain.algorithms.pg_loss import aggregate


def sft_loss(logprobs_BT: Tensor, loss_mask_BT: Tensor, *, global_normalizer: float) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's share of the global mean NLL (nats per supervised token), and {"loss": that share}.

    logprobs_BT[b, t] scores token t (aligned layout); loss_mask_BT is 1 on supervised tokens, 0
    elsewhere (where logprobs may hold any finite value: padding, prompts, column 0).
    """
    loss = aggregate(-logprobs_BT, loss_mask_BT, token_level=True, global_normalizer=global_normalizer)
    return loss, {"loss": float(loss.detach())}
