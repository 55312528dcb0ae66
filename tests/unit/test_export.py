"""Hugging Face export (checkpoint/export.py): plain transformers loads it and computes the same logprobs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.checkpoint.export import ExportError, export_hf
from posttrain.models import load_policy, load_tokenizer, token_logprobs

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def trained(tiny_checkpoint):
    """The tiny policy with every weight moved away from the checkpoint, as training would."""
    model = load_policy(tiny_checkpoint)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = ["Compute max(3, 9).", "Compute 41+14-7 and give the answer", "max(1, 2)"]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def _logprobs(model, batch) -> torch.Tensor:
    ids_BT, mask_BT = batch
    with torch.no_grad():
        return token_logprobs(model, ids_BT, mask_BT) * mask_BT[:, 1:]  # padding positions carry no meaning


def _weight_names(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_fp32_export_loads_with_plain_transformers_and_gives_the_same_logprobs(trained, tokenizer, batch, tmp_path):
    out = export_hf(trained, tokenizer, tmp_path / "hf")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.startswith(".tmp-") for name in (p.name for p in tmp_path.iterdir()))

    expected = _logprobs(trained, batch)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {p.dtype for p in plain.parameters()} == {torch.float32}
    assert torch.equal(_logprobs(plain, batch), expected)
    assert torch.equal(_logprobs(load_policy(out).eval(), batch), expected)


def test_tied_embeddings_stay_tied(trained, tokenizer, tmp_path):
    assert trained.lm_head.weight is trained.model.embed_tokens.weight  # the tiny Gemma ties them
    for dtype in ("float32", "bfloat16"):
        out = export_hf(trained, tokenizer, tmp_path / dtype, dtype=dtype)
        assert "lm_head.weight" not in _weight_names(out)  # saved once
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_bf16_export_holds_the_rounded_weights_and_leaves_the_model_alone(trained, tokenizer, batch, tmp_path):
    before = {name: p.detach().clone() for name, p in trained.named_parameters()}
    out = export_hf(trained, tokenizer, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    rounded = {name: p.detach().to(torch.bfloat16) for name, p in trained.named_parameters()}
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, rounded[name]), name
    # bf16 compute (transformers keeps the rotary buffers fp32) stays near the fp32 logprobs
    torch.testing.assert_close(_logprobs(loaded, batch), _logprobs(trained, batch), rtol=0, atol=0.1)
    # loaded as fp32 masters (posttrain's way), the rounded weights compute exactly like a rounded copy
    upcast = copy.deepcopy(trained)
    with torch.no_grad():
        for param in upcast.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    assert torch.equal(_logprobs(load_policy(out).eval(), batch), _logprobs(upcast, batch))
    # the trainer's model is untouched: still fp32, same values
    for name, param in trained.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name
    assert str(trained.config.dtype).removeprefix("torch.") == "float32"


def test_tokenizer_round_trips(trained, tokenizer, tmp_path):
    out = export_hf(trained, tokenizer, tmp_path / "hf")
    reloaded = AutoTokenizer.from_pretrained(out)
    for text in ["Compute max(37, 48).", "<|turn>user\nmax(1, 2)<turn|>", "  spaces and ünïcode  "]:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.chat_template == tokenizer.chat_template
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id) == (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    load_tokenizer(out)  # posttrain's checks (chat template, pad token) pass too


def test_refuses_a_non_empty_directory_unless_overwriting(trained, tokenizer, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(trained, tokenizer, out)
    assert (out / "notes.txt").read_text() == "mine"
    export_hf(trained, tokenizer, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(trained, tokenizer, empty)  # an existing empty directory is fine
