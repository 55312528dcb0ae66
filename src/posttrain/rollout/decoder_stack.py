"""A causal LM's text decoder, run layer by layer over a slot cache.

The engine needs three things transformers' model-level forward does not give it: its own cache
(`SlotKVCache`), its own masks (from slot positions, without host syncs, so decode steps can be
captured in a CUDA graph) and the hidden state of one position per row. Everything inside a
decoder layer stays transformers' code: the engine calls each layer with the cache and masks, and
the registered `slot_attention` reads them.

`DecoderStack` covers transformers' Llama-style families (embed_tokens, layers, norm,
rotary_emb); `Gemma4DecoderStack` adds Gemma 4's per-layer embeddings, per-layer-type rotary
embeddings, KV sharing, final-logit softcapping, images in the prompt and the bidirectional
attention over image soft tokens that the large Gemma 4 models use.
"""

from __future__ import annotations

import inspect

import torch

from posttrain.models.family import final_logit_softcap, softcap_logits
from posttrain.rollout.base import MultimodalPrompt
from posttrain.rollout.slot_attention import bidirectional_blocks
from posttrain.rollout.slot_cache import LayerCacheSpec


def keep_positions(
    keep_B: torch.Tensor,
    hidden_BTH: torch.Tensor,
    per_layer_BTLD: torch.Tensor | None,
    positions_BT: torch.Tensor,
    masks: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor]]:
    """The inputs of one position per row (keep_B[b]), as width-1 sequences; masks [B, 1, T, K]
    keep that query's row."""
    rows_B = torch.arange(len(keep_B), device=keep_B.device)
    per_layer = per_layer_BTLD[rows_B, keep_B].unsqueeze(1) if per_layer_BTLD is not None else None
    kept_masks = {t: m[rows_B, :, keep_B].unsqueeze(2) for t, m in masks.items()}
    return hidden_BTH[rows_B, keep_B].unsqueeze(1), per_layer, positions_BT[rows_B, keep_B].unsqueeze(1), kept_masks


def layer_cache_keyword(layer: torch.nn.Module) -> str:
    """transformers 5.24 renamed decoder layers' `past_key_values` argument to `cache`."""
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


