"""Micro-batches of a step's rows: by row count, and optionally by a budget of real tokens."""

from __future__ import annotations


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """Consecutive (start, stop) row ranges holding at most `max_rows` rows and, when `max_tokens`
    is set, at most `max_tokens` real tokens (a row longer than the budget goes alone). Rows keep
    their order, so per-row results concatenate back in place."""
    ranges, start, tokens = [], 0, 0
    for row, length in enumerate(lengths):
        full = row - start >= max_rows or (max_tokens is not None and row > start and tokens + length > max_tokens)
        if full:
            ranges.append((start, row))
            start, tokens = row, 0
        tokens += length
    if lengths:
        ranges.append((start, len(lengths)))
    return ranges
