"""Prompt sources: local JSONL/Parquet files and reasoning-gym's procedural tasks.

Every source returns a list of `Sample`s and validates everything at load time, so a bad row
fails before any model is loaded, with an error naming the file and the row.

Row indices in errors and in `Sample.origin` ("train.jsonl:17") are 0-based positions in the
file's rows; only malformed-JSON errors speak of 1-based *line* numbers, as editors do.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from posttrain.data.types import Sample

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data source could not be read or one of its rows is invalid."""


def load_jsonl_or_parquet(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    limit: int | None = None,
) -> list[Sample]:
    """Read prompts from a local .jsonl/.json/.parquet file (through `datasets`, no hub access).

    Args:
        path: the file; relative paths are relative to the current working directory.
        prompt_key: the column holding the prompt: either a string, or a chat `messages` list
            of {"role", "content"} dicts, of which the last "user" message's content becomes the
            prompt and the whole list is kept in `metadata["messages"]`.
        answer_key: the column holding the reference answer (numbers are turned into strings);
            None when the data has no answers (every `ground_truth` is then None).
        limit: keep only the first `limit` rows.

    Returns:
        One `Sample` per row; columns other than the prompt and answer go to `metadata`.

    Raises:
        DataError: missing file, unknown extension, malformed JSON (with the line), missing
            column (listing those present), empty file, or an invalid row (with its index).
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 or None, got {limit}")
    rows, columns = _read_rows(path, limit=limit)
    if prompt_key not in columns:
        hint = " (chat data: pass prompt_key='messages')" if "messages" in columns else ""
        raise DataError(
            f"{path}: no prompt column {prompt_key!r}; columns present: {columns}{hint}"
        )
    if answer_key is not None and answer_key not in columns:
        raise DataError(
            f"{path}: no answer column {answer_key!r}; columns present: {columns} "
            "(pass answer_key=None for data without reference answers)"
        )
    return [
        _row_to_sample(row, index, path, prompt_key=prompt_key, answer_key=answer_key)
        for index, row in enumerate(rows)
    ]


def _read_rows(path: Path, *, limit: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    """All rows (as plain dicts) and the column names, with errors that name the file."""
    if not path.is_file():
        raise DataError(
            f"data file not found: {str(path)!r} (looked for {path.resolve()}; relative paths "
            f"are resolved against the current working directory {Path.cwd()})"
        )
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unsupported extension {path.suffix!r}; expected one of {sorted(_FORMATS)}"
        )

    import datasets  # deferred: importing datasets takes about a second

    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except StopIteration as error:  # datasets' json builder on a file without any row
        raise DataError(f"{path}: the file contains no rows") from error
    except Exception as error:
        if builder == "json":
            _raise_on_malformed_json_line(path, error)
        raise DataError(f"{path}: could not be read as {builder}: {error}") from error
    if len(dataset) == 0:
        raise DataError(f"{path}: the file contains no rows")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.to_list(), list(dataset.column_names)


def _raise_on_malformed_json_line(path: Path, error: Exception) -> None:
    """Find the first line of a JSON-lines file that json.loads rejects and raise naming it.

    datasets' JSON reader reports a byte offset inside a block, not a line, so we rescan.
    Returns without raising when every line parses (e.g. the file is one JSON document).
    """
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as line_error:
                raise DataError(
                    f"{path} line {line_number}: malformed JSON ({line_error.msg} at column "
                    f"{line_error.colno}): {line.strip()[:200]!r}"
                ) from error


def _row_to_sample(
    row: dict[str, Any], index: int, path: Path, *, prompt_key: str, answer_key: str | None
) -> Sample:
    where = f"{path} row {index}"
    raw_prompt = row[prompt_key]
    metadata = {key: value for key, value in row.items() if key not in (prompt_key, answer_key)}
    if isinstance(raw_prompt, list):
        prompt = _last_user_message(raw_prompt, where=where, prompt_key=prompt_key)
        if "messages" in metadata:
            raise DataError(
                f"{where}: column 'messages' collides with the chat list from {prompt_key!r}, "
                "which is kept as metadata['messages']"
            )
        metadata["messages"] = raw_prompt
    else:
        prompt = raw_prompt
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: {prompt_key!r} must be a non-empty string, got {prompt!r}")

    ground_truth = None
    if answer_key is not None:
        answer = row[answer_key]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"{where}: {answer_key!r} must be a string or a number, got {answer!r}")
        ground_truth = str(answer)
    return Sample(
        prompt=prompt, ground_truth=ground_truth, metadata=metadata, origin=f"{path.name}:{index}"
    )


def _last_user_message(messages: list[Any], *, where: str, prompt_key: str) -> str:
    """The content of the last message with role "user" in a chat list."""
    for message in reversed(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{where}: {prompt_key!r} messages must be {{role, content}} dicts, got {message!r}"
            )
        if message["role"] == "user":
            return message["content"]
    roles = [message["role"] for message in messages]
    raise DataError(f"{where}: {prompt_key!r} has no message with role 'user' (roles: {roles})")


def load_reasoning_gym(
    task: str, *, size: int, seed: int, config: dict[str, Any] | None = None
) -> list[Sample]:
    """`size` seeded problems of a reasoning-gym task, configured by `config` (the task's own
    keyword arguments, e.g. chain_sum's max_terms; None: its defaults).

    The same (task, size, seed) always gives the same samples. Each sample's metadata holds
    what `ReasoningGymEnvironment` needs to rebuild the entry and score with reasoning-gym's own
    `score_answer`: {"reasoning_gym_task", "reasoning_gym_size", "reasoning_gym_seed",
    "reasoning_gym_config", "entry_index"}. The entry itself is not stored: its metadata holds tuples and other
    non-JSON values that some scorers compare, and a JSON round trip would change them.

    Raises:
        DataError: unknown task (with close names), or reasoning-gym rejecting the settings.
    """
    if size < 1:
        raise DataError(f"reasoning_gym {task!r}: size must be >= 1, got {size}")
    config = dict(config or {})
    dataset = reasoning_gym_dataset(task, size=size, seed=seed, config=config)
    samples = []
    for index in range(size):
        entry = dataset[index]
        answer = entry["answer"]
        samples.append(
            Sample(
                prompt=entry["question"],
                ground_truth=None if answer is None else str(answer),
                metadata={
                    "reasoning_gym_task": task,
                    "reasoning_gym_size": size,
                    "reasoning_gym_seed": seed,
                    "reasoning_gym_config": config,
                    "entry_index": index,
                },
                origin=f"reasoning_gym:{task}:{index}",
            )
        )
    return samples


def reasoning_gym_dataset(
    task: str, *, size: int, seed: int, config: dict[str, Any] | None = None
) -> Any:
    """reasoning_gym.create_dataset(task, size=size, seed=seed, **config), with a did-you-mean
    on typos."""
    import reasoning_gym  # deferred: importing reasoning_gym takes about a second
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        close = difflib.get_close_matches(task, sorted(DATASETS), n=5, cutoff=0.5)
        suggestion = f"; did you mean one of {close}?" if close else ""
        raise DataError(
            f"unknown reasoning_gym task {task!r}{suggestion} ({len(DATASETS)} tasks registered)"
        )
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **(config or {}))
    except Exception as error:
        raise DataError(
            f"reasoning_gym could not create {task!r} (size={size}, seed={seed}, config={config}): {error}"
        ) from error
