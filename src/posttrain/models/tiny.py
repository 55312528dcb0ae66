"""Tiny random-init Gemma 4 models with locally trained tokenizers and an offline processor.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained with `tokenizers` on
text the caller supplies, the model is transformers' `Gemma4ForCausalLM` (or, multimodal,
`Gemma4ForConditionalGeneration`) built from a config. Both are saved as an ordinary Hugging Face
checkpoint directory so that the quickstart and the tests go through the same loading path
(`posttrain.models.load_policy`) as a real checkpoint.

Variants (`tiny_gemma4_config(variant=...)`), each a CPU-sized copy of one released model's
structure so that tests can check parity with transformers' own forward:

| variant | like | what it turns on |
|---|---|---|
| basic | (quickstart) | sliding/full alternating, one head size, no per-layer embeddings |
| dense | 31B | k_eq_v (full layers have no v_proj), 16/32 head dims, 2/1 kv heads, bidirectional vision |
| moe | 26B-A4B | dense's attention + 4 experts top-2 beside the ordinary MLP (shared expert) |
| e_series | E2B | per-layer embeddings, last 2 of 5 layers KV-shared, double-wide MLP there, 16/32 head dims |

All but basic use a sliding window of 8 tokens, so 20-30 token test sequences exceed it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

# Gemma's special-token layout: pad 0, eos 1, bos 2, unk 3, then the chat-turn markers.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
END_OF_TURN = "<turn|>"

# Gemma 4's multimodal markers, appended after SPECIAL_TOKENS (ids 6..12) by
# `train_tokenizer(multimodal=True)`, as named tokens (the attribute names are the ones
# transformers' Gemma4Processor reads from the tokenizer, as in the released tokenizer_config).
# The processor expands each `<|image|>` into `<|image>` + N x `<|image|>` + `<image|>`.
MULTIMODAL_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "video_token": "<|video|>",  # Gemma4Processor adds it to the vocabulary if it is missing
}
MULTIMODAL_TOKEN_IDS = {
    name: len(SPECIAL_TOKENS) + i for i, name in enumerate(MULTIMODAL_SPECIAL_TOKENS)
}  # image_token -> 6, boi_token -> 7, ...

# Gemma 4's chat format: <bos><|turn>user\n...<turn|>\n<|turn>model\n...<turn|>\n
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# The same format with content parts: string content renders exactly as above; in a list of
# parts, an image part renders as one `<|image|>` (audio `<|audio|>`, video `<|video|>`), as in
# Gemma 4's released template; the processor then expands the placeholder.
GEMMA4_MULTIMODAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'audio' %}<|audio|>"
    "{% elif part['type'] == 'video' %}<|video|>"
    "{% endif %}{% endfor %}{% endif %}"
    "<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)

# Tiny vision tower and image processor. transformers accepts max_soft_tokens only in
# {70, 140, 280, 560, 1120} (image_processing_pil_gemma4.py `_SUPPORTED_SOFT_TOKENS`), and with
# resizing on it scales every image up or down to about that many soft tokens. The tiny processor
# therefore does not resize: an image whose sides are multiples of PATCH_SIZE * POOLING_KERNEL_SIZE
# (12 px) gives (height / 12) * (width / 12) soft tokens (24x24 -> 4, 36x24 -> 6, 36x36 -> 9),
# zero-padded to MAX_SOFT_TOKENS * 9 = 630 patches in pixel_values.
PATCH_SIZE = 4
POOLING_KERNEL_SIZE = 3
MAX_SOFT_TOKENS = 70
IMAGE_SIDE_MULTIPLE = PATCH_SIZE * POOLING_KERNEL_SIZE

Variant = Literal["basic", "dense", "moe", "e_series"]
VARIANTS: tuple[str, ...] = get_args(Variant)

# Shapes shared by the non-basic variants: sliding layers 4 heads x 16 over 2 kv heads, full layers
# 4 heads x 32 (global_head_dim), hidden 32. Two sliding layers per full one (released: 4-5).
_VARIANT_SHAPE: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "sliding_window": 8,
}
_SLIDING_PER_FULL = 2
_VARIANT_FEATURES: dict[str, dict[str, Any]] = {
    "dense": {  # 31B: k_eq_v, fewer kv heads on full layers, bidirectional attention over images
        "num_hidden_layers": 6,
        "attention_k_eq_v": True,
        "num_global_key_value_heads": 1,
        "use_bidirectional_attention": "vision",
    },
    "moe": {  # 26B-A4B: dense's attention, experts beside the ordinary MLP (the shared expert)
        "num_hidden_layers": 3,
        "attention_k_eq_v": True,
        "num_global_key_value_heads": 1,
        "use_bidirectional_attention": "vision",
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 8,
    },
    "e_series": {  # E2B: per-layer embeddings, KV sharing, double-wide MLP on the shared layers
        "num_hidden_layers": 5,
        "num_key_value_heads": 1,
        "num_kv_shared_layers": 2,
        "hidden_size_per_layer_input": 8,
        "use_double_wide_mlp": True,
    },
}
# Gemma4TextConfig silently stores unknown keyword arguments; overrides are checked against these.
_TEXT_CONFIG_KEYS = {f.name for f in dataclasses.fields(Gemma4TextConfig)} | {
    "global_head_dim",  # init-only: head_dim of full-attention layers (default 512)
    "num_global_key_value_heads",  # init-only: kv heads of full-attention layers (only with k_eq_v)
}


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int = 256, *, multimodal: bool = False
) -> PreTrainedTokenizerFast:
    """Train a small BPE tokenizer with Gemma 4's special tokens and chat template.

    Digits are split one per token so that arithmetic answers have a regular token structure.
    `multimodal=True` adds Gemma 4's image/audio/video markers (ids 6-12, `MULTIMODAL_TOKEN_IDS`)
    as named special tokens (`tokenizer.image_token`, `.boi_token`, ...) and a chat template that
    renders image parts; the text-only tokenizer is unchanged by this option.
    """
    special_tokens = SPECIAL_TOKENS + (list(MULTIMODAL_SPECIAL_TOKENS.values()) if multimodal else [])
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if multimodal:
        # Named tokens, not a list: Gemma4Processor.__init__ replaces the tokenizer's list of extra
        # special tokens with ["<|video|>"] (add_special_tokens with replace_extra_special_tokens=True).
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            **special,
            extra_special_tokens={"sot_token": "<|turn>", "eot_token": END_OF_TURN, **MULTIMODAL_SPECIAL_TOKENS},
            padding_side="left",
        )
        wrapped.chat_template = GEMMA4_MULTIMODAL_CHAT_TEMPLATE
        return wrapped
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **special, additional_special_tokens=["<|turn>", END_OF_TURN], padding_side="left"
    )
    wrapped.chat_template = GEMMA4_CHAT_TEMPLATE
    return wrapped


def _layer_types(num_hidden_layers: int, sliding_per_full: int) -> list[str]:
    """`sliding_per_full` sliding layers then one full, repeated; the last layer is always full."""
    period = sliding_per_full + 1
    layer_types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(num_hidden_layers)]
    layer_types[-1] = "full_attention"
    return layer_types


def _check_kv_sharing(kwargs: dict[str, Any]) -> None:
    """Gemma 4 needs every layer type among the non-shared layers (shared layers reuse their K/V)."""
    shared = kwargs.get("num_kv_shared_layers", 0)
    layer_types = kwargs["layer_types"]
    if shared and set(layer_types[: len(layer_types) - shared]) != set(layer_types):
        raise ValueError(
            f"num_kv_shared_layers={shared} leaves no producer for some layer type: the first "
            f"{len(layer_types) - shared} of {layer_types} must contain every type"
        )


def tiny_gemma4_config(
    vocab_size: int,
    *,
    variant: Variant = "basic",
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    intermediate_size: int | None = None,
    sliding_window: int | None = None,
    eos_token_ids: list[int] | None = None,
    **text_overrides: Any,
) -> Gemma4TextConfig:
    """A Gemma 4 text config small enough for CPU, keeping the family's structure.

    basic: sliding and full attention layers alternate (the last one is full, as Gemma 4
    requires), final logit softcapping is on (30.0, as in every released model), embeddings are
    tied. `global_head_dim` is set to `head_dim` explicitly: Gemma 4 defaults full-attention
    layers to 512-wide heads. Per-layer embeddings are disabled (0). Defaults: hidden 64, 2 layers,
    2 heads, 1 kv head, head_dim 32, intermediate 128, window 64.

    dense / moe / e_series: see the module docstring; a keyword left at None takes the variant's
    value, `head_dim` is the sliding layers' head size (full layers: `global_head_dim`), and
    `text_overrides` are any other `Gemma4TextConfig` fields (checked; a typo raises).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    unknown = sorted(set(text_overrides) - _TEXT_CONFIG_KEYS)
    if unknown:
        raise TypeError(f"not Gemma4TextConfig fields: {unknown}")
    given = {
        key: value
        for key, value in {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "head_dim": head_dim,
            "intermediate_size": intermediate_size,
            "sliding_window": sliding_window,
        }.items()
        if value is not None
    }
    common = {
        "vocab_size": vocab_size,
        "max_position_embeddings": 1024,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": vocab_size,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": eos_token_ids if eos_token_ids is not None else [1],
    }
    if variant == "basic":
        shape = {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "intermediate_size": 128,
            "sliding_window": 64,
            **given,
        }
        shape["global_head_dim"] = shape["head_dim"]
        shape["layer_types"] = _layer_types(shape["num_hidden_layers"], sliding_per_full=1)
    else:
        shape = {**_VARIANT_SHAPE, **_VARIANT_FEATURES[variant], **given}
        shape["layer_types"] = _layer_types(shape["num_hidden_layers"], _SLIDING_PER_FULL)
    kwargs = {**common, **shape, **text_overrides}
    _check_kv_sharing(kwargs)
    return Gemma4TextConfig(**kwargs)


