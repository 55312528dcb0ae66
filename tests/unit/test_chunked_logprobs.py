"""The chunked head: linear -> softcap -> temperature -> log-softmax -> gather, forward and backward,
equal to the naive full-logits computation and never holding the batch's [tokens x vocab] logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posttrain.models.chunked_logprobs import chunked_entropy, chunked_token_logprobs

pytestmark = pytest.mark.unit

N, H, V = 37, 16, 50


def _naive(hidden_NH, weight_VH, targets_N, softcap, temperature):
    logits_NV = hidden_NH @ weight_VH.t()
    if softcap is not None:
        logits_NV = softcap * torch.tanh(logits_NV / softcap)
    return torch.log_softmax(logits_NV.float() / temperature, dim=-1).gather(-1, targets_N.unsqueeze(-1)).squeeze(-1)


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=dtype).mul_(2).requires_grad_()
    weight = torch.randn(V, H, generator=gen, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize(("softcap", "temperature"), [(None, 1.0), (None, 0.7), (3.0, 1.0), (3.0, 0.7)])
def test_gradients_are_exact_in_float64(softcap, temperature):
    hidden, weight, targets = _inputs(torch.float64)
    fn = lambda h, w: chunked_token_logprobs(h, w, targets, softcap=softcap, temperature=temperature, chunk_tokens=8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 1000])
def test_values_and_gradients_equal_the_naive_path_in_fp32(chunk_tokens):
    hidden, weight, targets = _inputs()
    upstream_N = torch.linspace(-1, 2, N)  # a weighted sum, like a policy-gradient loss
    got_N = chunked_token_logprobs(hidden, weight, targets, softcap=3.0, temperature=0.7, chunk_tokens=chunk_tokens)
    (got_N * upstream_N).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected_N = _naive(hidden, weight, targets, 3.0, 0.7)
    (expected_N * upstream_N).sum().backward()
    torch.testing.assert_close(got_N, expected_N, rtol=0, atol=1e-5)
    for got, expected in zip(got_grads, (hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_softcap_and_temperature_matter():
    """Guards against a path that ignores either (the bugs peers shipped)."""
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        base_N = chunked_token_logprobs(hidden, weight, targets, softcap=3.0, temperature=0.7)
        assert (base_N - chunked_token_logprobs(hidden, weight, targets, softcap=None, temperature=0.7)).abs().max() > 0.1
        assert (base_N - chunked_token_logprobs(hidden, weight, targets, softcap=3.0, temperature=1.0)).abs().max() > 0.1


def test_bf16_autocast_matches_the_naive_path_under_autocast():
    hidden, weight, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_N = chunked_token_logprobs(hidden, weight, targets, softcap=3.0, temperature=0.7, chunk_tokens=8)
        (got_N.sum()).backward()
        expected_N = _naive(hidden, weight.to(torch.bfloat16), targets, 3.0, 0.7)
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32  # fp32 masters get fp32 gradients
    torch.testing.assert_close(got_N, expected_N, rtol=0, atol=2e-2)  # bf16 logits, then fp32 either way


def test_entropy_equals_the_full_distribution_s():
    hidden, weight, _ = _inputs()
    with torch.no_grad():
        logits_NV = 3.0 * torch.tanh(hidden @ weight.t() / 3.0) / 0.7
        logp_NV = torch.log_softmax(logits_NV, dim=-1)
        expected_N = -(logp_NV.exp() * logp_NV).sum(-1)
    got_N = chunked_entropy(hidden, weight, softcap=3.0, temperature=0.7, chunk_tokens=5)
    torch.testing.assert_close(got_N, expected_N, rtol=0, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_forward_and_backward_never_hold_the_whole_batch_s_logits():
    tokens, hidden_size, vocab, chunk = 64, 4, 1000, 8
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with LargestTensor() as mode:
        chunked_token_logprobs(hidden, weight, targets, softcap=30.0, temperature=0.9, chunk_tokens=chunk).sum().backward()
    # one chunk's logits (8 x 1000) at most, never the batch's (64 x 1000); the weight gradient is 4000
    assert mode.largest == chunk * vocab
