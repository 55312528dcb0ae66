"""Document attention computed on CPU against transformers' SDPA on padded rows: SDPA and blocked
GEMMs on groups of padded documents (values and gradients). Tiny Gemma 4 models: windows of 8
exceeded, KV-shared layers, MoE; documents of different lengths batched together."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig
from posttrain.models import document_attention
from posttrain.models.document_attention import (
    DOCUMENT_SDPA,
    document_groups,
    document_ids,
    document_segments,
    resolve_training_attention,
    set_training_attention,
)
from posttrain.models.logprobs import packed_token_logprobs, token_logprobs
from posttrain.models.tiny import tiny_gemma4_config, tiny_gemma4_multimodal_config
from posttrain.rollout.torch_engine import TorchRolloutEngine
from posttrain.training.trainer import PolicyTrainer

pytestmark = pytest.mark.unit

LENGTHS = [23, 9, 17, 2]


def _rows(vocab: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    ids_BT = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask_BT = torch.zeros_like(ids_BT)
    for row, length in enumerate(LENGTHS):
        span = slice(width - length, width) if left else slice(0, length)
        ids_BT[row, span] = torch.randint(3, vocab, (length,), generator=gen)
        mask_BT[row, span] = 1
    return ids_BT, mask_BT


def test_documents_from_positions_and_padding():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 2, 2]])
    padding = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    doc = document_ids(positions, padding)
    assert doc.tolist() == [[2, 2, 2, 3, 3, 4], [0, 0, 4, 4, 4, 0]]
    assert document_segments(doc) == [[(0, 3), (3, 5), (5, 6)], [(0, 2), (2, 5), (5, 6)]]


def test_documents_batch_in_groups_of_similar_length_without_the_padding():
    # row 0: documents of 6, 5 and 1 tokens; row 1: padding, a document of 4, padding
    doc = torch.tensor([[2] * 6 + [3] * 5 + [4], [0, 0] + [5] * 4 + [0] * 6])
    groups = document_groups(doc, max_group_tokens=100, max_padding=1.25)
    # longest first: 6, 5 and 4 pad to 18 tokens <= 1.25 x 15; adding the 1 would pad 16 to 24
    assert [g.index_DL.tolist() for g in groups] == [
        [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 6], [14, 15, 16, 17, 14, 14]],
        [[11]],
    ]
    assert groups[0].valid_DL.sum(dim=1).tolist() == [6, 5, 4]
    # at most 12 padded tokens per group
    groups = document_groups(doc, max_group_tokens=12, max_padding=1.25)
    assert [g.valid_DL.sum(dim=1).tolist() for g in groups] == [[6, 5], [4], [1]]


def _grads(model):
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("path", ["sdpa_per_document", "blocked_gemms"])
@pytest.mark.parametrize("variant", ["basic", "dense", "e_series", "moe"])
def test_document_attention_equals_transformers_sdpa(variant, path, monkeypatch):
    """`document`: per-document SDPA, and the blocked GEMMs it gives heads wider than the fused
    kernels take (here every head: the threshold is set to 0)."""
    implementation = DOCUMENT_SDPA
    if path == "blocked_gemms":
        monkeypatch.setattr(document_attention, "WIDE_HEAD_DIM", 0)
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant=variant))
    for left in (False, True):
        ids_BT, mask_BT = _rows(300, left=left)
        # tokens scored from a real token (a padding position's output is meaningless with any kernel)
        mask = (mask_BT[:, 1:] * mask_BT[:, :-1]).bool()
        expected = token_logprobs(model, ids_BT, mask_BT, temperature=0.8)
        expected[mask].sum().backward()
        expected_grads = _grads(model)
        set_training_attention(model, implementation)
        runs = {"padded": token_logprobs(model, ids_BT, mask_BT, temperature=0.8)}
        if not left:
            runs["packed"] = packed_token_logprobs(model, ids_BT, mask_BT, temperature=0.8)[:, 1:]
        for name, got in runs.items():
            torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5, msg=f"{name} left={left}")
            got[mask].sum().backward()
            for param, grad in _grads(model).items():
                scale = float(expected_grads[param].abs().max())
                torch.testing.assert_close(grad, expected_grads[param], rtol=1e-4, atol=1e-5 * scale, msg=f"{name} {param}")
        set_training_attention(model, "sdpa")


def test_auto_picks_document_attention_only_for_text_models_on_cuda():
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    assert resolve_training_attention("auto", model, torch.device("cpu")) == "sdpa"
    assert resolve_training_attention("auto", model, torch.device("cuda")) == DOCUMENT_SDPA
    assert resolve_training_attention("document", model, torch.device("cpu")) == DOCUMENT_SDPA
    assert resolve_training_attention("eager", model, torch.device("cpu")) == "eager"
    multimodal = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(tiny_gemma4_config(300)))
    assert resolve_training_attention("auto", multimodal, torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="image attention"):
        resolve_training_attention("document", multimodal, torch.device("cuda"))


def test_trainer_sets_the_attention_and_generation_copies_do_not_keep_it():
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    policy = PolicyConfig(precision="float32", train_global_batch_size=2, train_micro_batch_size=2, optimizer=OptimizerConfig())
    PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=1)
    assert model.config._attn_implementation == "sdpa"  # auto on CPU
    set_training_attention(model, DOCUMENT_SDPA)  # as on CUDA
    engine = TorchRolloutEngine(model, pad_token_id=0, dtype=torch.float32)
    assert engine.model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == DOCUMENT_SDPA


def test_wide_heads_run_in_the_autocast_dtype(monkeypatch):
    """Under autocast the blocked GEMMs take bf16 inputs whatever dtypes q, k and v arrive in
    (Gemma 4's rotary embeddings return q and k in fp32, v stays bf16), as SDPA would."""
    seen = []
    real = document_attention.blocked_causal_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(document_attention, "blocked_causal_attention", spy)
    monkeypatch.setattr(document_attention, "WIDE_HEAD_DIM", 0)
    query, key = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    value = torch.randn(1, 2, 12, 8, dtype=torch.bfloat16)
    module = torch.nn.Module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = document_attention.document_attention_forward(module, query, key, value, None, scaling=1.0)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.bfloat16
    seen.clear()
    document_attention.document_attention_forward(module, query, key, value.float(), None, scaling=1.0)
    assert seen == [(torch.float32,) * 3]
