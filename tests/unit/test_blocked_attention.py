"""Blocked-GEMM causal attention (models/blocked_attention.py), used for heads too wide for fused
kernels: exact gradients in float64, and values and gradients equal to SDPA's in fp32, with
grouped KV heads, sliding windows, and lengths that are not a multiple of the block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.models.blocked_attention import blocked_causal_attention

pytestmark = pytest.mark.unit


def _qkv(heads: int, kv_heads: int, length: int, dim: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(h, length, dim, generator=gen, dtype=dtype).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]


def _reference(q, k, v, scale, window):
    length = q.shape[1]
    positions = torch.arange(length)
    distance = positions[:, None] - positions[None, :]
    mask = (distance >= 0) & (distance < window) if window else distance >= 0
    return F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True
    )[0]


@pytest.mark.parametrize(("window", "block"), [(None, 4), (5, 3), (None, 64), (3, 7)])
def test_gradients_are_exact_in_float64(window, block):
    q, k, v = _qkv(4, 2, 11, 6, dtype=torch.float64)
    fn = lambda q, k, v: blocked_causal_attention(q, k, v, scale=0.3, window=window, block=block)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize(("window", "block"), [(None, 16), (None, 1000), (12, 16), (40, 7)])
def test_equals_sdpa_values_and_gradients(heads, kv_heads, window, block):
    q, k, v = _qkv(heads, kv_heads, 53, 32)
    grad_out = torch.randn(heads, 53, 32, generator=torch.Generator().manual_seed(1))
    got = blocked_causal_attention(q, k, v, scale=1.0, window=window, block=block)
    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    expected = _reference(q, k, v, 1.0, window)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for name, g, e in zip("qkv", got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4, msg=name)
