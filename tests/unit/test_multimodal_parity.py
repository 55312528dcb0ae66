"""Images end to end on the tiny multimodal Gemma 4: processor -> pixel values, image positions and
placeholder tokens -> logprobs and generation, each against transformers' own forward / generate.

Rows mix images of different sizes and a text-only prompt, left-padded as the engine pads them.
Text models: the dense (31B-like) and MoE (26B-like) variants, whose image tokens attend
bidirectionally (so a missing or wrong `mm_token_type_ids` would change the logprobs), and the
E-series (E4B-like), which has no bidirectional attention.
"""

from __future__ import annotations

import numpy as np
import pytest

# transformers < 5.21 imports Gemma 4's torchvision image processor from its processor module;
# torchvision must not be installed beside CPU torch. Newer transformers need only Pillow.
pytest.importorskip("transformers.models.gemma4.processing_gemma4", reason="Gemma 4 image processing needs torchvision on transformers < 5.21")
import torch
from PIL import Image
from transformers import Gemma4ForConditionalGeneration

from posttrain.models.logprobs import position_ids_from_mask, token_logprobs
from posttrain.models.tiny import (
    build_tiny_processor,
    tiny_gemma4_config,
    tiny_gemma4_multimodal_config,
    train_tokenizer,
)
from posttrain.rollout.base import MultimodalPrompt, SamplingParams
from posttrain.rollout.continuous_engine import ContinuousBatchingEngine
from posttrain.rollout.torch_engine import TorchRolloutEngine

pytestmark = pytest.mark.unit

TEMPERATURE = 0.8
TOL = {"rtol": 0, "atol": 1e-5}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["describe the picture", "what color is it", "how many shapes", "user model", "12 + 7 = 19"] * 4
    return train_tokenizer(corpus, vocab_size=300, multimodal=True)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_tiny_processor(tokenizer)


@pytest.fixture(scope="module", params=["dense", "moe", "e_series"])
def model(request, tokenizer):
    torch.manual_seed(0)
    text_config = tiny_gemma4_config(len(tokenizer), variant=request.param)
    model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(text_config)).eval()
    with torch.no_grad():
        model.get_decoder().norm.weight.mul_(5.0)  # spread logits so softcap and temperature matter
    return model