class DecoderStack:
    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.config = model.config.get_text_config()
        self.text_model = self._text_model(model)
        self.layers = list(self.text_model.layers[: self.config.num_hidden_layers])
        self.layer_types = list(getattr(self.config, "layer_types", None) or ["full_attention"] * len(self.layers))
        self.lm_head = model.get_output_embeddings()
        self.softcap = final_logit_softcap(model.config)
        self.cache_keyword = layer_cache_keyword(self.layers[0])
        shared = [i for i, layer in enumerate(self.layers) if getattr(layer.self_attn, "is_kv_shared_layer", False)]
        self.first_shared_layer = shared[0] if shared else None

    @staticmethod
    def _text_model(model: torch.nn.Module) -> torch.nn.Module:
        return model.base_model

    def has_dynamic_shapes(self) -> bool:
        """Whether a decode step's shapes depend on the data (mixture-of-experts routing)."""
        return bool(getattr(self.config, "enable_moe_block", False) or getattr(self.config, "num_experts", None))

    def window(self, layer_type: str) -> int | None:
        return self.config.sliding_window if layer_type == "sliding_attention" else None

    def cache_specs(self) -> list[LayerCacheSpec]:
        specs = []
        for layer, layer_type in zip(self.layers, self.layer_types, strict=True):
            attention = layer.self_attn
            shared = bool(getattr(attention, "is_kv_shared_layer", False))
            kv_heads = 0 if shared else attention.k_proj.out_features // attention.head_dim
            specs.append(LayerCacheSpec(layer_type, kv_heads, attention.head_dim, self.window(layer_type), not shared))
        return specs

    def embed(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_BTH, per-layer inputs or None) for text tokens."""
        return self.text_model.embed_tokens(ids_BT), None

    def embed_prompts(
        self, ids_BT: torch.Tensor, multimodal: list[MultimodalPrompt | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(hidden_BTH, per-layer inputs, bidirectional block ids or None) for prompts."""
        if multimodal is not None and any(m is not None for m in multimodal):
            raise ValueError(f"{type(self.model).__name__}: this engine has no image path for this model family")
        return *self.embed(ids_BT), None

    def rotary(self, hidden_BTH: torch.Tensor, positions_BT: torch.Tensor) -> dict[str, tuple]:
        cos_sin = self.text_model.rotary_emb(hidden_BTH, positions_BT)
        return {layer_type: cos_sin for layer_type in set(self.layer_types)}

    def layer_inputs(self, index: int, per_layer_BTLD: torch.Tensor | None, shared_kv: dict) -> dict:
        return {}

    def forward(
        self,
        hidden_BTH: torch.Tensor,
        per_layer_BTLD: torch.Tensor | None,
        positions_BT: torch.Tensor,
        masks: dict[str, torch.Tensor],
        cache,
        keep_B: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states of every position, or [B, 1, H] of position keep_B[b] only.

        With keep_B (a prefill), the KV-shared layers run on the kept positions alone: they write
        no cache, so nothing else of theirs is ever read (transformers' generate does the same)."""
        rotary = self.rotary(hidden_BTH, positions_BT)
        shared_kv: dict = {}
        for index, (layer, layer_type) in enumerate(zip(self.layers, self.layer_types, strict=True)):
            if keep_B is not None and index == self.first_shared_layer:
                hidden_BTH, per_layer_BTLD, positions_BT, masks = keep_positions(
                    keep_B, hidden_BTH, per_layer_BTLD, positions_BT, masks
                )
                rotary, keep_B = self.rotary(hidden_BTH, positions_BT), None
            out = layer(
                hidden_BTH,
                attention_mask=masks[layer_type],
                position_ids=positions_BT,
                position_embeddings=rotary[layer_type],
                **{self.cache_keyword: cache},
                **self.layer_inputs(index, per_layer_BTLD, shared_kv),
            )
            hidden_BTH = out[0] if isinstance(out, tuple) else out
        if keep_B is not None:
            hidden_BTH = keep_positions(keep_B, hidden_BTH, None, positions_BT, {})[0]
        return self.text_model.norm(hidden_BTH)

    def logits(self, hidden_BH: torch.Tensor) -> torch.Tensor:
        """fp32 logits (softcapped where the family caps them), before temperature."""
        return softcap_logits(self.lm_head(hidden_BH).float(), self.softcap)


class Gemma4DecoderStack(DecoderStack):
    @staticmethod
    def _text_model(model: torch.nn.Module) -> torch.nn.Module:
        base = model.base_model
        return getattr(base, "language_model", base)

    def embed(self, ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_BTH = self.text_model.embed_tokens(ids_BT)
        if not self.config.hidden_size_per_layer_input:
            return hidden_BTH, None
        token_part = self.text_model.get_per_layer_inputs(ids_BT, hidden_BTH)
        return hidden_BTH, self.text_model.project_per_layer_inputs(hidden_BTH, token_part)

    def embed_prompts(
        self, ids_BT: torch.Tensor, multimodal: list[MultimodalPrompt | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """As transformers' Gemma4Model: placeholders embed as padding for the token-identity part
        of the per-layer embeddings, the vision tower's soft tokens replace the placeholders
        (once per prompt), and the context part of the per-layer embeddings sees the merged
        embeddings."""
        images = [m for m in multimodal or [] if m is not None]
        if not images:
            return *self.embed(ids_BT), None
        outer, config = self.model.base_model, self.model.config
        image_BT = ids_BT == config.image_token_id
        llm_ids_BT = ids_BT.masked_fill(image_BT, config.text_config.pad_token_id)
        hidden_BTH = self.text_model.embed_tokens(llm_ids_BT)
        weight = next(outer.vision_tower.parameters())
        features = outer.get_image_features(
            torch.cat([m["pixel_values"] for m in images]).to(weight.device, weight.dtype),
            torch.cat([m["image_position_ids"] for m in images]).to(weight.device),
            return_dict=True,
        ).pooler_output
        features = torch.cat(list(features)).to(hidden_BTH.dtype)
        if features.shape[0] != int(image_BT.sum()):
            raise ValueError(f"{features.shape[0]} image soft tokens for {int(image_BT.sum())} placeholders")
        hidden_BTH = hidden_BTH.masked_scatter(image_BT.unsqueeze(-1), features)
        per_layer_BTLD = None
        if self.config.hidden_size_per_layer_input:
            token_part = self.text_model.get_per_layer_inputs(llm_ids_BT, hidden_BTH)
            per_layer_BTLD = self.text_model.project_per_layer_inputs(hidden_BTH, token_part)
        blocks_BT = None
        if getattr(self.config, "use_bidirectional_attention", None) == "vision":
            blocks_BT = bidirectional_blocks(image_BT)
        return hidden_BTH, per_layer_BTLD, blocks_BT

    def rotary(self, hidden_BTH: torch.Tensor, positions_BT: torch.Tensor) -> dict[str, tuple]:
        return {t: self.text_model.rotary_emb(hidden_BTH, positions_BT, t) for t in set(self.layer_types)}

    def layer_inputs(self, index: int, per_layer_BTLD: torch.Tensor | None, shared_kv: dict) -> dict:
        per_layer_input = per_layer_BTLD[:, :, index] if per_layer_BTLD is not None else None
        return {"per_layer_input": per_layer_input, "shared_kv_states": shared_kv}


def decoder_stack(model: torch.nn.Module) -> DecoderStack:
    if model.config.model_type in ("gemma4", "gemma4_text"):
        return Gemma4DecoderStack(model)
    return DecoderStack(model)
