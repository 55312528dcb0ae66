"""Arithmetic prompts (data/arithmetic.py), tokenization and the resumable iterator (data/prompts.py)."""

from __future__ import annotations

import re

import pytest

from posttrain.config.schema import ArithmeticSource
from posttrain.data.arithmetic import arithmetic_samples
from posttrain.data.prompts import Prompt, PromptIterator, TokenizedPrompts, load_samples, tokenize_prompts
from posttrain.data.sources import DataError
from posttrain.data.types import Sample
from posttrain.models.loading import load_tokenizer

pytestmark = pytest.mark.unit

EXPRESSION = re.compile(r"^Compute ((\d+)([+-]\d+)+)\.$")


# ------------------------------------------------------------------------------- arithmetic


def test_same_seed_same_samples_other_seed_other_samples():
    first = arithmetic_samples(50, seed=3)
    assert first == arithmetic_samples(50, seed=3)
    assert [s.prompt for s in first] != [s.prompt for s in arithmetic_samples(50, seed=4)]
    # a longer draw extends the shorter one
    assert arithmetic_samples(80, seed=3)[:50] == first


def test_ground_truth_is_the_value_of_the_expression():
    for num_terms, max_value in [(2, 99), (3, 9), (4, 50)]:
        samples = arithmetic_samples(200, seed=1, num_terms=num_terms, max_value=max_value)
        for sample in samples:
            match = EXPRESSION.match(sample.prompt)
            assert match, sample.prompt
            expression = match.group(1)
            assert expression == sample.metadata["expression"]
            terms = [int(t) for t in re.findall(r"\d+", expression)]
            assert len(terms) == num_terms and all(0 <= t <= max_value for t in terms)
            assert sample.ground_truth == str(eval(expression))  # noqa: S307 - digits and +/- only
        # both operators and negative results occur
        assert any("-" in s.metadata["expression"] for s in samples)
        assert any(s.ground_truth.startswith("-") for s in samples)


def test_hand_checked_expression_values():
    # independent of eval: 5 - 9 = -4 by hand
    sample = next(s for s in arithmetic_samples(500, seed=0, num_terms=2, max_value=9) if s.metadata["expression"] == "5-9")
    assert sample.ground_truth == "-4"


def test_train_and_validation_splits_differ():
    train = arithmetic_samples(100, seed=0, num_terms=2, max_value=9, split="train")
    validation = arithmetic_samples(100, seed=0, num_terms=2, max_value=9, split="validation")
    train_expressions = {s.metadata["expression"] for s in train}
    validation_expressions = {s.metadata["expression"] for s in validation}
    # only 200 distinct expressions exist here, so shared problems would show up
    assert train_expressions.isdisjoint(validation_expressions)
    assert train[0].origin == "arithmetic:train:0:0"
    assert validation[99].origin == "arithmetic:validation:0:99"


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        arithmetic_samples(3, seed=0, split="test")


def test_load_samples_from_arithmetic_source():
    source = ArithmeticSource(type="arithmetic", size=7, seed=2, num_terms=3, max_value=9)
    assert load_samples(source, split="validation") == arithmetic_samples(7, seed=2, num_terms=3, max_value=9, split="validation")


# ----------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def _sample(prompt: str, origin: str) -> Sample:
    return Sample(prompt=prompt, ground_truth=None, metadata={}, origin=origin)


def test_prompt_is_chat_templated_and_length_limit_is_inclusive(tokenizer):
    sample = _sample("Compute 1+2.", "unit.jsonl:0")
    rendered = "<bos><|turn>user\nQ: Compute 1+2.<turn|>\n<|turn>model\n"
    expected_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert expected_ids[0] == tokenizer.bos_token_id and expected_ids.count(tokenizer.bos_token_id) == 1

    tokenized = tokenize_prompts([sample], tokenizer, template="Q: {prompt}", max_prompt_tokens=len(expected_ids))
    [prompt] = tokenized.prompts
    assert tokenized.dropped == []
    assert prompt.text == "Q: Compute 1+2."
    assert prompt.token_ids == expected_ids
    assert prompt.sample is sample


