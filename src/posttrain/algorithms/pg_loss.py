"""Clipped policy-gradient loss (PPO clip with DAPO clip-higher, dual clip, GSPO ratios,
truncated importance sampling and a reference KL penalty), as NeMo-RL's `ClippedPGLossFn`.

Normalization lives in `aggregate` and nowhere else: the loss divides by the normalizer the
trainer gives it (valid tokens, or valid sequences, of the WHOLE global batch, all-reduced),
so the losses of the micro-batches of a step sum to the global-batch loss.
"""

import torch
from torch import Tensor

from posttrain.algorithms.importance_sampling import (
    importance_out_of_bounds,
    truncated_importance_weights,
)
from posttrain.algorithms.kl import kl_penalty
from posttrain.config.loss import LossConfig


def aggregate(
    values_BT: Tensor, mask_BT: Tensor, *, token_level: bool, global_normalizer: float
) -> Tensor:
    """Reduce per-token values to this micro-batch's share of the global mean (0-d tensor).

    token_level:  sum_{b,t} m v / N, N = valid tokens in the global batch.
    otherwise:    sum_b (sum_t m v / sum_t m) / N, N = valid sequences in the global batch;
                  a sequence without valid tokens contributes 0.
    mask_BT is 0/1 (token mask x sample mask); masked positions may hold any finite value.
    """
    valid_BT = mask_BT.bool()
    masked_BT = torch.where(valid_BT, values_BT, 0.0)
    if token_level:
        return masked_BT.sum() / global_normalizer
    tokens_B = valid_BT.sum(dim=-1).clamp(min=1)
    return (masked_BT.sum(dim=-1) / tokens_B).sum() / global_normalizer


def policy_ratios(
    logprobs_BT: Tensor, old_logprobs_BT: Tensor, mask_BT: Tensor, sequence_level: bool
) -> Tensor:
    """r = exp(lp - lp_old) per token, or (GSPO) exp(masked mean_t (lp - lp_old)) broadcast to
    every token of the sequence. Dimensionless; gradients flow through logprobs_BT."""
    valid_BT = mask_BT.bool()
    log_ratio_BT = torch.where(valid_BT, logprobs_BT - old_logprobs_BT, 0.0)
    if sequence_level:
        tokens_B1 = valid_BT.sum(dim=-1, keepdim=True).clamp(min=1)
        log_ratio_BT = (log_ratio_BT.sum(dim=-1, keepdim=True) / tokens_B1).expand_as(logprobs_BT)
    return torch.exp(log_ratio_BT)


