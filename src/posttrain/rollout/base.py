"""The rollout-engine boundary: what the GRPO loop needs from any generator."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. Logprobs are reported for softmax(softcapped_logits / temperature) over
    the FULL vocabulary, even when top-p/top-k truncate the sampling distribution: that is the
    distribution the trainer optimizes, so the two sides stay comparable. With top-p < 1 or
    top-k set, tokens are drawn from the truncated, renormalized distribution and the reported
    logprob is not the probability the token was sampled with."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # end when the response's text contains one (that token kept)
    seed: int | None = None


@dataclass(frozen=True)
class MultimodalPrompt:
    """A prompt's images, as its model's processor made them: the image tensors its forward takes,
    each concatenating over images along dim 0 (Gemma 4: pixel_values [N_img, max_patches, 3*p*p]
    in [0, 1] and image_position_ids [N_img, max_patches, 2]; Qwen2.5-VL: pixel_values
    [patches, 3*t*p*p] and image_grid_thw [N_img, 3]). The prompt's token ids already hold one
    placeholder token per image soft token; per-token modality ids (mm_token_type_ids) are
    derived from them."""

    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def to(self, device: torch.device) -> MultimodalPrompt:
        return MultimodalPrompt({name: t.to(device) for name, t in self.tensors.items()})


# Processor outputs that are not image tensors: the text's, and modality ids derived from it
TEXT_PROCESSOR_OUTPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"})


def image_inputs(images, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The images of a batch's rows (None: a text-only row) as the model's forward takes them: each
    row's images in row order, which is the order of their placeholders in the batch; floating
    tensors in `dtype`. Empty when no row has one."""
    present = [m for m in images if m is not None]
    if not present:
        return {}
    inputs = {}
    for name in present[0].tensors:
        tensor = torch.cat([m[name] for m in present])
        inputs[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    return inputs


FinishReason = Literal["stop", "length"]


@dataclass
class Rollout:
    """One generated response: its tokens (stop token included), their logprobs, and why it ended."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def check_request(
    prompts: list[list[int]],
    params: SamplingParams,
    multimodal: list[MultimodalPrompt | None] | None,
    decode_text: Callable[[list[int]], str] | None,
) -> None:
    """The errors every engine raises for a malformed `generate` call."""
    if multimodal is not None and len(multimodal) != len(prompts):
        raise ValueError(f"{len(multimodal)} multimodal entries for {len(prompts)} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    if params.stop_strings and decode_text is None:
        raise ValueError("stop_strings need the engine's decode_text (a tokenizer's decode)")


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        multimodal: list[MultimodalPrompt | None] | None = None,
        on_finished: Callable[[int, Rollout], None] | None = None,
    ) -> list[Rollout]:
        """Sample one response per prompt (repeat prompts for several samples), in order;
        `multimodal[i]` holds prompt i's images (None: text only). `on_finished(i, rollout)` is
        called, on the calling thread, as soon as response i is final (so that the caller can
        score it while the rest decode)."""
        ...

    def refresh_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the trainer's current weights in place."""
        ...

    def release_weights(self) -> None:
        """Free the memory of the weights the next `refresh_weights` overwrites anyway (while the
        trainer needs it); generating before that refresh is an error. May do nothing."""
        ...
