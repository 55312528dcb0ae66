"""Prompts with images through the tiny Gemma 4 processor (data/prompts.py,
tokenize_multimodal_prompts): images before the text, one placeholder per soft token (one per
12 x 12 pixels), one BOS, text-only samples beside image ones, images of different sizes, and an
image the processor cannot take named by its sample."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from posttrain.data.prompts import tokenize_multimodal_prompts
from posttrain.data.shapes import shape_count_samples
from posttrain.data.sources import DataError
from posttrain.data.types import Sample
from posttrain.models.tiny import build_tiny_processor, train_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def processor():
    corpus = [s.prompt + " " + s.ground_truth for s in shape_count_samples(50, seed=0)]
    return build_tiny_processor(train_tokenizer(corpus, vocab_size=300, multimodal=True))


def test_images_become_placeholders_before_the_text(processor):
    tokenizer = processor.tokenizer
    samples = shape_count_samples(2, seed=0, image_sizes=[(48, 48), (60, 36)])
    text_only = Sample(prompt="What is 2+2?", ground_truth="4", metadata={}, origin="text:0")
    result = tokenize_multimodal_prompts([*samples, text_only], processor, template="{prompt}", max_prompt_tokens=200)
    first, second, third = result.prompts
    image_id = tokenizer.image_token_id
    assert [p.token_ids.count(image_id) for p in result.prompts] == [16, 15, 0]  # (48/12)^2, (60/12)*(36/12)
    for prompt in result.prompts:
        assert prompt.token_ids.count(tokenizer.bos_token_id) == 1 and prompt.token_ids[0] == tokenizer.bos_token_id
    text_start = first.token_ids.index(tokenizer.encode("How", add_special_tokens=False)[0])
    assert max(i for i, t in enumerate(first.token_ids) if t == image_id) < text_start
    assert first.multimodal["pixel_values"].shape[0] == second.multimodal["pixel_values"].shape[0] == 1
    assert third.multimodal is None
    decoded = tokenizer.decode(third.token_ids)
    assert decoded.startswith("<bos><|turn>user\nWhat is 2+2?") and decoded.endswith("<|turn>model\n")


def test_an_image_the_processor_cannot_take_names_its_sample(processor):
    good = shape_count_samples(1, seed=0)[0]
    odd_size = dataclasses.replace(good, origin="shapes:train:7", images=(Image.new("RGB", (50, 50), "white"),))
    with pytest.raises(DataError, match="shapes:train:7: the processor could not take its 1 image"):
        tokenize_multimodal_prompts([good, odd_size], processor, template="{prompt}", max_prompt_tokens=200)
    not_an_image = dataclasses.replace(good, origin="geo.parquet:3", images=("not an image",))
    with pytest.raises(DataError, match="geo.parquet:3"):
        tokenize_multimodal_prompts([not_an_image], processor, template="{prompt}", max_prompt_tokens=200)


def test_long_prompts_are_dropped_counting_image_tokens(processor):
    samples = shape_count_samples(3, seed=0, max_count=2, image_sizes=[(24, 24), (96, 96), (24, 24)])  # 4, 64, 4 tokens
    result = tokenize_multimodal_prompts(samples, processor, template="{prompt}", max_prompt_tokens=60)
    assert result.dropped == ["shapes:train:1"] and len(result.prompts) == 2