def _clipped_surrogate(
    ratio_BT: Tensor, adv_BT: Tensor, cfg: LossConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-token l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), dual-clipped to
    min(l, -c A) where A < 0. Returns (l, clipped ratio, where the clipped branch won,
    where the dual clip won or None without dual clip)."""
    ratio_clamped_BT = ratio_BT.clamp(min=1 - cfg.ratio_clip_min, max=1 + cfg.ratio_clip_max)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_clamped_BT
    pg_BT = torch.maximum(unclipped_BT, clipped_BT)
    took_clip_BT = clipped_BT.detach() > unclipped_BT.detach()
    if cfg.ratio_clip_c is None:
        return pg_BT, ratio_clamped_BT, took_clip_BT, None
    dual_BT = -adv_BT * cfg.ratio_clip_c
    took_dual_BT = (adv_BT < 0) & (dual_BT < pg_BT.detach())
    return torch.where(took_dual_BT, dual_BT, pg_BT), ratio_clamped_BT, took_clip_BT, took_dual_BT


def clipped_pg_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_B: Tensor,
    mask_BT: Tensor,
    cfg: LossConfig,
    *,
    global_normalizer: float,
    gen_logprobs_BT: Tensor | None = None,
    ref_logprobs_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate loss of one micro-batch and its metric contributions.

    Per token, with r = exp(lp - lp_old) (GSPO: r = exp(mean_t m (lp - lp_old)) for all
    tokens of the sequence), A the sequence's advantage, eps_low/high = ratio_clip_min/max:
        l = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
        dual clip (c = ratio_clip_c):   l = min(l, -c A) where A < 0
        importance sampling correction: l = w l, w = truncated exp(lp_old - lp_gen)
        KL penalty (beta > 0):          l = l + beta kl(lp, lp_ref)  [x exp(lp - lp_gen),
                                        no grad, if use_on_policy_kl_approximation]
    then `aggregate`d with token_level = cfg.token_level_loss.

    Args:
        logprobs_BT: current policy logprobs of the response tokens (requires grad), [B, T].
        old_logprobs_BT: logprobs recomputed by the trainer with the generating weights.
        advantages_B: one advantage per sequence.
        mask_BT: 0/1 token mask x sample mask.
        cfg: the loss config.
        global_normalizer: valid tokens (token-level) or valid sequences (sequence-level) in
            the whole global batch, summed over micro-batches and ranks.
        gen_logprobs_BT: logprobs reported by the rollout engine; needed for importance
            sampling and the on-policy KL approximation, used for metrics when given.
        ref_logprobs_BT: reference-policy logprobs; needed only when
            reference_policy_kl_penalty > 0.

    Returns:
        loss: 0-d tensor; summing over the micro-batches of a step gives the global loss.
        metrics: python floats normalized like the loss, so they too sum across
            micro-batches to the global value: loss, probs_ratio, probs_ratio_clamped,
            clip_fraction (share where the clipped branch is taken), dual_clip_fraction (only
            with ratio_clip_c), kl_penalty (raw KL, without beta; 0 when beta = 0),
            approx_entropy (E_gen[-(pi / pi_gen) log pi], with pi_gen = pi_old when
            gen_logprobs_BT is None) and, when gen_logprobs_BT is given,
            sampling_importance_ratio (mean w after truncation) and, with a truncation type,
            is_oob_ratio (share of tokens whose weight truncation changed).
    """
    beta = cfg.reference_policy_kl_penalty
    if global_normalizer <= 0:
        raise ValueError(f"global_normalizer must be > 0, got {global_normalizer}")
    if cfg.use_importance_sampling_correction and gen_logprobs_BT is None:
        raise ValueError("use_importance_sampling_correction is on but gen_logprobs_BT is None")
    if beta > 0 and ref_logprobs_BT is None:
        raise ValueError(
            f"reference_policy_kl_penalty is {beta} but ref_logprobs_BT is None: "
            "compute reference logprobs, or set reference_policy_kl_penalty: 0"
        )
    if beta > 0 and cfg.use_on_policy_kl_approximation and gen_logprobs_BT is None:
        raise ValueError("use_on_policy_kl_approximation needs gen_logprobs_BT")

    # Zeroing masked positions first keeps padding garbage (nan, -inf) out of values and grads.
    valid_BT = mask_BT.bool()
    lp_BT = torch.where(valid_BT, logprobs_BT, 0.0)
    lp_old_BT = torch.where(valid_BT, old_logprobs_BT.detach(), 0.0)
    adv_BT = advantages_B.detach().to(lp_BT.dtype).unsqueeze(-1).expand_as(lp_BT)

    def reduce(values_BT: Tensor) -> Tensor:
        return aggregate(
            values_BT,
            valid_BT,
            token_level=cfg.token_level_loss,
            global_normalizer=global_normalizer,
        )

    ratio_BT = policy_ratios(lp_BT, lp_old_BT, valid_BT, cfg.sequence_level_importance_ratios)
    pg_BT, ratio_clamped_BT, clipped_BT, dual_clipped_BT = _clipped_surrogate(ratio_BT, adv_BT, cfg)
    metrics: dict[str, float] = {}
    metrics["clip_fraction"] = reduce(clipped_BT.to(lp_BT.dtype)).item()
    if dual_clipped_BT is not None:
        metrics["dual_clip_fraction"] = reduce(dual_clipped_BT.to(lp_BT.dtype)).item()

    lp_gen_BT = None
    if gen_logprobs_BT is not None:
        lp_gen_BT = torch.where(valid_BT, gen_logprobs_BT.detach(), 0.0)
        kind = cfg.truncated_importance_sampling_type
        ratio_max = cfg.truncated_importance_sampling_ratio
        ratio_min = cfg.truncated_importance_sampling_ratio_min
        is_weights_BT = truncated_importance_weights(
            lp_old_BT, lp_gen_BT, valid_BT, kind, ratio_max, ratio_min
        )
        metrics["sampling_importance_ratio"] = reduce(is_weights_BT).item()
        if kind is not None and ratio_max is not None:
            oob_BT = importance_out_of_bounds(
                lp_old_BT, lp_gen_BT, valid_BT, kind, ratio_max, ratio_min
            )
            metrics["is_oob_ratio"] = reduce(oob_BT.to(lp_BT.dtype)).item()
        if cfg.use_importance_sampling_correction:
            pg_BT = pg_BT * is_weights_BT
    loss = reduce(pg_BT)

    metrics["kl_penalty"] = 0.0
    if beta > 0:
        assert ref_logprobs_BT is not None  # checked above; narrows the type
        lp_ref_BT = torch.where(valid_BT, ref_logprobs_BT.detach(), 0.0)
        kl_BT = kl_penalty(lp_BT, lp_ref_BT, cfg.reference_policy_kl_type)
        if cfg.use_on_policy_kl_approximation:
            assert lp_gen_BT is not None  # checked above; narrows the type
            on_policy_BT = torch.exp(lp_BT.detach() - lp_gen_BT)
            kl_BT = kl_BT * torch.nan_to_num(on_policy_BT, nan=0.0, posinf=0.0, neginf=0.0)
        kl = reduce(kl_BT)
        loss = loss + beta * kl
        metrics["kl_penalty"] = kl.item()

    with torch.no_grad():
        metrics["loss"] = loss.item()
        metrics["probs_ratio"] = reduce(ratio_BT).item()
        metrics["probs_ratio_clamped"] = reduce(ratio_clamped_BT).item()
        lp_sampler_BT = lp_gen_BT if lp_gen_BT is not None else lp_old_BT
        entropy_BT = -torch.exp(lp_BT - lp_sampler_BT) * lp_BT
        metrics["approx_entropy"] = reduce(entropy_BT).item()
    return loss, metrics
