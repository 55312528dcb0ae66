"""Sequence packing and token-budget micro-batches: the same logprobs as padded rows."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from posttrain.models.logprobs import packed_token_logprobs, token_logprobs
from posttrain.models.tiny import tiny_gemma4_config
from posttrain.training.batching import micro_batches

pytestmark = pytest.mark.unit

# right-padded rows of 23, 9, 17 and 2 real tokens: the long ones exceed the sliding window (8)
LENGTHS = [23, 9, 17, 2]


def _right_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    width = max(LENGTHS)
    ids_BT = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    mask_BT = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for row, length in enumerate(LENGTHS):
        ids_BT[row, :length] = torch.randint(3, vocab, (length,), generator=gen)
        mask_BT[row, :length] = 1
    return ids_BT, mask_BT


def test_micro_batches_by_rows_and_tokens():
    assert micro_batches([5, 5, 5, 5], 2, None) == [(0, 2), (2, 4)]
    assert micro_batches([5, 5, 5, 5], 4, 11) == [(0, 2), (2, 4)]
    assert micro_batches([5, 20, 5, 5], 4, 11) == [(0, 1), (1, 2), (2, 4)]  # the long row alone
    assert micro_batches([3, 3, 3], 2, 100) == [(0, 2), (2, 3)]
    assert micro_batches([], 2, 10) == []


def _models():
    torch.manual_seed(0)
    for variant in ("basic", "dense", "moe", "e_series"):
        yield variant, Gemma4ForCausalLM(tiny_gemma4_config(300, variant=variant)).eval()
    qwen = Qwen3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    )
    yield "qwen3", Qwen3ForCausalLM(qwen).eval()


@pytest.mark.parametrize(("name", "model"), list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_packed_logprobs_equal_padded_rows(name, model):
    ids_BT, mask_BT = _right_padded(300)
    with torch.no_grad():
        expected_BT = torch.nn.functional.pad(token_logprobs(model, ids_BT, mask_BT, temperature=0.8), (1, 0))
        got_BT = packed_token_logprobs(model, ids_BT, mask_BT, temperature=0.8)
    real_BT = mask_BT.bool()
    real_BT[:, 0] = False
    torch.testing.assert_close(got_BT[real_BT], expected_BT[real_BT], rtol=0, atol=1e-5)
    assert (got_BT[~real_BT] == 0).all()


def test_packing_refuses_left_padding():
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    ids_BT = torch.tensor([[0, 0, 5, 6], [5, 6, 7, 8]])
    with pytest.raises(ValueError, match="right-padded"):
        packed_token_logprobs(model, ids_BT, (ids_BT != 0).long())