def tiny_gemma4_multimodal_config(text_config: Gemma4TextConfig, *, audio: bool = True) -> Gemma4Config:
    """A `Gemma4Config` around `text_config` with a tiny vision tower and (optionally) audio tower.

    Vision: 2 layers, hidden 32, 2 heads x 16, patch 4, pooling 3x3 (as released), so one soft
    token per 12x12 pixels; clipped linears (E-series) and standardization (26B/31B) both on, so
    both sets of buffers are in the checkpoint (identity at init). Audio: 1 conformer layer,
    hidden 32 (built and saved, never fed audio here). Placeholder ids are `MULTIMODAL_TOKEN_IDS`,
    the ids `train_tokenizer(multimodal=True)` gives.
    """
    vision_config = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=PATCH_SIZE,
        pooling_kernel_size=POOLING_KERNEL_SIZE,
        position_embedding_size=128,  # patch coordinates up to 127: images up to 512 px a side
        use_clipped_linears=True,
        standardize=True,
    )
    audio_config = (
        Gemma4AudioConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            subsampling_conv_channels=[8, 4],
            output_proj_dims=32,
        )
        if audio
        else None
    )
    ids = MULTIMODAL_TOKEN_IDS
    return Gemma4Config(
        text_config=text_config,
        vision_config=vision_config,
        audio_config=audio_config,
        image_token_id=ids["image_token"],
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        video_token_id=ids["video_token"],
        audio_token_id=ids["audio_token"],
        boa_token_id=ids["boa_token"],
        # The declared field is `eoa_token_index`; transformers' conversion script sets
        # `eoa_token_id`, which Gemma4Config stores as an extra attribute. Set both, equal.
        eoa_token_index=ids["eoa_token"],
        eoa_token_id=ids["eoa_token"],
    )


