"""The training engine's CPU-tested paths on a CUDA device: the chunked head against the naive
logits path (fp32), and packed rows against padded rows under transformers' SDPA and posttrain's
document attention (per-document SDPA, blocked GEMMs for wide heads), values and gradients.

Run through the device tool: `python -m pytest tests/gpu -q -s` (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4ForCausalLM

from posttrain.models import document_attention
from posttrain.models.document_attention import DOCUMENT_SDPA, set_training_attention
from posttrain.models.family import final_logit_softcap, softcap_logits
from posttrain.models.logprobs import logprobs_from_logits, packed_token_logprobs, token_logprobs
from posttrain.models.tiny import tiny_gemma4_config

pytestmark = pytest.mark.gpu

LENGTHS = [37, 9, 64, 2, 21]  # right-padded rows; the long ones exceed the sliding window (8)


def _rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids_BT = torch.zeros(len(LENGTHS), max(LENGTHS), dtype=torch.long)
    mask_BT = torch.zeros_like(ids_BT)
    for row, length in enumerate(LENGTHS):
        ids_BT[row, :length] = torch.randint(3, vocab, (length,), generator=gen)
        mask_BT[row, :length] = 1
    return ids_BT.cuda(), mask_BT.cuda()


def _model(variant: str = "basic") -> Gemma4ForCausalLM:
    torch.manual_seed(0)
    return Gemma4ForCausalLM(tiny_gemma4_config(300, variant=variant)).cuda().float()


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_chunked_head_equals_naive_logits_on_cuda():
    model = _model()
    ids_BT, mask_BT = _rows(300)
    chunked = token_logprobs(model, ids_BT, mask_BT, temperature=0.7, chunk_tokens=16)
    (chunked * mask_BT[:, 1:]).sum().backward()
    chunked_grads = _grads(model)
    hidden = model.base_model(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state
    logits = softcap_logits(model.lm_head(hidden).float(), final_logit_softcap(model.config))
    naive = logprobs_from_logits(logits[:, :-1], ids_BT[:, 1:], 0.7)
    (naive * mask_BT[:, 1:]).sum().backward()
    mask = mask_BT[:, 1:].bool()
    torch.testing.assert_close(chunked[mask], naive[mask], rtol=0, atol=1e-5)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "document", "document_blocked"])
@pytest.mark.parametrize("variant", ["basic", "dense", "e_series"])
def test_packed_and_padded_rows_equal_sdpa_padded_rows_on_cuda(attention, variant, monkeypatch):
    """transformers' SDPA on packed rows; posttrain's document attention on packed and on padded
    rows: per-document SDPA, and (document_blocked) the blocked GEMMs it gives wide heads, here
    forced on every layer."""
    atol = 1e-5  # of each gradient's largest entry
    if attention == "document_blocked":
        monkeypatch.setattr(document_attention, "WIDE_HEAD_DIM", 0)
        # fp32 GEMMs with a different summation order than the fused kernels: on the device, one
        # of 2048 entries of dense's layer-0 q_proj gradient was 1.6e-5 of the scale off (values exact)
        atol = 3e-5
    model = _model(variant)
    ids_BT, mask_BT = _rows(300)
    expected = token_logprobs(model, ids_BT, mask_BT)
    (expected * mask_BT[:, 1:]).sum().backward()
    expected_grads = _grads(model)
    runs = {}
    if attention.startswith("document"):
        set_training_attention(model, DOCUMENT_SDPA)
        runs["padded"] = token_logprobs(model, ids_BT, mask_BT)
    else:
        model.set_attn_implementation(attention)
    runs["packed"] = packed_token_logprobs(model, ids_BT, mask_BT)[:, 1:]
    mask = mask_BT[:, 1:].bool()
    for run, got in runs.items():
        torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=2e-5, msg=run)
        (got * mask_BT[:, 1:]).sum().backward()
        for name, grad in _grads(model).items():
            scale = float(expected_grads[name].abs().max())
            torch.testing.assert_close(
                grad, expected_grads[name], rtol=1e-4, atol=atol * scale, msg=lambda m, run=run, name=name: f"{run} {name}: {m}"
            )


@pytest.mark.parametrize("window", [None, 40])
def test_blocked_attention_on_cuda(window):
    """The blocked GEMMs for 512-wide heads (bf16 GEMMs writing fp32 scores on CUDA): fp32 equals
    SDPA; bf16 is no further from the fp64 result than SDPA's own bf16 kernel is."""
    from posttrain.models.blocked_attention import blocked_causal_attention  # noqa: PLC0415

    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, length, dim = 8, 1, 300, 512
    q, k, v = (torch.randn(h, length, dim, device="cuda", generator=gen) * 0.3 for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(heads, length, dim, device="cuda", generator=gen)
    positions = torch.arange(length, device="cuda")
    distance = positions[:, None] - positions[None, :]
    mask = (distance >= 0) & (distance < window) if window else distance >= 0

    def run(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
        return [t.double() for t in (out, *grads)]

    def sdpa(q, k, v):
        k, v = (t.expand(heads, -1, -1) for t in (k, v))
        return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=1.0)[0]

    def blocked(q, k, v):
        return blocked_causal_attention(q, k, v, scale=1.0, window=window, block=128)

    reference = run(sdpa, torch.float64)
    for got, expected in zip(run(blocked, torch.float32), reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    for got, sdpa_bf16, expected in zip(run(blocked, torch.bfloat16), run(sdpa, torch.bfloat16), reference, strict=True):
        assert float((got - expected).abs().max()) <= 2 * float((sdpa_bf16 - expected).abs().max()) + 1e-6


@pytest.mark.parametrize("chunk", [None, 1000])  # 1000: parameters span several streamed chunks
def test_offloaded_adamw_equals_fused_adamw_on_cuda(chunk, monkeypatch):
    """optimizer_offload streams the host moments through the fused kernel: bit-identical to
    torch's fused AdamW on the GPU (what the trainer uses without offload), moments in page-locked memory."""
    from posttrain.training import offload  # noqa: PLC0415

    if chunk is not None:
        monkeypatch.setattr(offload, "CHUNK_SCALARS", chunk)
    plain_model, offloaded_model = _model("e_series"), _model("e_series")
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    offloaded = offload.HostAdamW(offloaded_model.parameters(), lr=1e-3, weight_decay=0.1)
    assert offloaded.pinned and offloaded._buffer.is_pinned()
    ids_BT, mask_BT = _rows(300)
    for _ in range(3):
        for model, optimizer in ((plain_model, plain), (offloaded_model, offloaded)):
            optimizer.zero_grad()
            model(input_ids=ids_BT, attention_mask=mask_BT).logits.float().logsumexp(-1).mean().backward()
            optimizer.step()
    moved = 0.0
    initial = dict(_model("e_series").named_parameters())
    for (name, expected), got in zip(plain_model.named_parameters(), offloaded_model.parameters(), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(offloaded.state[got]["exp_avg_sq"].cuda(), plain.state[expected]["exp_avg_sq"], rtol=0, atol=0)
        moved = max(moved, float((got - initial[name]).abs().max()))
    assert moved > 1e-3
