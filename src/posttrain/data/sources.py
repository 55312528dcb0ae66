"""Prompt sources: local JSONL/Parquet files and reasoning-gym's procedural tasks.

Every source returns a list of `Sample`s and validates everything at load time, so a bad row
fails before any model is loaded, with an error naming the file and the row.

Row indices in errors and in `Sample.origin` ("train.jsonl:17") are 0-based positions in the
file's rows; only malformed-JSON errors speak of 1-based *line* numbers, as editors do.

A malformed row (a missing or empty prompt, an answer that is not a string or a finite number,
text that is not valid UTF-8, ...) goes to the source's `BadRows`: an error by default
(`data.on_bad_row: error`), or recorded and skipped (`skip`). Problems with the file itself
(missing, unreadable, malformed JSON, a JSON line that is not an object, a missing column, no
rows) are always errors, as is a file whose every row is malformed.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.data.types import Sample

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}

# Metadata keys the environments set themselves (`posttrain.environments.scoring_metadata`): a
# column with one of these names that is not the prompt or the answer is refused at load time.
RESERVED_METADATA_KEYS = ("ground_truth", "origin")


class DataError(ValueError):
    """A data source could not be read or one of its rows is invalid."""


@dataclass
class BadRows:
    """What a source does with a malformed row: raise its `DataError` (policy "error") or record
    the error's message and go on without the row (policy "skip")."""

    policy: Literal["error", "skip"] = "error"
    skipped: list[str] = field(default_factory=list)  # the messages of the skipped rows, in order

    def handle(self, error: DataError) -> None:
        if self.policy == "error":
            raise error
        self.skipped.append(str(error))


@dataclass(frozen=True)
class UndecodableRow:
    """Stands in for a row whose text is not valid UTF-8 (see `first_rows`); a bad row."""

    error: UnicodeDecodeError


def convert_rows(
    rows: list[dict[str, Any] | UndecodableRow],
    convert: Callable[[int, dict[str, Any]], Sample],
    bad_rows: BadRows,
    *,
    source: str,
) -> list[Sample]:
    """`convert(index, row)` for each row; a `DataError` it raises, or an `UndecodableRow`, goes
    to `bad_rows`.

    Raises:
        DataError: every row was malformed (only reachable when bad rows are skipped).
    """
    samples, first_bad = [], len(bad_rows.skipped)
    for index, row in enumerate(rows):
        try:
            if isinstance(row, UndecodableRow):
                raise _undecodable(row.error, source, index)
            samples.append(convert(index, row))
        except DataError as error:
            bad_rows.handle(error)
    if rows and not samples:
        raise DataError(
            f"{source}: all {len(rows)} rows are malformed (data.on_bad_row: skip); the first: "
            f"{bad_rows.skipped[first_bad]}"
        )
    return samples


