"""Token logprobs from hidden states without materializing the batch's [tokens x vocab] logits.

logprob[n] = log_softmax(softcap(hidden[n] @ W^T) / temperature)[target[n]], computed over chunks
of tokens: a chunk's logits exist only while that chunk is processed, in the forward and again
(recomputed) in the backward. With Gemma 4's 262,144-token vocabulary, the naive path's fp32
logits, log-softmax and their gradients cost several GiB per thousand tokens; here the workspace
is one chunk's (`chunk_tokens` x vocab fp32, a few of them at once) plus one float per token.

The matmuls run in the autocast dtype when autocast is on (as transformers' lm_head would) and
everything after them in fp32; the weight gradient accumulates in fp32.

Backward, per chunk, with s = softcap(z) / T and p = softmax(s):
    d logprob / d s = onehot(target) - p
    d s / d z = (1 - (softcap(z) / cap)^2) / T      (1 / T without softcap)
    grad_hidden = (g * ds/dz) @ W,   grad_W += (g * ds/dz)^T @ hidden
"""

from __future__ import annotations

import torch

# Logit elements per chunk when the caller does not choose: 64M fp32 = 256 MiB (256 tokens of
# Gemma 4's vocabulary).
DEFAULT_CHUNK_ELEMENTS = 64 * 2**20


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (gradient checks)."""
    return torch.promote_types(dtype, torch.float32)


def _scaled_logits(
    hidden_CH: torch.Tensor, weight_VH: torch.Tensor, softcap: float | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(softcap(hidden @ W^T) / T in fp32, tanh(z / cap) or None)."""
    return _scale(hidden_CH @ weight_VH.t(), softcap, temperature)


