"""Mixture-of-experts layers as grouped GEMMs in the autocast dtype.

transformers' `grouped_mm` experts cast the tokens to the expert weights' dtype. With posttrain's
fp32 master weights under bf16 autocast that is fp32: torch's grouped GEMM has no fp32 kernel, so
the experts ran as a per-expert loop of fp32 GEMMs (under torch.compile) or fp32 grouped GEMMs
(eager), both far from bf16 speed, while the rest of the model computes in bf16. Measured on the
26B-A4B preset cut to 6 layers (one H200, compiled layers): fp32 SIMT GEMMs took about 1.6 s of a
3.4 s step. Here the experts see their weights cast to the autocast dtype, as autocast casts a
linear layer's weight; without autocast (fp32 runs, FSDP2's bf16 gathers) nothing changes.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface, grouped_mm_experts_forward

AUTOCAST_GROUPED_MM = "posttrain_autocast_grouped_mm"


class _WeightsInDtype:
    """An experts module as `grouped_mm_experts_forward` reads it, its floating-point parameters
    cast to `dtype` (a differentiable cast: gradients reach the fp32 parameters)."""

    def __init__(self, experts: torch.nn.Module, dtype: torch.dtype):
        self._experts, self._dtype = experts, dtype

    def __getattr__(self, name: str):
        value = getattr(self._experts, name)
        if isinstance(value, torch.nn.Parameter) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def autocast_grouped_mm_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    device_type = hidden_states.device.type
    if not torch.is_autocast_enabled(device_type):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    dtype = torch.get_autocast_dtype(device_type)
    return grouped_mm_experts_forward(_WeightsInDtype(self, dtype), hidden_states.to(dtype), top_k_index, top_k_weights)


ExpertsInterface.register(AUTOCAST_GROUPED_MM, autocast_grouped_mm_experts_forward)