def build_tiny_processor(
    tokenizer: PreTrainedTokenizerBase,
    *,
    resize: bool = False,
    patch_size: int = PATCH_SIZE,
    max_soft_tokens: int = MAX_SOFT_TOKENS,
) -> ProcessorMixin:
    """Gemma 4's processor for the tiny multimodal model, built offline (Pillow image processor).

    `tokenizer` must come from `train_tokenizer(multimodal=True)`; it is copied, because
    Gemma4Processor rewrites its tokenizer's extra special tokens. Without `resize`, an image's
    sides must be multiples of IMAGE_SIDE_MULTIPLE (12 px) and it gives (h/12)*(w/12) soft tokens;
    with `resize`, any image is scaled to about `max_soft_tokens` (70) soft tokens, as released.
    `patch_size` / `max_soft_tokens`: a preset's vision tower instead (16 / 280 as released;
    benchmarks/dapo_step.py --images).
    """
    # Imported here: on transformers 5.17 Gemma 4's image-processing module needs torchvision.
    from transformers import Gemma4ImageProcessorPil
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    from posttrain.models.gemma4_processor import Gemma4ProcessorWithoutVideo

    missing = [name for name in MULTIMODAL_SPECIAL_TOKENS if getattr(tokenizer, name, None) is None]
    if missing:
        raise ValueError(f"the tokenizer has no {missing}; train it with train_tokenizer(..., multimodal=True)")
    image_processor = Gemma4ImageProcessorPil(
        patch_size=patch_size,
        max_soft_tokens=max_soft_tokens,
        pooling_kernel_size=POOLING_KERNEL_SIZE,
        do_resize=resize,
    )
    tokenizer = copy.deepcopy(tokenizer)
    return Gemma4ProcessorWithoutVideo(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
        image_seq_length=max_soft_tokens,
    )


