"""Configuration of the clipped policy-gradient loss (GRPO / DAPO / GSPO).

Field names follow NeMo-RL's `loss_fn` section so recipes translate one to one. Every
cross-field rule NeMo-RL only discovers at the first training step is checked here, at load
time. This module must import without torch: configs are validated before any model loads.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LossConfig(BaseModel):
    """Clipped policy-gradient loss, see `posttrain.algorithms.pg_loss.clipped_pg_loss`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # nan/inf are never a meaningful setting

    ratio_clip_min: float = Field(
        0.2,
        ge=0.0,
        description="eps_low: the probability ratio is clipped below at 1 - ratio_clip_min.",
    )
    ratio_clip_max: float = Field(
        0.28,
        ge=0.0,
        description=(
            "eps_high: the probability ratio is clipped above at 1 + ratio_clip_max. "
            "DAPO clip-higher uses 0.28 with ratio_clip_min 0.2."
        ),
    )
    ratio_clip_c: float | None = Field(
        None,
        gt=1.0,
        description=(
            "Dual-clip constant c (> 1): for tokens with a negative advantage the loss is "
            "capped at -c * A. None disables dual clipping."
        ),
    )
    reference_policy_kl_penalty: float = Field(
        0.0,
        ge=0.0,
        description=(
            "beta, weight of the KL penalty to the reference policy. 0 disables it, and then "
            "no reference logprobs are needed at all."
        ),
    )
    reference_policy_kl_type: Literal["k1", "k2", "k3"] = Field(
        "k3",
        description="Per-token KL estimator (Schulman 2020): k1, k2 or k3.",
    )
    use_on_policy_kl_approximation: bool = Field(
        False,
        description=(
            "Weight the per-token KL by exp(lp - lp_gen) (no gradient) so that it estimates "
            "the KL under the current policy rather than the generating one."
        ),
    )
    use_importance_sampling_correction: bool = Field(
        False,
        description=(
            "Multiply the per-token loss by w = exp(lp_old - lp_gen) to correct the "
            "train/generate mismatch (optionally truncated, see "
            "truncated_importance_sampling_type)."
        ),
    )
    truncated_importance_sampling_type: Literal["tis", "icepop", "seq-mask-tis"] | None = Field(
        None,
        description=(
            "How the importance weights are truncated: tis clamps w to [min, ratio]; "
            "icepop zeroes tokens with w outside [min, ratio]; seq-mask-tis zeroes whole "
            "sequences whose geometric-mean weight is outside [min, ratio]. "
            "Requires use_importance_sampling_correction."
        ),
    )
    truncated_importance_sampling_ratio: float | None = Field(
        None,
        gt=0.0,
        description="Upper bound of the importance weight (verl and slime default to 2).",
    )
    truncated_importance_sampling_ratio_min: float = Field(
        0.0,
        ge=0.0,
        description="Lower bound of the importance weight (0 = no lower bound for tis).",
    )
    token_level_loss: bool = Field(
        True,
        description=(
            "True: average the loss over all valid tokens of the global batch (DAPO). "
            "False: average each sequence over its tokens, then over sequences (GRPO)."
        ),
    )
    sequence_level_importance_ratios: bool = Field(
        False,
        description=(
            "GSPO: use one ratio per sequence, exp(mean over its tokens of (lp - lp_old)), "
            "for all its tokens. Requires token_level_loss: false."
        ),
    )

    @model_validator(mode="after")
    def truncation_ratio_needs_type(self) -> "LossConfig":
        if (
            self.truncated_importance_sampling_ratio is not None
            and self.truncated_importance_sampling_type is None
        ):
            raise ValueError(
                "truncated_importance_sampling_ratio is set but "
                "truncated_importance_sampling_type is null: set the type to one of "
                "'tis', 'icepop', 'seq-mask-tis', or remove the ratio."
            )
        return self

    @model_validator(mode="after")
    def truncation_type_needs_ratio(self) -> "LossConfig":
        if (
            self.truncated_importance_sampling_type is not None
            and self.truncated_importance_sampling_ratio is None
        ):
            raise ValueError(
                f"truncated_importance_sampling_type is "
                f"'{self.truncated_importance_sampling_type}' but "
                "truncated_importance_sampling_ratio is null: set the upper bound "
                "(for example 2.0), or set the type to null."
            )
        return self

    @model_validator(mode="after")
    def truncation_type_needs_correction(self) -> "LossConfig":
        if (
            self.truncated_importance_sampling_type is not None
            and not self.use_importance_sampling_correction
        ):
            raise ValueError(
                f"truncated_importance_sampling_type is "
                f"'{self.truncated_importance_sampling_type}' but "
                "use_importance_sampling_correction is false, so the weights would never be "
                "applied: set use_importance_sampling_correction: true, or set the type to null."
            )
        return self

    @model_validator(mode="after")
    def truncation_bounds_ordered(self) -> "LossConfig":
        ratio = self.truncated_importance_sampling_ratio
        if ratio is not None and self.truncated_importance_sampling_ratio_min >= ratio:
            raise ValueError(
                f"truncated_importance_sampling_ratio_min "
                f"({self.truncated_importance_sampling_ratio_min}) must be smaller than "
                f"truncated_importance_sampling_ratio ({ratio}): lower the min or raise the ratio."
            )
        return self

    @model_validator(mode="after")
    def sequence_ratios_need_sequence_loss(self) -> "LossConfig":
        # Same rule as NeMo-RL's ClippedPGLossFn: GSPO's sequence ratio goes with
        # sequence-level averaging.
        if self.sequence_level_importance_ratios and self.token_level_loss:
            raise ValueError(
                "sequence_level_importance_ratios (GSPO) requires token_level_loss: false: "
                "set token_level_loss: false, or turn sequence_level_importance_ratios off."
            )
        return self
