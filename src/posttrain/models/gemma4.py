"""Gemma 4: every quirk posttrain handles for this family, in one place.

- Multimodal checkpoints (`Gemma4ForConditionalGeneration`, model_type gemma4) keep the language
  model under `model.language_model.*`. transformers' `Gemma4ForCausalLM.from_pretrained` on such
  a checkpoint silently re-initializes the language model; a text-only load here renames those
  keys to `model.*` and drops the vision/audio towers explicitly, so nothing is ever random.
- KV-shared layers (E-series) have no k/v projections of their own; transformers ignores the
  unused projections a released checkpoint may still carry (`_keys_to_ignore_on_load_unexpected`).
- `mm_token_type_ids` (0 text, 1 image, 2 video, 3 audio) must reach the multimodal forward: for
  configs with bidirectional vision attention (26B-A4B, 31B), omitting it silently switches image
  tokens to causal attention. When a caller leaves it out, posttrain derives it from the
  placeholder ids in input_ids, as the processor does (zeros for text-only rows).
- Final-logit softcapping (cap 30): lm_head -> cap * tanh(x / cap) -> temperature -> log_softmax,
  applied by `posttrain.models.logprobs` from the backbone's hidden states.
- Image/video/audio placeholder tokens are never generated: the multimodal forward would treat a
  sampled one as a slot for an image that does not exist.
- The processor cannot be built by transformers without torchvision; `gemma4_processor.py` holds
  the workaround (a separate module so that nothing imports Gemma 4 image processing eagerly).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration, PretrainedConfig, ProcessorMixin

from posttrain.models.family import KeyRule, ModelFamily


def mm_token_type_ids(config: PretrainedConfig, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video, 3 audio: where the processor put each modality's soft tokens."""
    types_BT = torch.zeros_like(input_ids_BT)
    for type_id, token_id in ((1, config.image_token_id), (2, config.video_token_id), (3, config.audio_token_id)):
        if token_id is not None:
            types_BT = types_BT.masked_fill(input_ids_BT == token_id, type_id)
    return types_BT


def _load_processor(path: Path) -> ProcessorMixin:
    from posttrain.models.gemma4_processor import load_gemma4_processor  # see gemma4_processor.py

    return load_gemma4_processor(path)


GEMMA4 = ModelFamily(
    name="gemma4",
    text_model_class=lambda config: Gemma4ForCausalLM,
    multimodal_model_class=lambda config: Gemma4ForConditionalGeneration,
    multimodal_model_types=("gemma4",),
    text_only_key_rules=(KeyRule(r"model\.language_model\.", "model."),),
    text_only_dropped_keys=(r"model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.",),
    towers={
        "vision_tower": ("model.vision_tower.", "model.embed_vision."),
        "audio_tower": ("model.audio_tower.", "model.embed_audio."),
        "language_model": ("model.language_model.", "lm_head."),
    },
    placeholder_token_attrs=("image_token_id", "video_token_id", "audio_token_id"),
    mm_token_type_ids=mm_token_type_ids,
    head_from_hidden_states=True,
    multimodal_input_names=(
        "pixel_values",
        "image_position_ids",
        "mm_token_type_ids",
        "pixel_values_videos",
        "video_position_ids",
        "num_frames_per_video",
        "input_features",
        "input_features_mask",
    ),
    load_processor=_load_processor,
    continuous_engine_images=True,
)
