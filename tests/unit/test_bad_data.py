"""Bad data: every malformed input is an error naming where it is, or a counted skip; nothing vanishes.

- Rows: text that is not UTF-8, wrong types, a null or missing prompt, a nested key missing, a
  NaN answer: `DataError` naming the file and 0-based row (and the line for JSON lines) under
  `data.on_bad_row: error`, or skipped and counted (data/skipped_bad_rows) under `skip`.
- Files: a UTF-16 file or a JSON line that is not an object is an error naming the line under
  either policy.
- Empty responses from the generator are scored by the environment like any other (math: 0),
  stay in the batch, and are counted in train/empty_responses.
- Over-long prompts are dropped and counted in data/dropped_long_prompts (see also
  test_datasets.py for the console notes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config.loader import validate_config
from posttrain.config.schema import GRPOConfig, RecipeConfig
from posttrain.data.prompts import Prompt, tokenize_prompts
from posttrain.data.sources import BadRows, DataError, load_jsonl_or_parquet
from posttrain.data.types import Sample
from posttrain.environments import build
from posttrain.loops.rollouts import generate_and_score
from posttrain.loops.setup import load_data, tokenize_data
from posttrain.metrics.console import Console
from posttrain.models.loading import load_tokenizer
from posttrain.models.tiny import END_OF_TURN
from posttrain.rollout.base import Rollout, SamplingParams

pytestmark = pytest.mark.unit


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def row(prompt: object, answer: object = "1") -> bytes:
    return json.dumps({"prompt": prompt, "answer": answer}).encode()


# --- text that is not UTF-8 ---------------------------------------------------------------------


@pytest.fixture
def latin1_file(tmp_path) -> Path:
    """Row 1 (line 3, after a blank line) holds "café" in Latin-1: byte 0xe9."""
    return write_lines(tmp_path / "train.jsonl", [row("ok 0"), b"", '{"prompt": "caf\xe9", "answer": "2"}'.encode("latin-1"), row("ok 2")])


def test_non_utf8_row_is_an_error_naming_file_row_and_line(latin1_file):
    with pytest.raises(DataError) as error:
        load_jsonl_or_parquet(latin1_file)
    message = str(error.value)
    assert message.startswith(f"{latin1_file} row 1 (line 3): text that is not valid UTF-8 (byte 0xe9"), message
    assert "data.on_bad_row: skip" in message


def test_non_utf8_row_is_skipped_and_counted_with_skip(latin1_file):
    bad_rows = BadRows("skip")
    samples = load_jsonl_or_parquet(latin1_file, bad_rows=bad_rows)
    assert [s.origin for s in samples] == ["train.jsonl:0", "train.jsonl:2"]
    assert len(bad_rows.skipped) == 1 and bad_rows.skipped[0].startswith(f"{latin1_file} row 1 (line 3)")


def test_a_utf16_file_is_an_error_naming_its_first_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(row("a").decode().encode("utf-16") + b"\n")
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=rf"{path} line 1: not valid UTF-8 \(byte 0xff at column 1\)"):
            load_jsonl_or_parquet(path, bad_rows=BadRows(policy))


# --- malformed rows -------------------------------------------------------------------------------

MALFORMED = {
    "int prompt": (row(5), "'prompt' must be a non-empty string, got 5"),
    "null prompt": (row(None), "'prompt' must be a non-empty string, got None"),
    "missing prompt": (b'{"answer": "1"}', "'prompt' must be a non-empty string, got None"),
    "blank prompt": (row("   "), "'prompt' must be a non-empty string, got '   '"),
    "mapping prompt": (row({"text": "q"}), "'prompt' must be a non-empty string, got {'text': 'q'}"),
    "list answer": (row("q", ["1"]), "'answer' must be a string or a number, got ['1']"),
    "bool answer": (row("q", True), "'answer' must be a string or a number, got True"),
    "null answer": (row("q", None), "'answer' must be a string or a number, got None"),
}


@pytest.mark.parametrize("bad", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_row_errors_or_is_skipped_and_counted(tmp_path, bad):
    line, problem = bad
    path = write_lines(tmp_path / "train.jsonl", [row("q0", "a0"), line, row("q2", "a2")])
    with pytest.raises(DataError) as error:
        load_jsonl_or_parquet(path)
    assert str(error.value) == f"{path} row 1: {problem}"
    bad_rows = BadRows("skip")
    assert [s.ground_truth for s in load_jsonl_or_parquet(path, bad_rows=bad_rows)] == ["a0", "a2"]
    assert bad_rows.skipped == [f"{path} row 1: {problem}"]


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_a_non_finite_number_is_not_an_answer(tmp_path, value):
    """A numeric answer column with NaN (pandas' missing value) or Infinity: not the string "nan"."""
    path = write_lines(tmp_path / "train.jsonl", [row("q0", 1), f'{{"prompt": "q1", "answer": {value}}}'.encode()])
    with pytest.raises(DataError, match=f"^{path} row 1: 'answer' must be a finite number, got (nan|inf)$"):
        load_jsonl_or_parquet(path)
    bad_rows = BadRows("skip")
    assert [s.origin for s in load_jsonl_or_parquet(path, bad_rows=bad_rows)] == ["train.jsonl:0"]
    assert len(bad_rows.skipped) == 1


NESTED = {
    "key missing": ({"q": {"other": "x"}}, "no 'q.text': q is {'other': 'x'}, which has no 'text'"),
    "not a mapping": ({"q": "flat"}, "no 'q.text': q is 'flat', which has no 'text'"),
    "null parent": ({"q": None}, "no 'q.text': q is None, which has no 'text'"),
}


@pytest.mark.parametrize("bad", NESTED.values(), ids=NESTED.keys())
def test_nested_key_missing_in_one_row(tmp_path, bad):
    value, problem = bad
    rows = [{"q": {"text": "first"}, "answer": "1"}, {**value, "answer": "2"}]
    path = write_lines(tmp_path / "nested.jsonl", [json.dumps(r).encode() for r in rows])
    with pytest.raises(DataError, match=f"^{path} row 1: {problem}"):
        load_jsonl_or_parquet(path, prompt_key="q.text")
    bad_rows = BadRows("skip")
    assert [s.prompt for s in load_jsonl_or_parquet(path, prompt_key="q.text", bad_rows=bad_rows)] == ["first"]
    assert len(bad_rows.skipped) == 1


def test_chat_message_without_content_or_with_a_number(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}], "answer": "1"},
        {"messages": [{"role": "user"}], "answer": "1"},
        {"messages": [{"role": "user", "content": 3}], "answer": "1"},
    ]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(r).encode() for r in rows])
    bad_rows = BadRows("skip")
    assert [s.prompt for s in load_jsonl_or_parquet(path, prompt_key="messages", bad_rows=bad_rows)] == ["hi"]
    assert bad_rows.skipped == [
        f"{path} row 1: 'messages' messages must be {{role, content}} dicts, got {{'role': 'user'}}",
        f"{path} row 2: 'messages' must be a non-empty string, got 3",
    ]


