"""Any causal LM transformers supports (Qwen3, Llama, ...): loaded with AutoModelForCausalLM as is.

No key rules, no towers, no special inputs; logprobs come from the model's own forward, so
whatever its head does (softcapping, logit scaling) is included.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from posttrain.models.family import ModelFamily

GENERIC = ModelFamily(
    name="generic",
    text_model_class=lambda config: AutoModelForCausalLM,
    multimodal_model_class=None,
)
