"""A procedurally generated arithmetic task with verifiable answers (offline, seeded).

Each prompt asks for the value of a short sum or difference of small integers ("Compute
37+48-5." with ground truth "80") or for the largest of them ("Compute max(37, 81)." with
ground truth "81"). The answer is scored by the math environment
(math-verify), so the task exercises the same scoring path as real math data.
"""

from __future__ import annotations

import random
import zlib

from posttrain.data.types import Sample

VALIDATION_SHARE = 8  # one expression in 8 belongs to the validation split, the others to train


def split_of(expression: str) -> str:
    """Which split an expression belongs to, fixed by a hash of its text: the splits never share a problem."""
    return "validation" if zlib.crc32(expression.encode()) % VALIDATION_SHARE == 0 else "train"


def arithmetic_problem(
    rng: random.Random, *, num_terms: int, max_value: int, operation: str = "sum"
) -> tuple[str, int]:
    """One random expression of `num_terms` integers in [0, max_value].

    operation "sum": the integers joined by + or - ("37+48-5"); "max": "max(37, 48, 5)".
    """
    terms = [rng.randint(0, max_value) for _ in range(num_terms)]
    if operation == "max":
        return f"max({', '.join(map(str, terms))})", max(terms)
    if operation != "sum":
        raise ValueError(f"operation must be 'sum' or 'max', got {operation!r}")
    operators = [rng.choice("+-") for _ in range(num_terms - 1)]
    expression = str(terms[0])
    value = terms[0]
    for operator, term in zip(operators, terms[1:]):
        expression += f"{operator}{term}"
        value = value + term if operator == "+" else value - term
    return expression, value


def arithmetic_samples(
    count: int,
    *,
    seed: int,
    num_terms: int = 2,
    max_value: int = 99,
    operation: str = "sum",
    split: str = "train",
) -> list[Sample]:
    """`count` seeded arithmetic prompts of `split` ("train" or "validation").

    The two splits draw from disjoint sets of expressions (see `split_of`), so validation
    accuracy is measured on problems the policy never trained on.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rng = random.Random(f"{split}:{seed}")
    samples = []
    for index in range(count):
        while True:  # draw until the expression belongs to this split
            expression, value = arithmetic_problem(rng, num_terms=num_terms, max_value=max_value, operation=operation)
            if split_of(expression) == split:
                break
        samples.append(
            Sample(
                prompt=f"Compute {expression}.",
                ground_truth=str(value),
                metadata={"expression": expression},
                origin=f"arithmetic:{split}:{seed}:{index}",
            )
        )
    return samples


def solution_text(sample: Sample) -> str:
    """The supervised answer for warm-starting: the bare number, which math-verify parses."""
    return str(sample.ground_truth)


def arithmetic_conversations(
    count: int, *, seed: int, max_turns: int = 3, max_value: int = 99, split: str = "train"
) -> list[Sample]:
    """`count` seeded multi-turn conversations keeping a running total, for supervised fine-tuning.

    user "Compute 37+48." / assistant "85" / user "Subtract 9." / assistant "76" / ...: 1 to
    `max_turns` assistant turns, each later turn answerable only from the earlier ones. The whole
    list is `metadata["messages"]` (the chat-source format); `prompt` and `ground_truth` are the
    last user message and the last answer. Train and validation never share a first expression.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rng = random.Random(f"chat:{split}:{seed}")
    samples = []
    for index in range(count):
        while True:  # draw until the first expression belongs to this split
            expression, total = arithmetic_problem(rng, num_terms=2, max_value=max_value)
            if split_of(expression) == split:
                break
        messages = [{"role": "user", "content": f"Compute {expression}."}, {"role": "assistant", "content": str(total)}]
        for _ in range(rng.randint(1, max_turns) - 1):
            term, add = rng.randint(0, max_value), rng.random() < 0.5
            total = total + term if add else total - term
            messages += [
                {"role": "user", "content": f"{'Add' if add else 'Subtract'} {term}."},
                {"role": "assistant", "content": str(total)},
            ]
        samples.append(
            Sample(
                prompt=messages[-2]["content"],
                ground_truth=messages[-1]["content"],
                metadata={"messages": messages},
                origin=f"arithmetic_chat:{split}:{seed}:{index}",
            )
        )
    return samples
