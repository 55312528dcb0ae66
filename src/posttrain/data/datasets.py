"""Public math datasets read in their published formats: DAPO-Math-17k, AIME-2024, GSM8K, MATH-500,
OpenMathInstruct-2 and geometry3k (with images).

A recipe source `{type: dataset, name: gsm8k, path: ..., split: ...}` names one of `DATASETS`.
Its `path` is one of:

- a local .parquet/.jsonl/.json file in the dataset's format: read as it is (`split` unset);
- a local directory holding a download of the hub repository, laid out as on the hub
  (`huggingface-cli download --repo-type dataset <hub id> --local-dir <dir>`): the split's files,
  found by the glob in `DatasetSpec.files`;
- anything else: a hub id, `datasets.load_dataset(hub_id, hub_config, split=split)` (network, and
  access for gated data). Unset: the dataset's own hub id.

Local files are read one by one, so `Sample.origin` and errors name the file and the 0-based row
in it ("train-00000-of-00001.parquet:17"); hub rows are named "<hub id>:<split>:<row>". Each
dataset's `convert` maps a row to (prompt, ground truth, metadata, images) and raises `DataError`
for a malformed row, which the source's `BadRows` raises or skips (`data.on_bad_row`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.data.sources import (
    RESERVED_METADATA_KEYS,
    BadRows,
    DataError,
    answer_text,
    column_value,
    convert_rows,
    first_rows,
    read_data_file,
)
from posttrain.data.types import Sample

# DAPO-Math-17k and BytedTsinghua-SIA/AIME-2024 wrap every problem in this instruction (the same
# text as the built-in template dapo_answer.txt); the loader takes it off again, so that
# `Sample.prompt` is the bare problem and `data.prompt_template(_file)` decides the instruction.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

GSM8K_MARKER = "####"  # a GSM8K solution ends with "#### <final answer>"
IMAGE_PLACEHOLDER = "<image>"  # geometry3k's problems start with one per image

# (prompt, ground truth, metadata, images) of one row
Converted = tuple[str, str, dict[str, Any], tuple[Any, ...]]


@dataclass(frozen=True)
class DatasetSpec:
    """How one public dataset is stored and how a row becomes a `Sample`."""

    hub_id: str
    hub_config: str | None  # the hub subset ("main" for GSM8K), None for the default one
    files: dict[str, str]  # split -> glob of its data files inside a download of the hub repository
    default_split: str
    columns: tuple[str, ...]  # columns the format has (top-level names); a file without one is an error
    convert: Callable[[dict[str, Any], str], Converted]  # (row, "file row N") -> the row's parts

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.hub_id}"


# ------------------------------------------------------------------------------------- converters


def _text(row: dict[str, Any], key: str, where: str) -> str:
    """A non-empty string at `key` (dotted keys descend into structs)."""
    value = column_value(row, key, where=where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _answer(row: dict[str, Any], key: str, where: str) -> str:
    """A non-empty reference answer at `key` (numbers become strings)."""
    answer = answer_text(column_value(row, key, where=where), where=where, key=key)
    if not answer.strip():
        raise DataError(f"{where}: {key!r} is empty")
    return answer


def _other_columns(row: dict[str, Any], used: tuple[str, ...]) -> dict[str, Any]:
    """The row's columns except `used`, for metadata; a column named like a key the environments
    reserve (ground_truth, origin) is kept as dataset_<name>."""
    return {
        f"dataset_{key}" if key in RESERVED_METADATA_KEYS else key: value
        for key, value in row.items()
        if key not in used
    }


def _verl_dapo(row: dict[str, Any], where: str) -> Converted:
    """verl's RL format with DAPO's instruction: prompt = [{role: user, content: instruction +
    problem}], reward_model = {ground_truth, style}, plus data_source, ability, extra_info."""
    messages = row["prompt"]
    if not isinstance(messages, list) or len(messages) != 1 or not isinstance(messages[0], dict):
        raise DataError(f"{where}: 'prompt' must be a list of one user message, got {messages!r:.200}")
    if messages[0].get("role") != "user":
        raise DataError(f"{where}: 'prompt' must hold one message with role 'user', got {messages[0].get('role')!r}")
    content = _text(row, "prompt.0.content", where)
    if not (content.startswith(DAPO_PREFIX) and content.endswith(DAPO_SUFFIX)):
        raise DataError(
            f"{where}: the user message does not carry DAPO's instruction (expected it to start with "
            f"{DAPO_PREFIX[:40]!r}... and end with {DAPO_SUFFIX!r}); got {content!r:.200}. Data in another "
            "layout reads with {type: file, prompt_key: ..., answer_key: ...}"
        )
    problem = content[len(DAPO_PREFIX) : len(content) - len(DAPO_SUFFIX)]
    if not problem.strip():
        raise DataError(f"{where}: the problem inside DAPO's instruction is empty")
    return problem, _answer(row, "reward_model.ground_truth", where), _other_columns(row, ("prompt",)), ()


def _gsm8k(row: dict[str, Any], where: str) -> Converted:
    """question, answer = worked solution ending in "#### <final answer>"."""
    question, solution = _text(row, "question", where), _text(row, "answer", where)
    marker = solution.rfind(GSM8K_MARKER)
    if marker < 0:
        raise DataError(f"{where}: 'answer' has no {GSM8K_MARKER!r} line with the final answer: {solution!r:.200}")
    final = solution[marker + len(GSM8K_MARKER) :].strip().replace(",", "")  # "1,000" -> "1000"
    if not final:
        raise DataError(f"{where}: nothing follows {GSM8K_MARKER!r} in 'answer': {solution!r:.200}")
    return question, final, {"solution": solution, **_other_columns(row, ("question", "answer"))}, ()


def _problem_answer(answer_key: str) -> Callable[[dict[str, Any], str], Converted]:
    """problem + `answer_key`; every other column goes to metadata as it is."""

    def convert(row: dict[str, Any], where: str) -> Converted:
        problem, answer = _text(row, "problem", where), _answer(row, answer_key, where)
        return problem, answer, _other_columns(row, ("problem", answer_key)), ()

    return convert


def _geometry3k(row: dict[str, Any], where: str) -> Converted:
    """images (a list of datasets Image structs {bytes, path}), problem with one "<image>" per image,
    answer; newer revisions add id, choices and ground_truth."""
    import datasets as hf_datasets  # deferred: importing datasets takes about a second

    problem, answer = _text(row, "problem", where), _answer(row, "answer", where)
    encoded = row["images"]
    if not isinstance(encoded, list) or not encoded:
        raise DataError(f"{where}: 'images' must be a non-empty list of images, got {encoded!r:.200}")
    if problem.count(IMAGE_PLACEHOLDER) != len(encoded):
        raise DataError(
            f"{where}: 'problem' has {problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER!r} placeholders "
            f"for {len(encoded)} images"
        )
    images = []
    for number, image in enumerate(encoded):
        try:
            images.append(hf_datasets.Image().decode_example(image))
        except Exception as error:
            raise DataError(f"{where}: image {number} could not be decoded: {error}") from error
    text = problem.replace(IMAGE_PLACEHOLDER, "").strip()
    if not text:
        raise DataError(f"{where}: 'problem' has no text besides its image placeholders")
    return text, answer, _other_columns(row, ("images", "problem", "answer")), tuple(images)


# --------------------------------------------------------------------------------------- registry


DATASETS: dict[str, DatasetSpec] = {
    "dapo_math_17k": DatasetSpec(
        hub_id="BytedTsinghua-SIA/DAPO-Math-17k",
        hub_config=None,
        files={"train": "data/dapo-math-17k.parquet"},
        default_split="train",
        columns=("prompt", "reward_model"),
        convert=_verl_dapo,
    ),
    "aime_2024": DatasetSpec(
        hub_id="BytedTsinghua-SIA/AIME-2024",
        hub_config=None,
        files={"train": "data/aime-2024.parquet"},
        default_split="train",
        columns=("prompt", "reward_model"),
        convert=_verl_dapo,
    ),
    "gsm8k": DatasetSpec(
        hub_id="openai/gsm8k",
        hub_config="main",
        files={"train": "main/train-*.parquet", "test": "main/test-*.parquet"},
        default_split="train",
        columns=("question", "answer"),
        convert=_gsm8k,
    ),
    "math_500": DatasetSpec(
        hub_id="HuggingFaceH4/MATH-500",
        hub_config=None,
        files={"test": "test.jsonl"},
        default_split="test",
        columns=("problem", "answer"),
        convert=_problem_answer("answer"),
    ),
    "openmathinstruct2": DatasetSpec(
        hub_id="nvidia/OpenMathInstruct-2",
        hub_config=None,
        files={split: f"data/{split}-*.parquet" for split in ("train", "train_1M", "train_2M", "train_5M")},
        default_split="train_1M",
        columns=("problem", "expected_answer"),
        convert=_problem_answer("expected_answer"),
    ),
    "geometry3k": DatasetSpec(
        hub_id="hiyouga/geometry3k",
        hub_config=None,
        files={split: f"data/{split}-*.parquet" for split in ("train", "validation", "test")},
        default_split="train",
        columns=("images", "problem", "answer"),
        convert=_geometry3k,
    ),
}


# ----------------------------------------------------------------------------------------- loading


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name: a path read from the hub (chat sources too)


def load_dataset_samples(
    name: str,
    *,
    path: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[Sample]:
    """The samples of dataset `name` from `path` (see the module docstring), the first `limit` rows.

    Raises:
        DataError: unknown name or split, nothing at `path`, a file without the format's columns,
            a malformed row (unless `bad_rows` skips it), or no rows at all.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec, bad_rows = DATASETS[name], bad_rows or BadRows()
    location = Path(path).expanduser() if path is not None else None
    if location is not None and location.is_file():
        if split is not None:
            raise DataError(f"dataset {name}: path {path!r} is a file, so split {split!r} does not apply; unset it")
        return _load_files(name, spec, [location], limit=limit, bad_rows=bad_rows)
    split = split or spec.default_split
    if split not in spec.files:
        raise DataError(f"dataset {name} has no split {split!r}; its splits: {sorted(spec.files)}")
    if location is not None and location.is_dir():
        files = sorted(location.glob(spec.files[split]))
        if not files:
            present = sorted(str(p.relative_to(location)) for p in location.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json"))
            raise DataError(
                f"dataset {name}: no {spec.files[split]!r} under {location} for split {split!r} (a directory must "
                f"hold a download of {spec.url}, laid out as on the hub); data files found: {present[:20]}"
            )
        return _load_files(name, spec, files, limit=limit, bad_rows=bad_rows)
    hub_id = path if path is not None else spec.hub_id
    if not HUB_ID.match(hub_id):
        raise DataError(
            f"dataset {name}: {path!r} is neither a local file or directory (looked for {Path(hub_id).resolve()}) "
            "nor a hub id of the form owner/name"
        )
    return _load_hub(name, spec, hub_id, split, limit=limit, bad_rows=bad_rows, local_candidate=path is not None)


def _load_files(name: str, spec: DatasetSpec, files: list[Path], *, limit: int | None, bad_rows: BadRows) -> list[Sample]:
    """Each file read through `datasets`, rows named by file and 0-based row, until `limit` rows."""
    samples: list[Sample] = []
    remaining = limit
    for file in files:
        dataset = read_data_file(file)
        _check_columns(name, spec, list(dataset.column_names), str(file))
        rows = first_rows(dataset, remaining)
        samples += _convert(spec, rows, bad_rows, where=f"{file} row", origin=f"{file.name}:", source=str(file))
        if remaining is not None:
            remaining -= len(rows)
            if remaining == 0:
                break
    return samples


def _load_hub(
    name: str,
    spec: DatasetSpec,
    hub_id: str,
    split: str,
    *,
    limit: int | None,
    bad_rows: BadRows,
    local_candidate: bool,
) -> list[Sample]:
    import datasets as hf_datasets  # deferred: importing datasets takes about a second

    try:
        dataset = hf_datasets.load_dataset(hub_id, spec.hub_config, split=split)
    except Exception as error:
        local = f"{hub_id!r} is not a local file or directory (looked for {Path(hub_id).resolve()}), and " if local_candidate else ""
        raise DataError(f"dataset {name}: {local}the hub could not load {hub_id!r} split {split!r}: {error}") from error
    _check_columns(name, spec, list(dataset.column_names), f"{hub_id} ({split})")
    source = f"{hub_id}:{split}"
    return _convert(spec, first_rows(dataset, limit), bad_rows, where=f"{hub_id} ({split}) row", origin=f"{source}:", source=source)


def _check_columns(name: str, spec: DatasetSpec, columns: list[str], source: str) -> None:
    missing = [column for column in spec.columns if column not in columns]
    if missing:
        raise DataError(
            f"{source}: not in the {name} format ({spec.url}): no column(s) {missing}; columns present: {columns}. "
            "Other layouts read with {type: file, prompt_key: ..., answer_key: ...}"
        )


def _convert(spec: DatasetSpec, rows: list[dict[str, Any]], bad_rows: BadRows, *, where: str, origin: str, source: str) -> list[Sample]:
    def convert(index: int, row: dict[str, Any]) -> Sample:
        prompt, ground_truth, metadata, images = spec.convert(row, f"{where} {index}")
        return Sample(prompt=prompt, ground_truth=ground_truth, metadata=metadata, origin=f"{origin}{index}", images=images)

    return convert_rows(rows, convert, bad_rows, source=source)
