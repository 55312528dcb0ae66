"""Real-shape configs of the four released Gemma 4 models, built from configs only (no downloads).

Why: memory planning, sharding plans and throughput estimates need the released shapes, and tests
need them without fetching 5-60 GB of weights. `build_on_meta` instantiates a preset on the meta
device (no storage allocated), and `parameter_counts` breaks its parameters down.

Source of every value: transformers' conversion script
`src/transformers/models/gemma4/convert_gemma4_weights.py` (its `_VARIANTS` table, the two vision
configs, `_ROPE_PARAMS`, and `main()`, which sets eos ids [1, 106] for the instruction-tuned
checkpoints), cross-checked against the released `config.json` files (special token ids, 280 soft
tokens per image, `audio_config: null` for the large models) and against the installed
`Gemma4TextConfig`, where `global_head_dim` and `num_global_key_value_heads` are init-only kwargs
turned into per-layer overrides for full-attention layers.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from transformers import (
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextAttention

GEMMA4_PRESET_NAMES = ("e2b", "e4b", "26b-a4b", "31b")

SLIDING, FULL = "sliding_attention", "full_attention"

# Shared by all four models.
_ROPE_PARAMETERS = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    # "proportional": only a quarter of the 512-wide global head is rotated.
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
_COMMON_TEXT = {
    "vocab_size": 262_144,
    "vocab_size_per_layer_input": 262_144,
    "head_dim": 256,  # sliding layers
    "global_head_dim": 512,  # full-attention layers (init-only kwarg; 512 is also transformers' default)
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
    "rope_parameters": _ROPE_PARAMETERS,
    # Instruction-tuned checkpoints stop on <eos> (1) and <turn|> (106). The conversion script sets
    # this on the top-level config; the preset puts it on the text config too, so that a text-only
    # model also stops at the end of a turn.
    "eos_token_id": [1, 106],
}
# Special token ids as the released config.json files have them (identical for all four).
_TOKEN_IDS = {
    "boi_token_id": 255_999,  # <|image>
    "eoi_token_id": 258_882,  # <image|>
    "image_token_id": 258_880,  # <|image|> soft-token placeholder
    "video_token_id": 258_884,
    "boa_token_id": 256_000,  # <|audio>
    "eoa_token_index": 258_883,  # <audio|> (transformers' field name)
    "eoa_token_id": 258_883,  # the same id under the name the conversion script also writes
    "audio_token_id": 258_881,  # <|audio|> soft-token placeholder
}
_SOFT_TOKENS_PER_IMAGE = 280


def _layer_types(sliding_per_full: int, repeats: int) -> list[str]:
    """`sliding_per_full` sliding layers then one full-attention layer, `repeats` times."""
    return ([SLIDING] * sliding_per_full + [FULL]) * repeats


# Per-model text configs (the conversion script's `_VARIANTS`). FFN width is 4 x hidden for the
# dense models; E2B doubles it on its KV-shared layers (use_double_wide_mlp).
_TEXT: dict[str, dict[str, Any]] = {
    "e2b": {
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "use_double_wide_mlp": True,
        "num_hidden_layers": 35,
        "layer_types": _layer_types(4, 7),
        "sliding_window": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 1,
        "num_global_key_value_heads": None,  # full layers keep 1 kv head
        "attention_k_eq_v": False,
        "use_bidirectional_attention": None,
        "num_kv_shared_layers": 20,
        "hidden_size_per_layer_input": 256,
        "max_position_embeddings": 131_072,
    },
    "e4b": {
        "hidden_size": 2560,
        "intermediate_size": 10_240,
        "num_hidden_layers": 42,
        "layer_types": _layer_types(5, 7),
        "sliding_window": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_global_key_value_heads": None,  # full layers keep 2 kv heads
        "attention_k_eq_v": False,
        "use_bidirectional_attention": None,
        "num_kv_shared_layers": 18,
        "hidden_size_per_layer_input": 256,
        "max_position_embeddings": 131_072,
    },
    "26b-a4b": {
        "hidden_size": 2816,
        "intermediate_size": 2112,  # the dense MLP, acting as a shared expert
        "enable_moe_block": True,
        "num_experts": 128,
        "top_k_experts": 8,
        "moe_intermediate_size": 704,
        "num_hidden_layers": 30,
        "layer_types": _layer_types(5, 5),
        "sliding_window": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 2,
        "attention_k_eq_v": True,  # full layers: no v_proj, V is the k_proj output
        "use_bidirectional_attention": "vision",
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "max_position_embeddings": 262_144,
    },
    "31b": {
        "hidden_size": 5376,
        "intermediate_size": 21_504,
        "num_hidden_layers": 60,
        "layer_types": _layer_types(5, 10),
        "sliding_window": 1024,
        "num_attention_heads": 32,
        "num_key_value_heads": 16,
        "num_global_key_value_heads": 4,
        "attention_k_eq_v": True,
        "use_bidirectional_attention": "vision",
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "max_position_embeddings": 262_144,
    },
}

# Vision towers: one for the on-device E-series, one for the two large models.
_VISION_ON_DEVICE = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "head_dim": 64,
    "global_head_dim": 64,
    "pooling_kernel_size": 3,
    "use_clipped_linears": True,
    "standardize": False,
    "default_output_length": _SOFT_TOKENS_PER_IMAGE,
}
_VISION_LARGE = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "head_dim": 72,
    "global_head_dim": 72,
    "pooling_kernel_size": 3,
    "use_clipped_linears": False,
    "standardize": True,
    "default_output_length": _SOFT_TOKENS_PER_IMAGE,
}
_VISION = {"e2b": _VISION_ON_DEVICE, "e4b": _VISION_ON_DEVICE, "26b-a4b": _VISION_LARGE, "31b": _VISION_LARGE}
_HAS_AUDIO = {"e2b": True, "e4b": True, "26b-a4b": False, "31b": False}


def _check_name(name: str) -> None:
    if name in GEMMA4_PRESET_NAMES:
        return
    close = difflib.get_close_matches(name, GEMMA4_PRESET_NAMES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown Gemma 4 preset {name!r}; valid names: {', '.join(GEMMA4_PRESET_NAMES)}.{hint}")


def gemma4_text_preset_config(name: str, *, num_hidden_layers: int | None = None) -> Gemma4TextConfig:
    """The language-model config of released Gemma 4 model `name` (one of GEMMA4_PRESET_NAMES).

    `num_hidden_layers` keeps only the first layers (each at its real shape; KV sharing as in the
    full model: a layer shares only if it does there), for one-GPU runs of the large models."""
    _check_name(name)
    # Copy the nested values: Gemma4TextConfig edits layer_types in place (last layer forced full).
    kwargs = {**_COMMON_TEXT, **_TEXT[name]}
    kwargs["layer_types"] = list(kwargs["layer_types"])
    if num_hidden_layers is not None:
        full = kwargs["num_hidden_layers"]
        if not 1 <= num_hidden_layers <= full:
            raise ValueError(f"preset {name!r} has {full} layers; keep between 1 and {full}, not {num_hidden_layers}")
        owning = full - kwargs["num_kv_shared_layers"]  # the first layers compute their own K/V
        kwargs["num_kv_shared_layers"] = max(0, num_hidden_layers - owning)
        kwargs["num_hidden_layers"] = num_hidden_layers
        kwargs["layer_types"] = kwargs["layer_types"][:num_hidden_layers]
    kwargs["rope_parameters"] = {k: dict(v) for k, v in _ROPE_PARAMETERS.items()}
    kwargs["eos_token_id"] = list(_COMMON_TEXT["eos_token_id"])
    return Gemma4TextConfig(**kwargs)


def gemma4_preset_config(
    name: str, *, text_only: bool = False, num_hidden_layers: int | None = None
) -> Gemma4Config | Gemma4TextConfig:
    """The config of released Gemma 4 model `name`: text + vision (+ audio for E2B/E4B).

    With `text_only=True`, the `Gemma4TextConfig` alone (for `Gemma4ForCausalLM`);
    `num_hidden_layers`: see `gemma4_text_preset_config`.
    Raises ValueError for a name not in GEMMA4_PRESET_NAMES.
    """
    text_config = gemma4_text_preset_config(name, num_hidden_layers=num_hidden_layers)
    if text_only:
        return text_config
    return Gemma4Config(
        text_config=text_config,
        vision_config=Gemma4VisionConfig(**_VISION[name]),
        audio_config=Gemma4AudioConfig() if _HAS_AUDIO[name] else None,
        vision_soft_tokens_per_image=_SOFT_TOKENS_PER_IMAGE,
        eos_token_id=list(_COMMON_TEXT["eos_token_id"]),
        tie_word_embeddings=True,
        **_TOKEN_IDS,
    )


def build_on_meta(config: Gemma4Config | Gemma4TextConfig) -> torch.nn.Module:
    """Instantiate the model for `config` on the meta device: real shapes, no storage.

    A `Gemma4Config` gives `Gemma4ForConditionalGeneration`, a `Gemma4TextConfig` gives
    `Gemma4ForCausalLM`. The result can be inspected (shapes, counts) but not run.
    """
    with torch.device("meta"):
        if isinstance(config, Gemma4Config):
            return Gemma4ForConditionalGeneration(config)
        if isinstance(config, Gemma4TextConfig):
            return Gemma4ForCausalLM(config)
    raise TypeError(f"expected Gemma4Config or Gemma4TextConfig, got {type(config).__name__}")


def _numel(modules: list[torch.nn.Module | None]) -> int:
    """Number of scalar parameters in `modules`, each parameter counted once (tied weights too)."""
    unique = {id(p): p for m in modules if m is not None for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def parameter_counts(model: Gemma4ForConditionalGeneration | Gemma4ForCausalLM) -> dict[str, int]:
    """Parameter counts (number of scalars, not bytes) of a Gemma 4 model, by component.

    Keys: total; text (the language model incl. its embeddings; lm_head is tied so adds nothing);
    embeddings (token embedding table); per_layer_embeddings (the per-layer-embedding table, 0
    without PLE); text_rest (text minus both tables); vision_tower and audio_tower (encoders alone);
    vision and audio (encoder plus its projection into the language model; 0 when absent).
    """
    if isinstance(model, Gemma4ForConditionalGeneration):
        text_model = model.model.language_model
        towers = {"vision": (model.model.vision_tower, model.model.embed_vision)}
        towers["audio"] = (model.model.audio_tower, model.model.embed_audio)
    else:
        text_model, towers = model.model, {"vision": (None, None), "audio": (None, None)}
    counts = {"total": _numel([model]), "text": _numel([text_model])}
    counts["embeddings"] = text_model.embed_tokens.weight.numel()
    has_ple = text_model.config.hidden_size_per_layer_input > 0
    counts["per_layer_embeddings"] = text_model.embed_tokens_per_layer.weight.numel() if has_ple else 0
    counts["text_rest"] = counts["text"] - counts["embeddings"] - counts["per_layer_embeddings"]
    for kind, (tower, embedder) in towers.items():
        counts[f"{kind}_tower"] = _numel([tower])
        counts[kind] = _numel([tower, embedder])
    return counts


@torch.no_grad()
def temper_random_init_attention(model: torch.nn.Module) -> int:
    """Scale each text attention layer's q-norm weights to 1/sqrt(head_dim); returns layers changed.

    Gemma 4 attention uses scaling 1.0 and relies on the learned q/k-norm scales. transformers
    initializes those scales to ones, so a random-init model's attention logits have a standard
    deviation of sqrt(head_dim) (16 on sliding layers, ~23 on full ones): attention is nearly
    one-hot, and rounding differences of one ulp flip which token a head attends to. Such a model
    is chaotic (measured on the E2B shape: fp32 KV-cache decoding vs a full forward differ by
    token_mult_prob_error 1.007, bf16 by 1.5-2.3), which says nothing about a trained model.
    Benchmarks that measure numerics on random-init presets call this first: it gives the usual
    1/sqrt(d) attention temperature and leaves every shape, and hence every timing, unchanged.
    """
    changed = 0
    for module in model.modules():
        q_norm = getattr(module, "q_norm", None)
        if isinstance(module, Gemma4TextAttention) and q_norm is not None:
            q_norm.weight.fill_(module.head_dim**-0.5)
            changed += 1
    return changed