def _image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _prompts(processor) -> tuple[list[list[int]], list[MultimodalPrompt | None]]:
    """Three prompts, processed one by one: a 24x24 image (4 soft tokens), a 36x24 one (6), text only."""
    rows = [
        ("<|image|>describe the picture", [_image(24, 24, 0)]),
        ("how many shapes<|image|> what color is it", [_image(36, 24, 1)]),
        ("what color is it", None),
    ]
    prompts, multimodal = [], []
    for text, images in rows:
        out = processor(text=[text], images=[images] if images else None, return_tensors="pt")
        prompts.append(out["input_ids"][0].tolist())
        multimodal.append(MultimodalPrompt({"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}) if images else None)
    return prompts, multimodal


def _engine(kind: str, model):
    if kind == "torch":
        return TorchRolloutEngine(model, pad_token_id=0, dtype=torch.float32)
    # max_batch_size 2 < 3 prompts: the text-only prompt joins when an image prompt's slot frees
    return ContinuousBatchingEngine(
        model, pad_token_id=0, precision="float32", max_batch_size=2, language_model_only=False, sync_every=3
    )


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids_BT = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask_BT = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids_BT, mask_BT


def _images(multimodal) -> dict[str, torch.Tensor]:
    present = [m for m in multimodal if m is not None]
    return {
        "pixel_values": torch.cat([m["pixel_values"] for m in present]),
        "image_position_ids": torch.cat([m["image_position_ids"] for m in present]),
    }


def _reference_logprobs(model, ids_BT, mask_BT, images, mm_token_type_ids_BT):
    logits_BTV = model(
        input_ids=ids_BT,
        attention_mask=mask_BT,
        position_ids=position_ids_from_mask(mask_BT),
        mm_token_type_ids=mm_token_type_ids_BT,
        use_cache=False,
        **images,
    ).logits
    return torch.log_softmax(logits_BTV[:, :-1] / TEMPERATURE, -1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)


def test_the_processor_gives_placeholders_images_and_token_types(processor, tokenizer):
    prompts, multimodal = _prompts(processor)
    image_id = tokenizer.image_token_id
    assert [row.count(image_id) for row in prompts] == [4, 6, 0]
    assert multimodal[0]["pixel_values"].shape[0] == multimodal[1]["pixel_values"].shape[0] == 1
    out = processor(text=["how many shapes<|image|>"], images=[[_image(36, 24, 1)]], return_tensors="pt")
    assert torch.equal(out["mm_token_type_ids"], (out["input_ids"] == image_id).long())


@torch.no_grad()
def test_token_logprobs_with_images_equal_transformers_forward(model, processor, tokenizer):
    prompts, multimodal = _prompts(processor)
    ids_BT, mask_BT = _left_padded(prompts)
    images = _images(multimodal)
    token_types_BT = (ids_BT == tokenizer.image_token_id).long()  # what the processor gives, left-padded
    expected_BT1 = _reference_logprobs(model, ids_BT, mask_BT, images, token_types_BT)
    real_BT1 = mask_BT[:, :-1].bool()

    # mm_token_type_ids passed, or left out (derived from the placeholder ids): the same numbers
    for extra in ({"mm_token_type_ids": token_types_BT}, {}):
        got_BT1 = token_logprobs(model, ids_BT, mask_BT, temperature=TEMPERATURE, **images, **extra)
        torch.testing.assert_close(got_BT1[real_BT1], expected_BT1[real_BT1], **TOL)

    # images matter, and for a bidirectional-vision model so do the token types
    other = dict(images, pixel_values=images["pixel_values"].flip(1))
    moved = token_logprobs(model, ids_BT, mask_BT, temperature=TEMPERATURE, **other)
    assert (moved[real_BT1] - expected_BT1[real_BT1]).abs().max() > 1e-3
    causal_BT1 = _reference_logprobs(model, ids_BT, mask_BT, images, torch.zeros_like(ids_BT))
    bidirectional = model.config.get_text_config().use_bidirectional_attention == "vision"
    assert ((causal_BT1[real_BT1] - expected_BT1[real_BT1]).abs().max() > 1e-4) == bidirectional


@pytest.mark.parametrize("engine_kind", ["torch", "continuous"])
def test_generator_logprobs_with_images_equal_token_logprobs(model, processor, engine_kind):
    prompts, multimodal = _prompts(processor)
    engine = _engine(engine_kind, model)
    rollouts = engine.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_new_tokens=10, seed=3), multimodal)
    for rollout, images in zip(rollouts, multimodal, strict=True):
        ids = rollout.prompt_token_ids + rollout.token_ids
        extra = {"pixel_values": images["pixel_values"], "image_position_ids": images["image_position_ids"]} if images else {}
        with torch.no_grad():
            lp_T1 = token_logprobs(
                model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), temperature=TEMPERATURE, **extra
            )
        torch.testing.assert_close(
            torch.tensor(rollout.logprobs), lp_T1[0, len(rollout.prompt_token_ids) - 1 :], **TOL
        )


@pytest.mark.parametrize("engine_kind", ["torch", "continuous"])
def test_greedy_generation_with_images_equals_transformers_generate(model, processor, tokenizer, engine_kind):
    prompts, multimodal = _prompts(processor)
    engine = _engine(engine_kind, model)
    rollouts = engine.generate(prompts, SamplingParams(top_k=1, max_new_tokens=8), multimodal)
    ids_BT, mask_BT = _left_padded(prompts)
    never = [model.config.image_token_id, model.config.video_token_id, model.config.audio_token_id]
    with torch.no_grad():
        expected_BN = model.generate(
            input_ids=ids_BT,
            attention_mask=mask_BT,
            mm_token_type_ids=(ids_BT == tokenizer.image_token_id).long(),
            **_images(multimodal),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            pad_token_id=0,
            eos_token_id=None,
            suppress_tokens=never,
        )[:, ids_BT.shape[1] :]
    assert [r.token_ids for r in rollouts] == expected_BN.tolist()