@pytest.mark.parametrize("line", [b'["a", "b"]', b'"just text"', b"7"])
def test_a_json_line_that_is_not_an_object_is_a_file_error(tmp_path, line):
    path = write_lines(tmp_path / "train.jsonl", [row("q"), line])
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=rf"{path} line 2: a JSON-lines row must be an object"):
            load_jsonl_or_parquet(path, bad_rows=BadRows(policy))


def test_every_row_bad_is_an_error_even_with_skip(latin1_file):
    latin1_file.write_bytes('{"prompt": "caf\xe9", "answer": "2"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="all 1 rows are malformed"):
        load_jsonl_or_parquet(latin1_file, bad_rows=BadRows("skip"))


# --- through the run's data setup: the counts reach the data/* metrics --------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def test_skipped_and_dropped_rows_reach_the_data_metrics(tiny_checkpoint, tokenizer, tmp_path):
    long_prompt = "Compute " + "+".join(["12"] * 60) + "."
    lines = [row("Compute 1+2.", "3"), '{"prompt": "caf\xe9", "answer": "2"}'.encode("latin-1"), row(None), row(long_prompt)]
    path = write_lines(tmp_path / "train.jsonl", lines)
    cfg = validate_config(
        {
            "policy": {"model_name": tiny_checkpoint, "max_total_sequence_length": 64, "train_global_batch_size": 4,
                       "generation": {"max_new_tokens": 8}},
            "data": {"train": {"type": "file", "path": str(path)}, "on_bad_row": "skip"},
            "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 2},
            "logger": {"log_dir": str(tmp_path / "run")},
        },
        RecipeConfig,
    )  # fmt: skip
    data = load_data(cfg)
    assert len(data.skipped_rows) == 2 and "not valid UTF-8" in data.skipped_rows[0]
    train, _, metrics = tokenize_data(cfg, data, tokenizer, Console(enabled=False))
    assert [p.sample.origin for p in train] == ["train.jsonl:0"]
    assert metrics["data/skipped_bad_rows"] == 2.0 and metrics["data/dropped_long_prompts"] == 1.0


def test_long_prompt_dropped_by_origin_not_truncated(tokenizer):
    samples = [Sample(prompt="Compute 1+2.", ground_truth="3", metadata={}, origin="a:0"),
               Sample(prompt="Compute " + "+".join(["12"] * 60) + ".", ground_truth="720", metadata={}, origin="a:1")]  # fmt: skip
    result = tokenize_prompts(samples, tokenizer, template="{prompt}", max_prompt_tokens=40)
    assert [p.sample.origin for p in result.prompts] == ["a:0"] and result.dropped == ["a:1"]


# --- empty responses ----------------------------------------------------------------------------


class ScriptedEngine:
    """Returns the given responses (token ids) in order, one per prompt."""

    def __init__(self, responses: list[list[int]]) -> None:
        self.responses = responses

    def generate(self, prompts, params, multimodal=None, on_finished=None):  # never calls on_finished
        assert len(prompts) == len(self.responses)
        return [
            Rollout(prompt_token_ids=list(p), token_ids=r, logprobs=[-1.0] * len(r), finish_reason="stop")
            for p, r in zip(prompts, self.responses, strict=True)
        ]


def test_empty_responses_are_scored_kept_and_counted(tokenizer):
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    answer = tokenizer("3", add_special_tokens=False)["input_ids"]
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Compute 1+2."}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    prompt = Prompt(sample=Sample(prompt="Compute 1+2.", ground_truth="3", metadata={}, origin="t:0"),
                    text="Compute 1+2.", token_ids=list(prompt_ids))  # fmt: skip
    # four responses to one prompt: right, empty (an immediate end of turn), whitespace, nothing at all
    engine = ScriptedEngine([[*answer, end], [end], [*space, end], []])
    groups, metrics = generate_and_score(
        [prompt], engine=engine, params=SamplingParams(max_new_tokens=8), env=build("math"), tokenizer=tokenizer,
        grpo=GRPOConfig(), num_generations=4, width=len(prompt_ids) + 8,
    )  # fmt: skip
    assert groups["raw_rewards"].tolist() == [[1.0, 0.0, 0.0, 0.0]]  # scored by the environment, none dropped
    assert groups["lengths"].tolist() == [[len(answer) + 1, 1.0, len(space) + 1, 0.0]]
    assert metrics["train/empty_responses"] == 3.0
    assert groups["input_ids"].shape[:2] == torch.Size([1, 4])