def save_tiny_gemma4(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int,
    variant: Variant = "basic",
    multimodal: bool = False,
    audio: bool = True,
    **config_overrides,
) -> Path:
    """Build a random-init tiny Gemma 4 and save it with its tokenizer (safetensors).

    Text-only: a `Gemma4ForCausalLM`. `multimodal=True`: a `Gemma4ForConditionalGeneration`
    (vision tower, audio tower unless `audio=False`) plus the processor files (load them with
    `posttrain.models.loading.load_processor`); the tokenizer must come from `train_tokenizer(multimodal=True)`.
    `config_overrides` go to `tiny_gemma4_config`.
    """
    out_dir = Path(out_dir)
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    config = tiny_gemma4_config(len(tokenizer), variant=variant, eos_token_ids=eos_ids, **config_overrides)
    if not multimodal:
        torch.manual_seed(seed)
        model = Gemma4ForCausalLM(config)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        return out_dir

    processor = build_tiny_processor(tokenizer)
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in MULTIMODAL_SPECIAL_TOKENS.items()}
    if token_ids != MULTIMODAL_TOKEN_IDS:
        raise ValueError(f"multimodal token ids {token_ids} differ from the config's {MULTIMODAL_TOKEN_IDS}")
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(config, audio=audio))
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def save_random_preset(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    preset: str,
    *,
    seed: int,
    multimodal: bool = False,
    num_hidden_layers: int | None = None,
    device: torch.device | str = "cpu",
) -> Path:
    """A random-init Gemma 4 at a released model's shape (`gemma4_presets`, optionally only its
    first `num_hidden_layers`), with attention tempered (`temper_random_init_attention`), saved in
    bf16 beside the locally trained tokenizer: for GPU runs at the real shape without the weights.
    The tokenizer's special ids replace the released ones; `multimodal` adds the vision (and
    audio) towers and a processor sized for the preset's vision tower (the tokenizer must come
    from `train_tokenizer(multimodal=True)`)."""
    from posttrain.models.gemma4_presets import gemma4_preset_config, temper_random_init_attention  # noqa: PLC0415 (heavy, rarely needed)

    out_dir = Path(out_dir)
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    config = gemma4_preset_config(preset, text_only=not multimodal, num_hidden_layers=num_hidden_layers)
    text = config.get_text_config()
    for target in {id(config): config, id(text): text}.values():
        target.eos_token_id, target.pad_token_id, target.bos_token_id = eos_ids, tokenizer.pad_token_id, tokenizer.bos_token_id
    if multimodal:  # the locally trained tokenizer's placeholder ids
        ids = MULTIMODAL_TOKEN_IDS
        config.image_token_id, config.boi_token_id, config.eoi_token_id = ids["image_token"], ids["boi_token"], ids["eoi_token"]
        config.video_token_id, config.audio_token_id, config.boa_token_id = ids["video_token"], ids["audio_token"], ids["boa_token"]
        config.eoa_token_index = config.eoa_token_id = ids["eoa_token"]
    torch.manual_seed(seed)
    with torch.device(device):
        model = (Gemma4ForConditionalGeneration if multimodal else Gemma4ForCausalLM)(config)
    temper_random_init_attention(model)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if multimodal:
        vision = config.vision_config
        processor = build_tiny_processor(
            tokenizer, resize=True, patch_size=vision.patch_size, max_soft_tokens=config.vision_soft_tokens_per_image
        )
        processor.save_pretrained(out_dir)
    return out_dir
