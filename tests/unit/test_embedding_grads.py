"""Embedding gradients accumulated in place: the same dense sum as autograd's own, in the same tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma4ForCausalLM

from posttrain.models.tiny import tiny_gemma4_config
from posttrain.training.embedding_grads import embedding_tables, sparse_backward, zero_dense_grads

pytestmark = pytest.mark.unit


def _micro_batch_loss(model, seed: int) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(seed))
    return model(input_ids=ids, labels=ids).loss


def test_sparse_accumulation_gives_autograd_s_dense_gradients_in_one_tensor():
    torch.manual_seed(0)
    reference = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="e_series"))
    model = copy.deepcopy(reference)
    tables = embedding_tables(model)
    # the input embedding (tied to the head: dense and sparse gradients meet) and the per-layer table
    assert tables == [model.model.embed_tokens, model.model.embed_tokens_per_layer]
    assert model.lm_head.weight is model.model.embed_tokens.weight

    zero_dense_grads(tables)
    table_grad = tables[1].weight.grad
    for seed in range(3):  # micro-batches
        with sparse_backward(tables):
            loss = _micro_batch_loss(model, seed)
        loss.backward()
        _micro_batch_loss(reference, seed).backward()
    assert tables[1].weight.grad is table_grad and not table_grad.is_sparse  # added in place
    assert not tables[0].weight.grad.is_sparse
    assert table_grad.abs().sum() > 0
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)
    # outside the context the model is as it was
    assert not any(table.sparse for table in tables)


def test_frozen_tables_are_left_alone():
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="e_series"))
    model.model.embed_tokens_per_layer.weight.requires_grad_(False)
    assert embedding_tables(model) == [model.model.embed_tokens]
