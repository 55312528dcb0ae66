"""Any model transformers supports: causal LMs (Qwen3, Llama, ...) with AutoModelForCausalLM, and
vision-language models (a config with a `vision_config`: Qwen2.5-VL, ...) with
AutoModelForImageTextToText, as they are.

No key rules; logprobs come from the model's own forward, so whatever its head does (softcapping,
logit scaling) is included. For vision-language models, what is read off the config or the model
rather than written per family:
- towers: the usual module prefixes of transformers' VLMs (`model.visual.` in the Qwen-VL
  families, `model.vision_tower.` + `model.multi_modal_projector.` in LLaVA-style ones);
- placeholder ids: the config's `image_token_id` / `video_token_id`;
- mm_token_type_ids (0 text, 1 image, 2 video), derived from the placeholders;
- positions: a model with `get_rope_index` (the Qwen-VL families' multimodal rotary positions,
  [3, B, T]: images on a grid, text after them) gets them from it whenever the rows hold images;
- the processor: AutoProcessor, or without torchvision the same class with no video processor
  (`processor_without_video.py`).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig, ProcessorMixin

from posttrain.models.family import ModelFamily


def is_vision_language(config: PretrainedConfig) -> bool:
    return getattr(config, "vision_config", None) is not None


def mm_token_type_ids(config: PretrainedConfig, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video: transformers' convention for where the processor put soft tokens."""
    types_BT = torch.zeros_like(input_ids_BT)
    for type_id, attr in ((1, "image_token_id"), (2, "video_token_id")):
        token_id = getattr(config, attr, None)
        if token_id is not None:
            types_BT = types_BT.masked_fill(input_ids_BT == token_id, type_id)
    return types_BT


def position_ids(model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The model's own multimodal rotary positions when the rows hold images and it has
    `get_rope_index` (Qwen-VL); else positions counting the real tokens (as for any causal LM)."""
    rope_index = getattr(model.base_model, "get_rope_index", None)
    if rope_index is None or inputs.get("image_grid_thw") is None:
        return (attention_mask_BT.long().cumsum(dim=-1) - 1).clamp(min=0)
    wanted = inspect.signature(rope_index).parameters  # transformers 5.17 takes no mm_token_type_ids
    options = {"image_grid_thw": inputs["image_grid_thw"], "attention_mask": attention_mask_BT}
    if "mm_token_type_ids" in wanted:
        options["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    positions, _ = rope_index(input_ids_BT, **options)
    return positions


def _load_processor(path: Path) -> ProcessorMixin:
    from posttrain.models.processor_without_video import load_processor_without_video  # see its docstring

    return load_processor_without_video(path)


GENERIC = ModelFamily(
    name="generic",
    text_model_class=lambda config: AutoModelForCausalLM,
    multimodal_model_class=lambda config: AutoModelForImageTextToText,
    multimodal_config=is_vision_language,
    towers={
        "vision_tower": ("model.visual.", "model.vision_tower.", "model.multi_modal_projector."),
        "language_model": ("model.language_model.", "lm_head."),
    },
    placeholder_token_attrs=("image_token_id", "video_token_id"),
    mm_token_type_ids=mm_token_type_ids,
    multimodal_input_names=(
        "pixel_values",
        "image_grid_thw",
        "image_sizes",
        "mm_token_type_ids",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
    ),
    position_ids=position_ids,
    load_processor=_load_processor,
)
