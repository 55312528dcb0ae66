"""The tiny Gemma 4 model and tokenizer (models/tiny.py) and checkpoint loading (models/loading.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Gemma4ForCausalLM

from posttrain.models.loading import CheckpointMismatchError, load_policy, load_tokenizer, stop_token_ids
from posttrain.models.tiny import tiny_gemma4_config

pytestmark = pytest.mark.unit


# conftest's tiny model: hidden 64, 2 query heads, 1 kv head, head_dim 32 on every layer.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 2, 1, 32


@pytest.fixture(scope="module")
def policy(tiny_checkpoint):
    return load_policy(tiny_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def _copy_checkpoint(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------- config


def test_every_layer_uses_the_sliding_head_dim(policy):
    """Full-attention layers must not fall back to Gemma 4's 512-wide global heads."""
    layer_types = policy.config.layer_types
    assert layer_types == ["sliding_attention", "full_attention"]
    for layer in policy.model.layers:
        attn = layer.self_attn
        assert tuple(attn.q_proj.weight.shape) == (HEADS * HEAD_DIM, HIDDEN)  # (64, 64), not (1024, 64)
        assert tuple(attn.k_proj.weight.shape) == (KV_HEADS * HEAD_DIM, HIDDEN)
        assert tuple(attn.v_proj.weight.shape) == (KV_HEADS * HEAD_DIM, HIDDEN)
        assert tuple(attn.o_proj.weight.shape) == (HIDDEN, HEADS * HEAD_DIM)


@pytest.mark.parametrize(
    ("num_layers", "expected"),
    [
        (1, ["full_attention"]),
        (3, ["sliding_attention", "full_attention", "full_attention"]),
        (4, ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    ],
)
def test_last_layer_is_full_attention(num_layers, expected):
    config = tiny_gemma4_config(50, num_hidden_layers=num_layers)
    assert config.layer_types == expected


def test_three_layer_model_full_layers_have_small_heads():
    config = tiny_gemma4_config(50, num_hidden_layers=3, head_dim=16)
    model = Gemma4ForCausalLM(config)
    for layer in model.model.layers:
        assert tuple(layer.self_attn.q_proj.weight.shape) == (HEADS * 16, HIDDEN)
        assert tuple(layer.self_attn.k_proj.weight.shape) == (KV_HEADS * 16, HIDDEN)


def test_softcap_tied_embeddings_and_stop_ids(policy, tokenizer):
    assert policy.config.final_logit_softcapping == 30.0
    assert policy.config.tie_word_embeddings is True
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    assert policy.config.hidden_size_per_layer_input == 0
    # Gemma 4 instruction-tuned style stop ids: <eos> and <turn|>
    assert stop_token_ids(policy) == (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>"))


# ------------------------------------------------------------------------------------ tokenizer


def test_chat_template_renders_gemma4_format(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n"


def test_chat_template_maps_assistant_to_model(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "4"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n4<turn|>\n"


def test_special_token_ids(tokenizer):
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4, 5]) == ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.bos_token_id == 2
    # the markers are single tokens inside rendered text
    ids = tokenizer("<|turn>user\nHi<turn|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 4 and ids[-1] == 5


def test_digits_tokenize_one_per_token(tokenizer):
    ids = tokenizer("12345 + 907", add_special_tokens=False)["input_ids"]
    digit_tokens = [t for t in tokenizer.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digit_tokens == ["1", "2", "3", "4", "5", "9", "0", "7"]
    assert tokenizer.decode(ids) == "12345 + 907"


# -------------------------------------------------------------------------------------- loading


def test_load_policy_gives_fp32_parameters(policy):
    dtypes = {p.dtype for p in policy.parameters()}
    assert dtypes == {torch.float32}


def test_missing_weight_raises_naming_the_key(tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    missing = "model.layers.1.self_attn.q_proj.weight"
    tensors = load_file(path / "model.safetensors")
    del tensors[missing]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: model\.layers\.1\.self_attn\.q_proj\.weight"):
        load_policy(path)


def test_unexpected_weight_raises_naming_the_key(tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.7\.self_attn\.q_proj\.weight"):
        load_policy(path)


def test_directory_without_config_raises(tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_policy(path)
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "does-not-exist")


def test_bf16_checkpoint_loads_as_fp32(policy, tiny_checkpoint, tmp_path):
    path = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    bf16_tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path / "model.safetensors").items()}
    save_file(bf16_tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    with safe_open(path / "model.safetensors", "pt") as f:  # precondition: the file really is bf16
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16

    loaded = load_policy(path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    # values are the bf16 ones upcast, not a fresh init
    for name, param in loaded.named_parameters():
        assert torch.equal(param, bf16_tensors[name].float()), name
    # and they differ from the fp32 originals by bf16 rounding only
    original = dict(policy.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    reloaded = dict(loaded.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(original, reloaded)
    torch.testing.assert_close(reloaded, original, rtol=2**-8, atol=0)