def column_value(row: dict[str, Any], key: str, *, where: str) -> Any:
    """`row[key]`; a dotted key descends into structs and lists: "reward_model.ground_truth",
    "prompt.0.content". A column whose own name contains the dots wins over descending."""
    if key in row:
        return row[key]
    value: Any = row
    walked: list[str] = []
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            inside = ".".join(walked) or "the row"
            raise DataError(f"{where}: no {key!r}: {inside} is {_short(value)}, which has no {part!r}")
        walked.append(part)
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_jsonl_or_parquet(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str | None = "answer",
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[Sample]:
    """Read prompts from a local .jsonl/.json/.parquet file (through `datasets`, no hub access).

    Args:
        path: the file; relative paths are relative to the current working directory.
        prompt_key: the column holding the prompt: either a string, or a chat `messages` list
            of {"role", "content"} dicts, of which the last "user" message's content becomes the
            prompt and the whole list is kept in `metadata["messages"]`. A dotted key descends
            into nested columns (see `column_value`).
        answer_key: the column holding the reference answer (numbers are turned into strings),
            dotted keys as for `prompt_key` (e.g. verl's "reward_model.ground_truth"); None when
            the data has no answers (every `ground_truth` is then None).
        limit: keep only the first `limit` rows.
        bad_rows: what to do with a malformed row; None: raise.

    Returns:
        One `Sample` per (valid) row; columns other than the prompt and answer go to `metadata`.

    Raises:
        DataError: missing file, unknown extension, malformed JSON (with the line), missing
            column (listing those present), empty file, or an invalid row (with its index).
    """
    path = Path(path)
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1 or None, got {limit}")
    dataset = read_data_file(path)
    columns = list(dataset.column_names)
    if _top_column(prompt_key, columns) is None:
        hint = " (chat data: pass prompt_key='messages')" if "messages" in columns else ""
        raise DataError(f"{path}: no prompt column {prompt_key!r}; columns present: {columns}{hint}")
    if answer_key is not None and _top_column(answer_key, columns) is None:
        raise DataError(
            f"{path}: no answer column {answer_key!r}; columns present: {columns} "
            "(pass answer_key=None for data without reference answers)"
        )
    reserved = sorted(set(RESERVED_METADATA_KEYS) & set(columns) - {prompt_key, answer_key})
    if reserved:
        raise DataError(
            f"{path}: column(s) {reserved} would become metadata keys that the environments reserve "
            "for the reference answer and the origin; if one holds the answer, name it as answer_key"
        )
    return convert_rows(
        first_rows(dataset, limit),
        lambda index, row: _row_to_sample(row, index, path, prompt_key=prompt_key, answer_key=answer_key),
        bad_rows or BadRows(),
        source=str(path),
    )


def _top_column(key: str, columns: list[str]) -> str | None:
    """The column a (possibly dotted) key reads from, or None when there is none."""
    if key in columns:
        return key
    head = key.split(".", 1)[0]
    return head if "." in key and head in columns else None


def read_data_file(path: Path) -> Any:
    """A local .jsonl/.json/.parquet file as a `datasets.Dataset`, with errors that name the file."""
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
    return dataset


def first_rows(dataset: Any, limit: int | None) -> list[dict[str, Any] | UndecodableRow]:
    """The first `limit` rows (all when None) as plain dicts; images stay undecoded {bytes, path}.

    Arrow keeps a string that is not valid UTF-8 (a JSON-lines file in another encoding) as it
    was read and fails only when it is turned into Python; such a row comes back as an
    `UndecodableRow`, for `convert_rows` to report or skip with the others.
    """
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    try:
        return dataset.to_list()
    except UnicodeDecodeError:
        pass
    rows: list[dict[str, Any] | UndecodableRow] = []
    for index in range(len(dataset)):  # row by row, only on this rare path: slower
        try:
            rows.append(dataset[index])
        except UnicodeDecodeError as error:
            rows.append(UndecodableRow(error))
    return rows


def _undecodable(error: UnicodeDecodeError, source: str, index: int) -> DataError:
    line = _json_line_of_row(Path(source), index)
    return DataError(
        f"{source} row {index}{f' (line {line})' if line else ''}: text that is not valid UTF-8 "
        f"(byte {error.object[error.start]:#04x} at position {error.start} of a value); re-encode the file "
        "as UTF-8, or skip such rows with data.on_bad_row: skip"
    )


def _json_line_of_row(path: Path, index: int) -> int | None:
    """The 1-based line of row `index` of a JSON-lines file (its index-th non-blank line); None
    for any other source."""
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return None
    row = -1
    with path.open("rb") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                row += 1
                if row == index:
                    return line_number
    return None


def _raise_on_malformed_json_line(path: Path, error: Exception) -> None:
    """Find the first line of a JSON-lines file that json.loads rejects and raise naming it.

    datasets' JSON reader reports a byte offset inside a block, not a line, so we rescan. A line
    that is not UTF-8 (a UTF-16 file), or valid JSON but not an object (`[1, 2]`, `"text"`), is
    not a row either. Returns without raising when every line is an object (e.g. the file is one
    JSON document).
    """
    with path.open("rb") as lines:
        for line_number, raw_line in enumerate(lines, start=1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                raise DataError(
                    f"{path} line {line_number}: not valid UTF-8 (byte {raw_line[decode_error.start]:#04x} at column "
                    f"{decode_error.start + 1}); re-encode the file as UTF-8"
                ) from error
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as line_error:
                raise DataError(
                    f"{path} line {line_number}: malformed JSON ({line_error.msg} at column "
                    f"{line_error.colno}): {line.strip()[:200]!r}"
                ) from error
            if not isinstance(value, dict):
                raise DataError(
                    f"{path} line {line_number}: a JSON-lines row must be an object {{\"column\": value, ...}}, "
                    f"got {_short(value)}"
                ) from error


def _row_to_sample(
    row: dict[str, Any], index: int, path: Path, *, prompt_key: str, answer_key: str | None
) -> Sample:
    where = f"{path} row {index}"
    raw_prompt = column_value(row, prompt_key, where=where)
    metadata = {key: value for key, value in row.items() if key not in (prompt_key, answer_key)}
    if isinstance(raw_prompt, list):
        prompt = last_user_message(raw_prompt, where=where, prompt_key=prompt_key)
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
        ground_truth = answer_text(column_value(row, answer_key, where=where), where=where, key=answer_key)
    return Sample(
        prompt=prompt, ground_truth=ground_truth, metadata=metadata, origin=f"{path.name}:{index}"
    )


def answer_text(answer: Any, *, where: str, key: str) -> str:
    """A reference answer as a string: strings as they are, finite numbers through str()."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: {key!r} must be a string or a number, got {answer!r}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise DataError(f"{where}: {key!r} must be a finite number, got {answer!r}")  # NaN: a missing value
    return str(answer)


def last_user_message(messages: list[Any], *, where: str, prompt_key: str) -> str:
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
