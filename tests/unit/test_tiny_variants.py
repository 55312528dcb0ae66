"""Tiny Gemma 4 variants (dense / moe / e_series), the tiny multimodal model and its offline processor."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest

# transformers < 5.21 imports Gemma 4's torchvision image processor from its processor module;
# torchvision must not be installed beside CPU torch. Newer transformers need only Pillow.
pytest.importorskip("transformers.models.gemma4.processing_gemma4", reason="Gemma 4 image processing needs torchvision on transformers < 5.21")
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4ImageProcessorPil,
    Gemma4Processor,
    Gemma4TextConfig,
)
from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

from posttrain.models.loading import load_processor
from posttrain.models.tiny import (
    GEMMA4_CHAT_TEMPLATE,
    MULTIMODAL_TOKEN_IDS,
    SPECIAL_TOKENS,
    VARIANTS,
    build_tiny_processor,
    save_tiny_gemma4,
    tiny_gemma4_config,
    tiny_gemma4_multimodal_config,
    train_tokenizer,
)

pytestmark = pytest.mark.unit

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
CORPUS = ["12 + 7 = 19", "user model", "the cat sat on the mat 345", "Compute 81 - 9"] * 3
S, F = "sliding_attention", "full_attention"
VOCAB = 300


@pytest.fixture(scope="module")
def mm_tokenizer():
    return train_tokenizer(CORPUS + ["describe the picture", "what color is it"], vocab_size=VOCAB, multimodal=True)


@pytest.fixture(scope="module")
def processor(mm_tokenizer):
    return build_tiny_processor(mm_tokenizer)


def _image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _text_model(variant: str, **overrides) -> Gemma4ForCausalLM:
    torch.manual_seed(0)
    return Gemma4ForCausalLM(tiny_gemma4_config(VOCAB, variant=variant, **overrides)).eval()


def _mm_model(variant: str, tokenizer) -> Gemma4ForConditionalGeneration:
    torch.manual_seed(0)
    text_config = tiny_gemma4_config(len(tokenizer), variant=variant)
    return Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(text_config)).eval()


def _two_image_batch(processor, seeds=(0, 1)):
    """Row 0: a 24x24 image (4 soft tokens) then text; row 1: text then a 36x24 image (6)."""
    text = ["<|image|>describe the picture", "what color is it<|image|>"]
    images = [[_image(24, 24, seeds[0])], [_image(36, 24, seeds[1])]]
    return processor(text=text, images=images, return_tensors="pt")


# ------------------------------------------------------------------------------ text variants


def test_dense_is_31b_shaped():
    model = _text_model("dense")
    config = model.config
    assert config.layer_types == [S, S, F, S, S, F]
    assert config.use_bidirectional_attention == "vision"
    assert config.final_logit_softcapping == 30.0
    assert config.sliding_window == 8
    for layer, layer_type in zip(model.model.layers, config.layer_types):
        attn = layer.self_attn
        if layer_type == F:  # k_eq_v: no v_proj, 1 kv head of 32
            assert attn.v_proj is None
            assert attn.head_dim == 32 and attn.sliding_window is None
            assert tuple(attn.q_proj.weight.shape) == (4 * 32, 32)
            assert tuple(attn.k_proj.weight.shape) == (1 * 32, 32)
        else:  # 2 kv heads of 16, separate V
            assert attn.head_dim == 16 and attn.sliding_window == 8
            assert tuple(attn.q_proj.weight.shape) == (4 * 16, 32)
            assert tuple(attn.k_proj.weight.shape) == (2 * 16, 32)
            assert tuple(attn.v_proj.weight.shape) == (2 * 16, 32)
        assert not layer.enable_moe_block and not layer.hidden_size_per_layer_input


def test_moe_is_26b_a4b_shaped():
    model = _text_model("moe")
    config = model.config
    assert config.layer_types == [S, S, F]
    assert (config.num_experts, config.top_k_experts, config.moe_intermediate_size) == (4, 2, 8)
    for layer, layer_type in zip(model.model.layers, config.layer_types):
        assert tuple(layer.experts.gate_up_proj.shape) == (4, 2 * 8, 32)  # [E, 2I, H]
        assert tuple(layer.experts.down_proj.shape) == (4, 32, 8)  # [E, H, I]
        assert tuple(layer.router.proj.weight.shape) == (4, 32)
        assert tuple(layer.mlp.gate_proj.weight.shape) == (64, 32)  # the ordinary MLP: shared expert
        assert (layer.self_attn.v_proj is None) == (layer_type == F)
        assert layer.self_attn.head_dim == (32 if layer_type == F else 16)
    # the router picks 2 of 4 experts per token, weights renormalized (per-expert scale 1 at init)
    _, weights, index = model.model.layers[0].router(torch.randn(10, 32))
    assert tuple(index.shape) == (10, 2) and len({tuple(sorted(row)) for row in index.tolist()}) > 1
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))


def test_e_series_is_e2b_shaped():
    model = _text_model("e_series")
    config = model.config
    assert config.layer_types == [S, S, F, S, F]
    assert config.use_bidirectional_attention is None
    # per-layer embeddings: one packed table [V, layers * 8]
    assert tuple(model.model.embed_tokens_per_layer.weight.shape) == (VOCAB, 5 * 8)
    for i, (layer, layer_type) in enumerate(zip(model.model.layers, config.layer_types)):
        attn = layer.self_attn
        shared = i >= 3
        assert attn.is_kv_shared_layer == shared
        assert hasattr(attn, "k_proj") != shared and hasattr(attn, "v_proj") != shared
        assert attn.head_dim == (32 if layer_type == F else 16)
        assert layer.mlp.intermediate_size == (128 if shared else 64)  # double-wide on KV-shared layers
        assert tuple(layer.per_layer_input_gate.weight.shape) == (8, 32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_forward_is_finite_and_softcapped(variant):
    model = _text_model(variant)
    input_ids_BT = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits_BTV = model(input_ids=input_ids_BT).logits
    assert logits_BTV.shape == (4, 32, VOCAB)
    assert torch.isfinite(logits_BTV).all()
    assert logits_BTV.abs().max() < 30.0


@pytest.mark.parametrize("variant", ["dense", "moe", "e_series"])
def test_sliding_window_of_8_is_exceeded_by_test_sequences(variant):
    """Same weights, window 8 vs 64: positions 0-7 see everything either way, position 8 on do not."""
    input_ids_BT = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        narrow_BTV = _text_model(variant).forward(input_ids=input_ids_BT).logits
        wide_BTV = _text_model(variant, sliding_window=64).forward(input_ids=input_ids_BT).logits
    torch.testing.assert_close(narrow_BTV[:, :8], wide_BTV[:, :8], rtol=1e-5, atol=1e-5)
    assert (narrow_BTV[:, 8:] - wide_BTV[:, 8:]).abs().amax(dim=-1).min() > 1e-4


def test_config_errors_are_loud():
    with pytest.raises(ValueError, match="unknown variant"):
        tiny_gemma4_config(VOCAB, variant="e4b")
    with pytest.raises(TypeError, match="num_expert"):
        tiny_gemma4_config(VOCAB, variant="moe", num_expert=8)  # typo of num_experts
    with pytest.raises(ValueError, match="no producer"):  # [S, S, F] with 2 shared: no full producer
        tiny_gemma4_config(VOCAB, variant="e_series", num_hidden_layers=3)


# ------------------------------------------------------------- default text-only path unchanged


def test_default_tokenizer_is_unchanged():
    tokenizer = train_tokenizer(CORPUS, vocab_size=300)
    assert len(tokenizer) == 290
    assert tokenizer.convert_ids_to_tokens(list(range(6))) == SPECIAL_TOKENS
    assert "<|image|>" not in tokenizer.get_vocab()
    assert tokenizer.extra_special_tokens == ["<|turn>", "<turn|>"]
    assert tokenizer.chat_template == GEMMA4_CHAT_TEMPLATE
    # pinned from the tokenizer as it was before variants existed
    ids = tokenizer("the cat sat 12 + 7<turn|>", add_special_tokens=False)["input_ids"]
    assert ids == [264, 282, 284, 226, 22, 23, 278, 226, 28, 5]


def test_default_config_is_unchanged():
    expected = Gemma4TextConfig(
        vocab_size=290,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        global_head_dim=32,
        sliding_window=64,
        layer_types=[S, F],
        max_position_embeddings=1024,
        final_logit_softcapping=30.0,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=290,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=[1],
    )
    assert tiny_gemma4_config(290).to_dict() == expected.to_dict()
    assert tiny_gemma4_config(290, variant="basic", num_hidden_layers=3).layer_types == [S, F, F]


def test_multimodal_tokenizer_extends_the_text_layout(mm_tokenizer):
    ids = list(range(13))
    assert mm_tokenizer.convert_ids_to_tokens(ids[:6]) == SPECIAL_TOKENS
    assert mm_tokenizer.convert_ids_to_tokens(ids[6:]) == [
        "<|image|>", "<|image>", "<image|>", "<|audio|>", "<|audio>", "<audio|>", "<|video|>"
    ]  # fmt: skip
    assert (mm_tokenizer.image_token_id, mm_tokenizer.boi_token, mm_tokenizer.eoa_token) == (6, "<|image>", "<audio|>")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "4"}]
    assert (
        mm_tokenizer.apply_chat_template(messages, tokenize=False)
        == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n4<turn|>\n"
    )


# ----------------------------------------------------------------------------- multimodal


def test_multimodal_config_uses_the_tokenizer_ids(mm_tokenizer):
    config = tiny_gemma4_multimodal_config(tiny_gemma4_config(len(mm_tokenizer), variant="dense"))
    tok = mm_tokenizer
    assert config.image_token_id == tok.image_token_id == MULTIMODAL_TOKEN_IDS["image_token"]
    assert (config.boi_token_id, config.eoi_token_id) == (tok.boi_token_id, tok.eoi_token_id)
    assert (config.audio_token_id, config.boa_token_id, config.eoa_token_index) == (
        tok.audio_token_id, tok.boa_token_id, tok.eoa_token_id
    )  # fmt: skip
    assert config.video_token_id == tok.video_token_id
    assert config.audio_config is not None
    assert tiny_gemma4_multimodal_config(config.text_config, audio=False).audio_config is None


def test_chat_template_renders_an_image_part(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|turn>user\n<|image|>Hi<turn|>\n<|turn>model\n"


def test_two_images_of_different_sizes_through_the_processor(processor, mm_tokenizer):
    batch = _two_image_batch(processor)
    image_id = mm_tokenizer.image_token_id
    assert tuple(batch["pixel_values"].shape) == (2, 630, 3 * 4 * 4)  # 70 soft tokens x 9 patches, padded
    assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    positions = batch["image_position_ids"]
    real = (positions != -1).all(-1)
    assert real.sum(-1).tolist() == [6 * 6, 9 * 6]  # 24x24 and 36x24 px in 4 px patches
    assert positions[1][real[1]].amax(0).tolist() == [5, 8]  # (x, y): 6 wide, 9 tall
    # mm_token_type_ids: 1 exactly on the image soft tokens (not on <|image> / <image|>), 0 elsewhere
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_id).long())
    assert batch["mm_token_type_ids"].sum(-1).tolist() == [4, 6]
    for row in batch["input_ids"].tolist():
        first = row.index(image_id)
        count = row.count(image_id)
        assert row[first - 1] == mm_tokenizer.boi_token_id and row[first + count] == mm_tokenizer.eoi_token_id
    # the vision tower produces exactly that many soft tokens per image
    model = _mm_model("dense", mm_tokenizer)
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"]).pooler_output
    assert [tuple(f.shape) for f in features] == [(4, 32), (6, 32)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_multimodal_forward_runs_and_images_flow(variant, processor, mm_tokenizer):
    model = _mm_model(variant, mm_tokenizer)
    batch = _two_image_batch(processor)
    other = _two_image_batch(processor, seeds=(2, 3))  # same sizes and text, other pixels
    assert torch.equal(batch["input_ids"], other["input_ids"])
    with torch.no_grad():
        logits_BTV = model(**batch).logits
        other_BTV = model(**other).logits
    assert torch.isfinite(logits_BTV).all()
    for row in range(2):
        first = batch["input_ids"][row].tolist().index(mm_tokenizer.image_token_id)
        torch.testing.assert_close(logits_BTV[row, :first], other_BTV[row, :first], rtol=1e-5, atol=1e-5)
        assert (logits_BTV[row, first:] - other_BTV[row, first:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize(("variant", "bidirectional"), [("dense", True), ("moe", True), ("e_series", False)])
def test_mm_token_type_ids_switch_bidirectional_image_attention(variant, bidirectional, processor, mm_tokenizer):
    """31B/26B-like configs attend bidirectionally over images only when mm_token_type_ids is passed."""
    model = _mm_model(variant, mm_tokenizer)
    batch = _two_image_batch(processor)
    without = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        diff_BT = (model(**batch).logits - model(**without).logits).abs().amax(-1)
    first = batch["input_ids"][0].tolist().index(mm_tokenizer.image_token_id)
    assert diff_BT[0, :first].max() == 0  # text before the image never sees it
    assert (diff_BT[0, first] > 1e-4) == bidirectional  # first soft token sees the later ones


def test_resizing_processor_takes_any_image(mm_tokenizer):
    processor = build_tiny_processor(mm_tokenizer, resize=True)
    batch = processor(
        text=["<|image|>a", "b<|image|>"], images=[[_image(50, 37, 0)], [_image(20, 90, 1)]], return_tensors="pt"
    )
    counts = batch["mm_token_type_ids"].sum(-1).tolist()
    assert all(0 < n <= 70 for n in counts) and counts[0] != counts[1]
    model = _mm_model("basic", mm_tokenizer)
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"]).pooler_output
        logits_BTV = model(**batch).logits
    assert [len(f) for f in features] == counts
    assert torch.isfinite(logits_BTV).all()


def test_processor_leaves_the_callers_tokenizer_alone_and_refuses_videos(processor, mm_tokenizer):
    assert mm_tokenizer.extra_special_tokens == []  # Gemma4Processor rewrote its own copy's
    assert processor.tokenizer is not mm_tokenizer
    with pytest.raises(ValueError, match="without a video processor"):
        processor(text=["<|video|>"], videos=[np.zeros((2, 24, 24, 3), dtype=np.uint8)])


def test_multimodal_checkpoint_round_trip(tmp_path, processor, mm_tokenizer):
    path = save_tiny_gemma4(tmp_path / "mm", mm_tokenizer, seed=0, variant="dense", multimodal=True)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gemma4" and config["architectures"] == ["Gemma4ForConditionalGeneration"]
    processor_config = json.loads((path / "processor_config.json").read_text())
    assert processor_config["processor_class"] == "Gemma4Processor"
    assert AutoTokenizer.from_pretrained(path).image_token == "<|image|>"

    loaded = load_processor(path)
    batch, reloaded = _two_image_batch(processor), _two_image_batch(loaded)
    assert batch.keys() == reloaded.keys()
    for key in batch:
        assert torch.equal(batch[key], reloaded[key]), key
    model = Gemma4ForConditionalGeneration.from_pretrained(path).eval()
    assert any(name.startswith("model.audio_tower.") for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_multimodal_checkpoint_needs_a_multimodal_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="multimodal=True"):
        save_tiny_gemma4(tmp_path / "mm", train_tokenizer(CORPUS, vocab_size=300), seed=0, multimodal=True)


# ------------------------------------------------------------------- transformers tripwires


@pytest.mark.skipif(HAS_TORCHVISION, reason="the limitation is the absence of torchvision")
def test_tripwire_gemma4_processor_needs_torchvision(mm_tokenizer):
    """Once transformers builds Gemma4Processor(video_processor=None) without torchvision, drop
    Gemma4ProcessorWithoutVideo (models/gemma4_processor.py) and load processors with AutoProcessor."""
    image_processor = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    with pytest.raises(AttributeError, match="_extra_content"):
        Gemma4Processor(Gemma4AudioFeatureExtractor(), image_processor, copy.deepcopy(mm_tokenizer), None)


@pytest.mark.skipif(HAS_TORCHVISION, reason="the limitation is the absence of torchvision")
def test_tripwire_auto_processor_needs_torchvision(tmp_path, mm_tokenizer):
    """transformers #48558: AutoProcessor loads the video processor eagerly."""
    path = save_tiny_gemma4(tmp_path / "mm", mm_tokenizer, seed=0, variant="dense", multimodal=True, audio=False)
    with pytest.raises(ImportError, match="Torchvision"):
        AutoProcessor.from_pretrained(path)


def test_tripwire_max_soft_tokens_has_a_floor_of_70():
    """Why the tiny processor does not resize: a smaller soft-token budget is refused."""
    with pytest.raises(ValueError, match="max_soft_tokens"):
        Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=9, pooling_kernel_size=3)
