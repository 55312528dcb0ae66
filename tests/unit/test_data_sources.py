"""Prompt sources: local JSONL/Parquet files and reasoning-gym, including their error messages."""

import json
import re

import pytest

from posttrain.data.sources import BadRows, DataError, load_jsonl_or_parquet, load_reasoning_gym
from posttrain.data.types import Sample
from posttrain.environments import ReasoningGymEnvironment, scoring_metadata

pytestmark = pytest.mark.unit


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_jsonl_string_prompts_and_extra_columns(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "What is 2+2?", "answer": "4", "level": 1},
            {"prompt": "3*3?", "answer": 9, "level": 2},
        ],
    )
    samples = load_jsonl_or_parquet(path)
    assert samples == [
        Sample(
            prompt="What is 2+2?", ground_truth="4", metadata={"level": 1}, origin="train.jsonl:0"
        ),
        Sample(prompt="3*3?", ground_truth="9", metadata={"level": 2}, origin="train.jsonl:1"),
    ]
    assert len(load_jsonl_or_parquet(path, limit=1)) == 1


def test_parquet_chat_messages_prompt(tmp_path):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "What is 6*7?"},
    ]
    path = write_parquet(
        tmp_path / "chat.parquet", [{"messages": messages, "solution": "42", "source": "hand"}]
    )
    [sample] = load_jsonl_or_parquet(path, prompt_key="messages", answer_key="solution")
    assert sample.prompt == "What is 6*7?"
    assert sample.ground_truth == "42"
    assert sample.metadata == {"source": "hand", "messages": messages}
    assert sample.origin == "chat.parquet:0"


def test_no_answer_column_when_answer_key_none(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Write a poem."}])
    [sample] = load_jsonl_or_parquet(path, answer_key=None)
    assert sample.ground_truth is None and sample.metadata == {}


def test_missing_file_names_path_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        DataError, match=r"data file not found: 'data/train.jsonl'.*current working directory"
    ):
        load_jsonl_or_parquet("data/train.jsonl")


def test_missing_prompt_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "1", "messages": []}])
    with pytest.raises(DataError) as error:
        load_jsonl_or_parquet(path)
    message = str(error.value)
    assert "train.jsonl" in message and "'prompt'" in message
    assert "['question', 'answer', 'messages']" in message and "prompt_key='messages'" in message


def test_missing_answer_column_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "solution": "1"}])
    with pytest.raises(
        DataError,
        match=re.escape("no answer column 'answer'; columns present: ['prompt', 'solution']"),
    ):
        load_jsonl_or_parquet(path)


@pytest.mark.parametrize(
    ("bad_prompt", "shown"),
    [(None, "None"), ("", "''"), ("   ", "'   '"), ({"text": "x"}, "{'text': 'x'}")],
)
def test_invalid_prompt_names_file_and_row(tmp_path, bad_prompt, shown):
    rows = [{"prompt": "fine", "answer": "1"}, {"prompt": bad_prompt, "answer": "2"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError,
        match=re.escape(f"train.jsonl row 1: 'prompt' must be a non-empty string, got {shown}"),
    ):
        load_jsonl_or_parquet(path)


def test_null_answer_names_row(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]
    )
    with pytest.raises(
        DataError,
        match=re.escape("train.jsonl row 1: 'answer' must be a string or a number, got None"),
    ):
        load_jsonl_or_parquet(path)


def test_messages_without_user_turn(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "s"}], "answer": "1"}]
    )
    with pytest.raises(
        DataError, match=re.escape("chat.jsonl row 0: 'messages' has no message with role 'user'")
    ):
        load_jsonl_or_parquet(path, prompt_key="messages")


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "a", "answer": "1"}\n'
        '{"prompt": "b", "answer": 2\n'  # the closing brace is missing
        '{"prompt": "c", "answer": "3"}\n'
    )
    with pytest.raises(DataError, match=r"train\.jsonl line 2: malformed JSON"):
        load_jsonl_or_parquet(path)