def test_too_long_prompts_are_dropped_by_origin_and_all_dropped_is_an_error(tokenizer):
    ok = _sample("Compute 1+2.", "unit.jsonl:0")
    long = _sample("Compute " + "+".join(["12"] * 40) + ".", "unit.jsonl:1")
    tokenized = tokenize_prompts([ok, long, ok], tokenizer, template="{prompt}", max_prompt_tokens=40)
    assert [p.sample.origin for p in tokenized.prompts] == ["unit.jsonl:0", "unit.jsonl:0"]
    assert tokenized.dropped == ["unit.jsonl:1"]  # dropped whole, never truncated
    limit = len(tokenized.prompts[0].token_ids)
    with pytest.raises(DataError, match=r"^all 2 prompts are longer than the \d+ tokens .*first: unit\.jsonl:0"):
        tokenize_prompts([ok, ok], tokenizer, template="{prompt}", max_prompt_tokens=limit - 1)
    assert tokenize_prompts([], tokenizer, template="{prompt}", max_prompt_tokens=limit) == TokenizedPrompts([], [])


def test_template_braces_other_than_the_placeholder_are_literal(tokenizer):
    sample = _sample("Compute 1+2.", "unit:0")
    [prompt] = tokenize_prompts([sample], tokenizer, template="{prompt} Answer in \\boxed{}.", max_prompt_tokens=100).prompts
    assert prompt.text == "Compute 1+2. Answer in \\boxed{}."


def test_a_sample_with_images_is_refused_by_text_tokenization(tokenizer):
    sample = Sample(prompt="Find x.", ground_truth="3", metadata={}, origin="geo.parquet:0", images=("an image",))
    with pytest.raises(DataError, match=r"^geo\.parquet:0: the sample carries 1 image\(s\).*VLM loop"):
        tokenize_prompts([sample], tokenizer, template="{prompt}", max_prompt_tokens=100)


# ---------------------------------------------------------------------------------- iterator


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(sample=_sample(f"p{i}", f"unit:{i}"), text=f"p{i}", token_ids=[2, i]) for i in range(n)]


def _names(batch: list[Prompt]) -> list[str]:
    return [p.text for p in batch]


def test_iterator_resumes_the_exact_next_batch():
    prompts = _prompts(10)
    iterator = PromptIterator(prompts, seed=3, shuffle=True)
    iterator.next_batch(4)
    iterator.next_batch(4)
    state = iterator.state_dict()
    assert state == {"epoch": 0, "position": 8}
    expected = _names(iterator.next_batch(7))  # crosses into epoch 1
    expected_after = _names(iterator.next_batch(5))

    resumed = PromptIterator(prompts, seed=3, shuffle=True)
    resumed.load_state_dict(dict(state))
    assert _names(resumed.next_batch(7)) == expected
    assert _names(resumed.next_batch(5)) == expected_after
    assert resumed.state_dict() == iterator.state_dict() == {"epoch": 1, "position": 10}


def test_each_epoch_is_a_new_permutation():
    prompts = _prompts(12)
    iterator = PromptIterator(prompts, seed=0, shuffle=True)
    epochs = [_names(iterator.next_batch(12)) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(_names(prompts))
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] != _names(prompts)  # shuffled
    # the order depends on the seed, and is reproducible
    assert _names(PromptIterator(prompts, seed=0, shuffle=True).next_batch(12)) == epochs[0]
    assert _names(PromptIterator(prompts, seed=1, shuffle=True).next_batch(12)) != epochs[0]


def test_no_shuffle_keeps_file_order_and_wraps():
    prompts = _prompts(5)
    iterator = PromptIterator(prompts, seed=0, shuffle=False)
    assert _names(iterator.next_batch(7)) == ["p0", "p1", "p2", "p3", "p4", "p0", "p1"]
    assert iterator.state_dict() == {"epoch": 1, "position": 2}


def test_empty_prompts_are_an_error():
    with pytest.raises(DataError, match="no prompts"):
        PromptIterator([], seed=0, shuffle=True)


def test_right_padded_rows_hand_values():
    from posttrain.data.batching import right_padded_rows

    rows = right_padded_rows([[2, 7], [2]], [[5, 1], [6, 6, 1]], pad_token_id=0, width=5)
    assert rows["input_ids"].tolist() == [[2, 7, 5, 1, 0], [2, 6, 6, 1, 0]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert rows["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 0]]
    assert right_padded_rows([[2, 7]], [[5]], pad_token_id=9)["input_ids"].tolist() == [[2, 7, 5]]
    with pytest.raises(ValueError, match="width 3"):
        right_padded_rows([[2, 7]], [[5, 1]], pad_token_id=0, width=3)
