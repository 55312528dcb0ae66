"""From a recipe's data sources to tokenized prompts, and a resumable iterator over them."""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase, ProcessorMixin

from posttrain.config.schema import (
    ArithmeticChatSource,
    ArithmeticSource,
    ChatSource,
    DatasetSource,
    FileSource,
    PromptSource,
    ReasoningGymSource,
    ShapesSource,
)
from posttrain.data.arithmetic import arithmetic_conversations, arithmetic_samples
from posttrain.data.chat import load_chat
from posttrain.data.datasets import load_dataset_samples
from posttrain.data.shapes import shape_count_samples
from posttrain.data.sources import BadRows, DataError, load_jsonl_or_parquet, load_reasoning_gym
from posttrain.data.templates import render
from posttrain.data.types import Sample
from posttrain.rollout.base import TEXT_PROCESSOR_OUTPUTS, MultimodalPrompt


def load_samples(source: PromptSource, *, split: str, bad_rows: BadRows | None = None) -> list[Sample]:
    """The samples of one recipe source (conversations for the chat sources, in metadata["messages"]);
    `split` ("train"/"validation") picks the generated sources' split,
    `bad_rows` decides what a malformed file row does (None: raise)."""
    if isinstance(source, ArithmeticSource):
        return arithmetic_samples(
            source.size,
            seed=source.seed,
            num_terms=source.num_terms,
            max_value=source.max_value,
            operation=source.operation,
            split=split,
        )
    if isinstance(source, ShapesSource):
        return shape_count_samples(
            source.size,
            seed=source.seed,
            max_count=source.max_count,
            image_sizes=source.image_sizes,
            split=split,
            style=source.style,
        )
    if isinstance(source, ReasoningGymSource):
        return load_reasoning_gym(source.task, size=source.size, seed=source.seed, config=source.config)
    if isinstance(source, FileSource):
        return load_jsonl_or_parquet(
            source.path, prompt_key=source.prompt_key, answer_key=source.answer_key, limit=source.limit, bad_rows=bad_rows
        )
    if isinstance(source, DatasetSource):
        return load_dataset_samples(
            source.name, path=source.path, split=source.split, limit=source.limit, bad_rows=bad_rows
        )
    if isinstance(source, ChatSource):
        return load_chat(source.path, messages_key=source.messages_key, split=source.split, limit=source.limit, bad_rows=bad_rows)
    if isinstance(source, ArithmeticChatSource):
        return arithmetic_conversations(
            source.size, seed=source.seed, max_turns=source.max_turns, max_value=source.max_value, split=split
        )
    raise TypeError(f"unknown prompt source {source!r}")


@dataclass(frozen=True)
class Prompt:
    sample: Sample
    text: str  # the user message after the prompt template
    token_ids: list[int]  # chat-templated, with the generation prompt (one placeholder per image soft token)
    multimodal: MultimodalPrompt | None = None  # the processor's image tensors; None for text-only prompts


@dataclass(frozen=True)
class TokenizedPrompts:
    prompts: list[Prompt]
    dropped: list[str]  # origins of the samples whose prompt was longer than max_prompt_tokens, in order


def tokenize_prompts(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, *, template: str, max_prompt_tokens: int
) -> TokenizedPrompts:
    """Render each sample with the template and the chat template; a prompt longer than
    `max_prompt_tokens` leaves no room to answer and is dropped (counted, never truncated).

    Raises:
        DataError: a sample carries images (this tokenization is text-only and would lose them),
            or every prompt is too long.
    """
    prompts, dropped = [], []
    for sample in samples:
        if sample.images:
            raise DataError(
                f"{sample.origin}: the sample carries {len(sample.images)} image(s), but prompts are tokenized as "
                "text only here; image datasets (geometry3k) need the VLM loop"
            )
        text = render(template, sample.prompt)
        messages = [{"role": "user", "content": text}]
        token_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        if len(token_ids) > max_prompt_tokens:
            dropped.append(sample.origin)
            continue
        prompts.append(Prompt(sample=sample, text=text, token_ids=token_ids))
    if samples and not prompts:
        raise DataError(
            f"all {len(samples)} prompts are longer than the {max_prompt_tokens} tokens that "
            "policy.max_total_sequence_length - policy.generation.max_new_tokens leaves (first: "
            f"{dropped[0]}); raise max_total_sequence_length or shorten the prompt template"
        )
    return TokenizedPrompts(prompts=prompts, dropped=dropped)


def tokenize_multimodal_prompts(
    samples: list[Sample], processor: ProcessorMixin, *, template: str, max_prompt_tokens: int
) -> TokenizedPrompts:
    """Like `tokenize_prompts`, through a multimodal processor: a sample's images go before its text
    in the user turn (as geometry3k's leading placeholder puts them), the processor expands each
    image into its soft-token placeholders and makes the image tensors. Samples without images
    are tokenized the same way, text only. Each sample is processed alone, so an image the
    processor cannot take (corrupt, wrong size for a processor that does not resize) raises a
    DataError naming the sample.
    """
    prompts, dropped = [], []
    for sample in samples:
        text = render(template, sample.prompt)
        content = [{"type": "image"} for _ in sample.images] + [{"type": "text", "text": text}]
        rendered = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        try:
            out = processor(
                text=[rendered],
                images=[list(sample.images)] if sample.images else None,
                return_tensors="pt",
                add_special_tokens=False,  # the chat template wrote them
            )
        except Exception as error:  # noqa: BLE001 (any processor failure is this sample's data problem)
            raise DataError(f"{sample.origin}: the processor could not take its {len(sample.images)} image(s): {error}") from error
        token_ids = out["input_ids"][0].tolist()
        if len(token_ids) > max_prompt_tokens:
            dropped.append(sample.origin)
            continue
        multimodal = None
        if sample.images:
            multimodal = MultimodalPrompt({name: t for name, t in out.items() if name not in TEXT_PROCESSOR_OUTPUTS})
        prompts.append(Prompt(sample=sample, text=text, token_ids=token_ids, multimodal=multimodal))
    if samples and not prompts:
        raise DataError(
            f"all {len(samples)} prompts, image soft tokens included, are longer than the {max_prompt_tokens} tokens "
            f"that policy.max_total_sequence_length - policy.generation.max_new_tokens leaves (first: {dropped[0]})"
        )
    return TokenizedPrompts(prompts=prompts, dropped=dropped)


class PromptIterator:
    """Endless epochs over the prompts, reshuffled per epoch from (seed, epoch); resumable by position."""

    def __init__(self, prompts: list[Prompt], *, seed: int, shuffle: bool):
        if not prompts:
            raise DataError("the training data has no prompts")
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def next_batch(self, size: int) -> list[Prompt]:
        batch = []
        while len(batch) < size:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order()
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()
