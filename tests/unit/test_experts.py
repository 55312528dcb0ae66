"""MoE experts under autocast compute in the autocast dtype, like the model's linear layers."""

from __future__ import annotations

import copy

import torch
from transformers import Gemma4ForCausalLM

from posttrain.models.experts import AUTOCAST_GROUPED_MM
from posttrain.models.tiny import tiny_gemma4_config


def _experts_and_inputs(implementation: str):
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="moe"))
    model.set_experts_implementation(implementation)
    experts = model.model.layers[0].experts
    gen = torch.Generator().manual_seed(1)
    tokens, top_k = 24, 2
    hidden = torch.randn(tokens, experts.down_proj.shape[1], generator=gen)
    index = torch.stack([torch.randperm(experts.num_experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    return experts, (hidden, index, weights)


def test_experts_under_autocast_equal_a_bf16_copy_and_train_fp32_weights():
    experts, inputs = _experts_and_inputs(AUTOCAST_GROUPED_MM)
    bf16_copy = copy.deepcopy(experts).to(torch.bfloat16)
    bf16_copy.config._experts_implementation = "grouped_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(*inputs)
    expected = bf16_copy(inputs[0].to(torch.bfloat16), *inputs[1:])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out.backward(grad_out)
    expected.backward(grad_out)
    for name, param in experts.named_parameters():
        assert param.grad.dtype == torch.float32, name
        torch.testing.assert_close(param.grad, dict(bf16_copy.named_parameters())[name].grad.float(), rtol=0, atol=0)


def test_transformers_grouped_mm_would_compute_in_fp32_and_without_autocast_nothing_changes():
    """The problem this fixes, and its boundary: fp32 runs take transformers' path unchanged."""
    ours, inputs = _experts_and_inputs(AUTOCAST_GROUPED_MM)
    theirs, _ = _experts_and_inputs("grouped_mm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert theirs(*inputs).dtype == torch.float32
    torch.testing.assert_close(ours(*inputs), theirs(*inputs), rtol=0, atol=0)
