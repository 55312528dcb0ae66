"""DAPO dynamic sampling (Yu et al. 2025, arXiv 2503.14476).

A prompt group whose rewards all agree has zero advantage everywhere and so contributes no
gradient. Dynamic sampling drops such groups and keeps generating until `target_prompts`
informative groups are collected; groups beyond the target are carried over to the next step
(NeMo-RL behaviour) rather than thrown away.

Typical loop:

    buffer = DynamicSamplingBuffer(target_prompts=32, max_gen_batches=10)
    while not buffer.is_full:
        batch = generate_and_score(next_prompts())        # tensors, first dim P
        buffer.add(batch, informative_groups(batch["rewards_PG"]))
    train_batch = buffer.take()                           # exactly 32 groups
"""

import torch
from torch import Tensor


def informative_groups(rewards_PG: Tensor) -> Tensor:
    """keep_P: True where the group's rewards are not all equal (its std is > 0)."""
    return rewards_PG.amax(dim=1) > rewards_PG.amin(dim=1)


class DynamicSamplingExhausted(RuntimeError):
    """Raised when max_gen_batches generation batches did not yield enough informative groups."""


class DynamicSamplingBuffer:
    """Accumulates informative prompt groups across generation batches of one training step.

    A "batch" is a dict of tensors whose first dimension indexes prompt groups (P); all
    batches must have the same keys. Groups are kept in arrival order.

    Attributes:
        target_prompts: groups returned by `take`.
        max_gen_batches: most generation batches allowed per step. `add` raises
            `DynamicSamplingExhausted` when the max_gen_batches-th batch of a step still
            leaves the buffer short (one more batch would exceed the limit).
        gen_batches_this_step: generation batches added since the last `take`.
    """

    def __init__(self, target_prompts: int, max_gen_batches: int) -> None:
        if target_prompts < 1 or max_gen_batches < 1:
            raise ValueError(
                f"target_prompts ({target_prompts}) and max_gen_batches ({max_gen_batches}) "
                "must both be >= 1"
            )
        self.target_prompts = target_prompts
        self.max_gen_batches = max_gen_batches
        self.gen_batches_this_step = 0
        self._sampled_this_step = 0
        self._kept_this_step = 0
        self._chunks: list[dict[str, Tensor]] = []

    @property
    def num_groups(self) -> int:
        """Groups held now (carry-over included)."""
        return sum(_num_rows(chunk) for chunk in self._chunks)

    @property
    def is_full(self) -> bool:
        return self.num_groups >= self.target_prompts

    def add(self, batch: dict[str, Tensor], keep_P: Tensor) -> None:
        """Keep the groups of `batch` where keep_P is True and count one generation batch."""
        keep_P = keep_P.bool()
        for key, value in batch.items():
            if value.shape[0] != keep_P.shape[0]:
                raise ValueError(
                    f"batch[{key!r}] has first dimension {value.shape[0]}, "
                    f"but keep_P has {keep_P.shape[0]} groups"
                )
        if self._chunks and set(batch) != set(self._chunks[0]):
            raise ValueError(
                f"batch keys {sorted(batch)} differ from earlier keys {sorted(self._chunks[0])}"
            )
        self.gen_batches_this_step += 1
        self._sampled_this_step += keep_P.shape[0]
        self._kept_this_step += int(keep_P.sum())
        if keep_P.any():
            self._chunks.append({key: value[keep_P] for key, value in batch.items()})
        if not self.is_full and self.gen_batches_this_step >= self.max_gen_batches:
            raise DynamicSamplingExhausted(
                f"Dynamic sampling kept {self._kept_this_step} of {self._sampled_this_step} "
                f"prompt groups sampled over {self.gen_batches_this_step} generation batches "
                f"(holding {self.num_groups} with carry-over, need {self.target_prompts}). "
                "Raise max_gen_batches, lower num_prompts_per_step, or check that rewards "
                "vary within a group (a group whose rewards all agree is dropped)."
            )

    def take(self) -> dict[str, Tensor]:
        """Return exactly target_prompts groups; the rest stay as carry-over for the next step."""
        if not self.is_full:
            raise RuntimeError(
                f"take() called with {self.num_groups} groups, need {self.target_prompts}"
            )
        merged = {key: torch.cat([chunk[key] for chunk in self._chunks]) for key in self._chunks[0]}
        taken = {key: value[: self.target_prompts] for key, value in merged.items()}
        rest = {key: value[self.target_prompts :] for key, value in merged.items()}
        self._chunks = [rest] if _num_rows(rest) > 0 else []
        self.gen_batches_this_step = 0
        self._sampled_this_step = 0
        self._kept_this_step = 0
        return taken

    def discard_carry_over(self) -> int:
        """Drop the groups left after `take` (they were sampled by weights that are about to change);
        returns how many were dropped."""
        dropped = self.num_groups
        self._chunks = []
        return dropped

    def state_dict(self) -> dict:
        """Groups held (carry-over) and this step's counters, for checkpointing."""
        groups = (
            {key: torch.cat([chunk[key] for chunk in self._chunks]) for key in self._chunks[0]}
            if self._chunks
            else {}
        )
        return {
            "groups": groups,
            "gen_batches_this_step": self.gen_batches_this_step,
            "sampled_this_step": self._sampled_this_step,
            "kept_this_step": self._kept_this_step,
        }

    def load_state_dict(self, state: dict) -> None:
        groups = state["groups"]
        self._chunks = [dict(groups)] if groups and _num_rows(groups) > 0 else []
        self.gen_batches_this_step = state["gen_batches_this_step"]
        self._sampled_this_step = state["sampled_this_step"]
        self._kept_this_step = state["kept_this_step"]


def _num_rows(chunk: dict[str, Tensor]) -> int:
    return next(iter(chunk.values())).shape[0] if chunk else 0