def _scale(logits_CV: torch.Tensor, softcap: float | None, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits_CV = logits_CV.to(accumulate_dtype(logits_CV.dtype))
    tanh_CV = None
    if softcap is not None:
        tanh_CV = torch.tanh(logits_CV / softcap)
        logits_CV = softcap * tanh_CV
    return logits_CV / temperature, tanh_CV


def _chunk_logprobs(
    logits_CV: torch.Tensor, targets_C: torch.Tensor, softcap: float | None, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs_C, logsumexp_C) of one chunk's raw logits (matmul output)."""
    scaled_CV, _ = _scale(logits_CV, softcap, temperature)
    lse_C = torch.logsumexp(scaled_CV, dim=-1)
    return scaled_CV.gather(-1, targets_C.unsqueeze(-1)).squeeze(-1) - lse_C, lse_C


def _chunk_logits_grad(
    logits_CV: torch.Tensor,
    targets_C: torch.Tensor,
    lse_C: torch.Tensor,
    grad_C: torch.Tensor,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    """d(sum grad * logprob) / d raw logits, in the logits' dtype (for the next matmuls)."""
    scaled_CV, tanh_CV = _scale(logits_CV, softcap, temperature)
    # d logprob / d scaled = onehot - p, times the incoming gradient
    grad_CV = torch.exp(scaled_CV - lse_C.unsqueeze(-1)) * -grad_C.unsqueeze(-1)
    grad_CV = grad_CV.scatter_add(-1, targets_C.unsqueeze(-1), grad_C.unsqueeze(-1).to(grad_CV.dtype))
    if tanh_CV is not None:
        grad_CV = grad_CV * (1 - tanh_CV.square())
    return (grad_CV / temperature).to(logits_CV.dtype)


_compiled: dict = {}


def _fused(fn, device: torch.device):
    """`fn` compiled on CUDA (one kernel per chunk instead of a dozen passes over its fp32 logits);
    eager elsewhere."""
    if device.type != "cuda":
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _accumulate_outer(grad_weight_VH: torch.Tensor, grad_CV: torch.Tensor, hidden_CH: torch.Tensor) -> None:
    """grad_weight += grad^T @ hidden, the product in the compute dtype, the sum in fp32: on CUDA one
    bf16 GEMM accumulating into the fp32 buffer; elsewhere the product, then the add."""
    if grad_CV.device.type == "cuda" and grad_CV.dtype != grad_weight_VH.dtype:
        torch.addmm(grad_weight_VH, grad_CV.t(), hidden_CH, out_dtype=grad_weight_VH.dtype, out=grad_weight_VH)
    else:
        grad_weight_VH.add_(grad_CV.t() @ hidden_CH)


class ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, softcap, temperature, chunk_tokens):
        dtype = _compute_dtype(weight_VH)
        weight = weight_VH.to(dtype)
        logprobs_N = torch.empty(hidden_NH.shape[0], dtype=accumulate_dtype(dtype), device=hidden_NH.device)
        lse_N = torch.empty_like(logprobs_N)
        chunk_logprobs = _fused(_chunk_logprobs, hidden_NH.device)
        with torch.autocast(hidden_NH.device.type, enabled=False):
            for start in range(0, hidden_NH.shape[0], chunk_tokens):
                stop = start + chunk_tokens
                logits_CV = hidden_NH[start:stop].to(dtype) @ weight.t()
                logprobs_N[start:stop], lse_N[start:stop] = chunk_logprobs(logits_CV, targets_N[start:stop], softcap, temperature)
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        ctx.softcap, ctx.temperature, ctx.chunk_tokens, ctx.dtype = softcap, temperature, chunk_tokens, dtype
        return logprobs_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_NH, weight_VH, targets_N, lse_N = ctx.saved_tensors
        softcap, temperature, dtype = ctx.softcap, ctx.temperature, ctx.dtype
        weight = weight_VH.to(dtype)
        grad_hidden_NH = torch.zeros_like(hidden_NH) if ctx.needs_input_grad[0] else None
        grad_weight_VH = (
            torch.zeros_like(weight_VH, dtype=accumulate_dtype(weight_VH.dtype)) if ctx.needs_input_grad[1] else None
        )
        logits_grad = _fused(_chunk_logits_grad, hidden_NH.device)
        grad_N = grad_N.contiguous()
        with torch.autocast(hidden_NH.device.type, enabled=False):
            for start in range(0, hidden_NH.shape[0], ctx.chunk_tokens):
                stop = start + ctx.chunk_tokens
                hidden_CH = hidden_NH[start:stop].to(dtype)
                grad_CV = logits_grad(
                    hidden_CH @ weight.t(), targets_N[start:stop], lse_N[start:stop], grad_N[start:stop], softcap, temperature
                )
                if grad_hidden_NH is not None:
                    grad_hidden_NH[start:stop] = (grad_CV @ weight).to(hidden_NH.dtype)
                if grad_weight_VH is not None:
                    _accumulate_outer(grad_weight_VH, grad_CV, hidden_CH)
        if grad_weight_VH is not None:
            grad_weight_VH = grad_weight_VH.to(weight_VH.dtype)
        return grad_hidden_NH, grad_weight_VH, None, None, None, None


def chunked_token_logprobs(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """logprobs_N of targets_N under softmax(softcap(hidden_NH @ weight_VH^T) / temperature), fp32;
    differentiable in hidden and weight."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight_VH.shape[0])
    return ChunkedTokenLogprobs.apply(hidden_NH, weight_VH, targets_N, softcap, temperature, chunk_tokens)


@torch.no_grad()
def chunked_entropy(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    *,
    softcap: float | None,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Entropy (nats) of each token's full distribution, chunked the same way; no gradient (a metric)."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight_VH.shape[0])
    dtype = _compute_dtype(weight_VH)
    weight = weight_VH.to(dtype)
    entropy_N = torch.empty(hidden_NH.shape[0], dtype=accumulate_dtype(dtype), device=hidden_NH.device)
    with torch.autocast(hidden_NH.device.type, enabled=False):
        for start in range(0, hidden_NH.shape[0], chunk_tokens):
            scaled_CV, _ = _scaled_logits(hidden_NH[start : start + chunk_tokens].to(dtype), weight, softcap, temperature)
            logp_CV = torch.log_softmax(scaled_CV, dim=-1)
            entropy_N[start : start + chunk_tokens] = -(logp_CV.exp() * logp_CV).sum(dim=-1)
    return entropy_N