def test_empty_file_and_unknown_extension(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl: the file contains no rows"):
        load_jsonl_or_parquet(empty)
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,answer\na,1\n")
    with pytest.raises(DataError, match="unsupported extension '.csv'"):
        load_jsonl_or_parquet(csv)


def test_nested_keys_read_verl_style_columns(tmp_path):
    row = {
        "data_source": "math_dapo",
        "prompt": [{"content": "Solve: 6*7.", "role": "user"}],
        "reward_model": {"ground_truth": "42", "style": "rule"},
    }
    path = write_parquet(tmp_path / "verl.parquet", [row])
    [sample] = load_jsonl_or_parquet(path, prompt_key="prompt", answer_key="reward_model.ground_truth")
    assert (sample.prompt, sample.ground_truth) == ("Solve: 6*7.", "42")  # the chat list's last user message
    assert sample.metadata == {"data_source": "math_dapo", "reward_model": row["reward_model"], "messages": row["prompt"]}
    [by_index] = load_jsonl_or_parquet(path, prompt_key="prompt.0.content", answer_key="reward_model.ground_truth")
    assert by_index.prompt == "Solve: 6*7." and "messages" not in by_index.metadata


def test_a_column_whose_name_has_a_dot_wins_over_descending(tmp_path):
    path = write_jsonl(tmp_path / "dots.jsonl", [{"q.text": "What is 1+1?", "a": {"text": "2"}}])
    [sample] = load_jsonl_or_parquet(path, prompt_key="q.text", answer_key="a.text")
    assert (sample.prompt, sample.ground_truth) == ("What is 1+1?", "2")


def test_nested_key_missing_in_a_row_names_the_row_and_where_it_stopped(tmp_path):
    rows = [{"prompt": "a", "reward_model": {"ground_truth": "1"}}, {"prompt": "b", "reward_model": None}]
    path = write_jsonl(tmp_path / "verl.jsonl", rows)
    with pytest.raises(
        DataError, match=re.escape("verl.jsonl row 1: no 'reward_model.ground_truth': reward_model is None, which has no 'ground_truth'")
    ):
        load_jsonl_or_parquet(path, answer_key="reward_model.ground_truth")
    with pytest.raises(DataError, match=re.escape("no answer column 'solution.value'; columns present: ['prompt', 'reward_model']")):
        load_jsonl_or_parquet(path, answer_key="solution.value")


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "", "answer": "2"}, {"prompt": "c", "answer": [3]}, {"prompt": "d", "answer": 4}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    bad_rows = BadRows("skip")
    samples = load_jsonl_or_parquet(path, bad_rows=bad_rows)
    assert [s.origin for s in samples] == ["train.jsonl:0", "train.jsonl:3"]
    assert bad_rows.skipped == [
        f"{path} row 1: 'prompt' must be a non-empty string, got ''",
        f"{path} row 2: 'answer' must be a string or a number, got [3]",
    ]
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": None, "answer": "1"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: all 1 rows are malformed \(data.on_bad_row: skip\); the first: .*row 0"):
        load_jsonl_or_parquet(all_bad, bad_rows=BadRows("skip"))


def test_file_level_problems_are_errors_even_when_skipping(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": 2\n')
    with pytest.raises(DataError, match=r"line 2: malformed JSON"):
        load_jsonl_or_parquet(path, bad_rows=BadRows("skip"))


def test_a_column_named_like_a_reserved_metadata_key_fails_at_load(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "answer": "1", "origin": "web"}])
    with pytest.raises(DataError, match=r"column\(s\) \['origin'\] would become metadata keys that the environments reserve"):
        load_jsonl_or_parquet(path)
    [sample] = load_jsonl_or_parquet(
        write_jsonl(tmp_path / "gt.jsonl", [{"prompt": "a", "ground_truth": "1"}]), answer_key="ground_truth"
    )
    assert sample.ground_truth == "1" and sample.metadata == {}


def test_reasoning_gym_is_deterministic_by_seed():
    first = load_reasoning_gym("chain_sum", size=4, seed=7)
    again = load_reasoning_gym("chain_sum", size=4, seed=7)
    other = load_reasoning_gym("chain_sum", size=4, seed=8)
    assert first == again
    assert [s.prompt for s in first] != [s.prompt for s in other]
    sample = first[2]
    assert sample.origin == "reasoning_gym:chain_sum:2"
    assert sample.metadata == {
        "reasoning_gym_task": "chain_sum",
        "reasoning_gym_size": 4,
        "reasoning_gym_seed": 7,
        "reasoning_gym_config": {},
        "entry_index": 2,
    }
    # chain_sum answers are the integer value of the sum in the question
    expression = sample.prompt.rsplit(":", 1)[1].strip().rstrip("=").strip()
    assert sample.ground_truth == str(eval(expression))  # noqa: S307 (digits and + - only)
    json.dumps(sample.metadata)  # JSON-serialisable


def test_reasoning_gym_task_options_reach_the_generator_and_the_scorer():
    samples = load_reasoning_gym("chain_sum", size=20, seed=3, config={"min_terms": 2, "max_terms": 2, "max_digits": 1})
    for sample in samples:
        expression = sample.prompt.rsplit(":", 1)[1].strip().rstrip("=").strip()
        operands = expression.replace("-", "+").split("+")
        assert len(operands) == 2 and all(len(o.strip()) == 1 for o in operands), expression
    env = ReasoningGymEnvironment(answer_format="raw")
    metadata = [scoring_metadata(s) for s in samples[:2]]
    truths = [s.ground_truth for s in samples[:2]]
    wrong = str(int(truths[1]) + 1)  # never contains the true answer as a substring (no partial credit)
    assert env.score(["", ""], [truths[0], wrong], metadata) == [1.0, 0.0]


def test_reasoning_gym_unknown_task_suggests_close_names():
    with pytest.raises(
        DataError,
        match=r"unknown reasoning_gym task 'chain_summ'; did you mean one of \['chain_sum'",
    ):
        load_reasoning_gym("chain_summ", size=2, seed=0)
