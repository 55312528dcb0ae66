"""Real-shape Gemma 4 presets (models/gemma4_presets.py), built on the meta device.

Expected counts are GEMMA4.md's table, at the precision it states: billions to 2 decimals, towers
to the nearest million. Embedding tables are also checked exactly by hand: vocab x width.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig

from posttrain.models.gemma4_presets import (
    GEMMA4_PRESET_NAMES,
    build_on_meta,
    gemma4_preset_config,
    parameter_counts,
)

pytestmark = pytest.mark.unit

VOCAB = 262_144

# name: (total, text, embeddings, per-layer embeddings, text rest) in billions
EXPECTED_BILLIONS = {
    "e2b": (5.10, 4.63, 0.40, 2.35, 1.88),
    "e4b": (7.94, 7.46, 0.67, 2.82, 3.97),
    "26b-a4b": (25.81, 25.23, 0.74, 0.0, 24.49),
    "31b": (31.27, 30.70, 1.41, 0.0, 29.29),
}
# name: (vision tower, audio tower) in millions
EXPECTED_TOWER_MILLIONS = {"e2b": (167, 305), "e4b": (167, 305), "26b-a4b": (570, 0), "31b": (570, 0)}
# name: (layers, hidden, heads, kv heads sliding, kv heads full, sliding layers per full layer, window)
EXPECTED_SHAPE = {
    "e2b": (35, 1536, 8, 1, 1, 4, 512),
    "e4b": (42, 2560, 8, 2, 2, 5, 512),
    "26b-a4b": (30, 2816, 16, 8, 2, 5, 1024),
    "31b": (60, 5376, 32, 16, 4, 5, 1024),
}


@pytest.fixture(scope="module")
def models() -> dict[str, Gemma4ForConditionalGeneration]:
    return {name: build_on_meta(gemma4_preset_config(name)) for name in GEMMA4_PRESET_NAMES}


@pytest.fixture(scope="module")
def counts(models) -> dict[str, dict[str, int]]:
    return {name: parameter_counts(model) for name, model in models.items()}


def _billions(n: int) -> float:
    return round(n / 1e9, 2)


def _text_layers(model: Gemma4ForConditionalGeneration):
    return model.model.language_model.layers


# ---------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_parameter_counts_match_the_released_models(counts, name):
    c = counts[name]
    got = tuple(_billions(c[k]) for k in ("total", "text", "embeddings", "per_layer_embeddings", "text_rest"))
    assert got == EXPECTED_BILLIONS[name]
    assert (round(c["vision_tower"] / 1e6), round(c["audio_tower"] / 1e6)) == EXPECTED_TOWER_MILLIONS[name]


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_counts_add_up_with_tied_lm_head_counted_once(models, counts, name):
    c = counts[name]
    assert c["total"] == c["text"] + c["vision"] + c["audio"]
    assert c["vision"] > c["vision_tower"]  # the projection into the language model
    assert (c["audio"] > c["audio_tower"]) == (c["audio_tower"] > 0)
    model = models[name]
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_embedding_tables_by_hand(counts, name):
    layers, hidden = EXPECTED_SHAPE[name][:2]
    ple_width = 256 if name in ("e2b", "e4b") else 0
    assert counts[name]["embeddings"] == VOCAB * hidden
    assert counts[name]["per_layer_embeddings"] == VOCAB * layers * ple_width


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_text_only_preset_counts_the_text_model(counts, name):
    config = gemma4_preset_config(name, text_only=True)
    assert isinstance(config, Gemma4TextConfig)
    model = build_on_meta(config)
    assert isinstance(model, Gemma4ForCausalLM)
    text_counts = parameter_counts(model)
    assert text_counts["total"] == text_counts["text"] == counts[name]["text"]
    assert text_counts["vision"] == text_counts["audio"] == 0


# ------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_attention_shapes_per_layer_type(models, name):
    layers, hidden, heads, kv_sliding, kv_full, sliding_per_full, window = EXPECTED_SHAPE[name]
    text = models[name].config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.sliding_window) == (layers, hidden, window)
    period = sliding_per_full + 1
    expected_types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers)]
    assert text.layer_types == expected_types and expected_types[-1] == "full_attention"
    for layer_type, layer in zip(text.layer_types, _text_layers(models[name])):
        attn = layer.self_attn
        head_dim, kv_heads = (512, kv_full) if layer_type == "full_attention" else (256, kv_sliding)
        assert attn.head_dim == head_dim
        assert attn.q_proj.out_features == heads * head_dim
        if not attn.is_kv_shared_layer:
            assert attn.k_proj.out_features == kv_heads * head_dim


def test_e2b_kv_shared_layers_have_no_kv_projections_and_double_wide_mlp(models):
    layers = _text_layers(models["e2b"])
    shared = [i for i, layer in enumerate(layers) if layer.self_attn.is_kv_shared_layer]
    assert shared == list(range(15, 35))
    for i, layer in enumerate(layers):
        children = dict(layer.self_attn.named_children())
        assert ("k_proj" in children, "v_proj" in children) == (i < 15, i < 15)
        assert layer.mlp.gate_proj.out_features == (12_288 if i in shared else 6144)


def test_e4b_has_18_kv_shared_layers_and_a_single_width_mlp(models):
    layers = _text_layers(models["e4b"])
    assert sum(layer.self_attn.is_kv_shared_layer for layer in layers) == 18
    assert {layer.mlp.gate_proj.out_features for layer in layers} == {10_240}


def test_26b_a4b_experts_are_3d_with_128_experts_top_8(models):
    text = models["26b-a4b"].config.text_config
    assert (text.enable_moe_block, text.num_experts, text.top_k_experts) == (True, 128, 8)
    for layer in _text_layers(models["26b-a4b"]):
        assert layer.experts.gate_up_proj.shape == (128, 2 * 704, 2816)
        assert layer.experts.down_proj.shape == (128, 2816, 704)
        assert layer.router.proj.out_features == 128
        assert layer.mlp.gate_proj.out_features == 2112  # the dense MLP acting as shared expert


@pytest.mark.parametrize("name", ["26b-a4b", "31b"])
def test_large_models_full_attention_layers_have_no_v_proj(models, name):
    text = models[name].config.text_config
    assert text.attention_k_eq_v and text.use_bidirectional_attention == "vision"
    for layer_type, layer in zip(text.layer_types, _text_layers(models[name])):
        assert (layer.self_attn.v_proj is None) == (layer_type == "full_attention")


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_shared_text_settings(name):
    text = gemma4_preset_config(name, text_only=True)
    assert text.vocab_size == text.vocab_size_per_layer_input == VOCAB
    assert text.final_logit_softcapping == 30.0 and text.tie_word_embeddings
    assert text.eos_token_id == [1, 106]
    assert text.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 10_000.0}
    assert text.rope_parameters["full_attention"] == {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    }
    e_series = name in ("e2b", "e4b")
    assert text.hidden_size_per_layer_input == (256 if e_series else 0)
    assert text.attention_k_eq_v is not e_series
    assert text.max_position_embeddings == (131_072 if e_series else 262_144)


@pytest.mark.parametrize("name", GEMMA4_PRESET_NAMES)
def test_vision_audio_and_token_ids(name):
    config = gemma4_preset_config(name)
    assert isinstance(config, Gemma4Config)
    vision = config.vision_config
    e_series = name in ("e2b", "e4b")
    shape = (vision.num_hidden_layers, vision.hidden_size, vision.num_attention_heads, vision.head_dim)
    assert shape == ((16, 768, 12, 64) if e_series else (27, 1152, 16, 72))
    assert vision.pooling_kernel_size == 3
    assert (vision.use_clipped_linears, vision.standardize) == (e_series, not e_series)
    assert (config.audio_config is not None) == e_series
    assert config.eos_token_id == [1, 106] and config.vision_soft_tokens_per_image == 280
    token_ids = (config.boi_token_id, config.eoi_token_id, config.image_token_id, config.video_token_id)
    assert token_ids == (255_999, 258_882, 258_880, 258_884)
    assert (config.boa_token_id, config.eoa_token_index, config.audio_token_id) == (256_000, 258_883, 258_881)


def test_presets_are_fresh_objects():
    first = gemma4_preset_config("e2b")
    first.text_config.layer_types[0] = "full_attention"
    assert gemma4_preset_config("e2b").text_config.layer_types[0] == "sliding_attention"


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(ValueError, match=r"valid names: e2b, e4b, 26b-a4b, 31b\. Did you mean '31b'\?"):
        gemma4_preset_config("31B")
    with pytest.raises(ValueError, match="valid names"):
        gemma4_preset_config("llama", text_only=True)


def test_build_on_meta_allocates_nothing(models):
    assert {p.device.type for p in models["31b"].parameters()} == {"meta"}


def test_temper_random_init_attention_sets_every_text_q_norm_to_inverse_sqrt_head_dim():
    from transformers import Gemma4ForCausalLM

    from posttrain.models.gemma4_presets import temper_random_init_attention
    from posttrain.models.tiny import tiny_gemma4_config

    model = Gemma4ForCausalLM(tiny_gemma4_config(64, variant="e_series"))  # head dims 16 and 32
    assert temper_random_init_attention(model) == model.config.num_hidden_layers
    for layer in model.model.layers:
        attention = layer.self_attn
        expected = 0.25 if attention.head_dim == 16 else 32**-0.5
        assert torch.equal(attention.q_norm.weight, torch.full_like(attention.q_norm.weight, expected))
    assert {layer.self_attn.head_dim for layer in model.model.layers} == {16, 32}
