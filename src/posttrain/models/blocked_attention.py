"""Causal (optionally windowed) attention of one sequence as blocked GEMMs, for heads too wide for
fused kernels.

Gemma 4's global layers have 512-wide heads: flash attention and cuDNN take at most 256, flex
attention's tiles do not fit in shared memory, and SDPA's memory-efficient kernel reaches about
20 TFLOP/s on them (`benchmarks/attention_kernels.py`). Plain GEMMs run an order of magnitude
faster at that width. Queries go in blocks of `block` rows; each block multiplies only the keys it
can see (up to its last row, from its first row's window start), so the causal waste is one
block's triangle and a block's scores take heads x block x keys fp32.

Forward, per block: S = scale * q k^T (fp32), causal/window mask, P = softmax(S), O = P v.
Backward recomputes S and P per block (nothing quadratic is saved):
    dV += P^T dO,  dP = dO v^T,  dS = P * (dP - rowsum(dP * P)),  dQ = scale dS k,  dK += scale dS^T q
Scores and their gradient accumulate in fp32 whatever the input dtype (bf16 GEMMs writing fp32 on
CUDA); P and dS are rounded to the input dtype for the GEMMs that consume them, as fused kernels do.
Grouped KV heads are handled by laying each KV head's query heads out as rows (no copies).
"""

from __future__ import annotations

import torch

from posttrain.models.chunked_logprobs import accumulate_dtype

DEFAULT_BLOCK = 1024


def _matmul_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (bf16 inputs stay bf16 on CUDA; fp64 stays fp64)."""
    if a.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    dtype = accumulate_dtype(a.dtype)
    return torch.bmm(a.to(dtype), b.to(dtype))


def _visible(rows_G: int, q_start: int, q_stop: int, k_start: int, k_stop: int, window: int | None, device) -> torch.Tensor:
    """[G * block, keys] mask: query position q sees key position k when k <= q (and q - k < window)."""
    q = torch.arange(q_start, q_stop, device=device).repeat(rows_G)[:, None]
    k = torch.arange(k_start, k_stop, device=device)[None, :]
    visible = k <= q
    return visible & (q - k < window) if window else visible


def _key_range(q_start: int, q_stop: int, window: int | None) -> tuple[int, int]:
    return (max(0, q_start - window + 1) if window else 0), q_stop


def _scores(q_KGbD, k_KTD, q_start, q_stop, k_start, k_stop, window, scale):
    """P [KV, G*b, keys] fp32 of one query block against its keys."""
    kv_heads, groups, block, dim = q_KGbD.shape
    rows = q_KGbD.reshape(kv_heads, groups * block, dim)
    s = _matmul_fp32(rows, k_KTD[:, k_start:k_stop].transpose(1, 2)) * scale
    s = s.masked_fill(~_visible(groups, q_start, q_stop, k_start, k_stop, window, s.device), float("-inf"))
    return torch.softmax(s, dim=-1)


class BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_HTD, k_KTD, v_KTD, window, scale, block):
        heads, length, dim = q_HTD.shape
        kv_heads = k_KTD.shape[0]
        q_KGTD = q_HTD.view(kv_heads, heads // kv_heads, length, dim)
        out_KGTD = torch.empty_like(q_KGTD)
        for q_start in range(0, length, block):
            q_stop = min(q_start + block, length)
            k_start, k_stop = _key_range(q_start, q_stop, window)
            p = _scores(q_KGTD[:, :, q_start:q_stop], k_KTD, q_start, q_stop, k_start, k_stop, window, scale)
            o = torch.bmm(p.to(v_KTD.dtype), v_KTD[:, k_start:k_stop])  # [KV, G*b, D]
            out_KGTD[:, :, q_start:q_stop] = o.view(kv_heads, -1, q_stop - q_start, dim)
        ctx.save_for_backward(q_HTD, k_KTD, v_KTD)
        ctx.window, ctx.scale, ctx.block = window, scale, block
        return out_KGTD.view(heads, length, dim)

    @staticmethod
    def backward(ctx, grad_out_HTD):
        q_HTD, k_KTD, v_KTD = ctx.saved_tensors
        window, scale, block = ctx.window, ctx.scale, ctx.block
        heads, length, dim = q_HTD.shape
        kv_heads, groups = k_KTD.shape[0], heads // k_KTD.shape[0]
        q_KGTD = q_HTD.view(kv_heads, groups, length, dim)
        do_KGTD = grad_out_HTD.contiguous().view(kv_heads, groups, length, dim)
        dq_KGTD = torch.empty_like(q_KGTD)
        dk_KTD = torch.zeros(k_KTD.shape, dtype=accumulate_dtype(k_KTD.dtype), device=k_KTD.device)
        dv_KTD = torch.zeros(v_KTD.shape, dtype=accumulate_dtype(v_KTD.dtype), device=v_KTD.device)
        for q_start in range(0, length, block):
            q_stop = min(q_start + block, length)
            k_start, k_stop = _key_range(q_start, q_stop, window)
            rows = (q_stop - q_start) * groups
            q_rows = q_KGTD[:, :, q_start:q_stop].reshape(kv_heads, rows, dim)
            do_rows = do_KGTD[:, :, q_start:q_stop].reshape(kv_heads, rows, dim)
            p = _scores(q_KGTD[:, :, q_start:q_stop], k_KTD, q_start, q_stop, k_start, k_stop, window, scale)
            dv_KTD[:, k_start:k_stop] += _matmul_fp32(p.to(v_KTD.dtype).transpose(1, 2), do_rows)
            dp = _matmul_fp32(do_rows, v_KTD[:, k_start:k_stop].transpose(1, 2))
            ds = (p * (dp - (dp * p).sum(dim=-1, keepdim=True))).mul_(scale).to(q_HTD.dtype)
            dq = torch.bmm(ds, k_KTD[:, k_start:k_stop])  # [KV, G*b, D]
            dq_KGTD[:, :, q_start:q_stop] = dq.view(kv_heads, groups, q_stop - q_start, dim)
            dk_KTD[:, k_start:k_stop] += _matmul_fp32(ds.transpose(1, 2), q_rows)
        return dq_KGTD.view(heads, length, dim), dk_KTD.to(k_KTD.dtype), dv_KTD.to(v_KTD.dtype), None, None, None


def blocked_causal_attention(
    query_HTD: torch.Tensor,
    key_KTD: torch.Tensor,
    value_KTD: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """softmax(scale q k^T + causal/window mask) v for one sequence: query [H, T, D], key and
    value [KV, T, D] (H a multiple of KV) -> [H, T, D]."""
    return BlockedCausalAttention.apply(query_HTD.contiguous(), key_KTD.contiguous(), value_KTD.contiguous(), window, scale, block)
