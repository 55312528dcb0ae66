"""Types shared by every prompt source and environment."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One prompt with what is needed to score responses to it."""

    prompt: str                       # the user message text, before data.prompt_template and the chat template
    ground_truth: str | None          # the reference answer, if the task has one
    metadata: dict[str, Any]          # task-specific extras the environment needs (JSON-serialisable)
    origin: str                       # where it came from, for error messages: "train.jsonl:17", "reasoning_gym:chain_sum:17"
    images: tuple[Any, ...] = ()      # PIL images shown with the prompt, in order (geometry3k); empty for text tasks
