"""Checkpoint loading through the family registry (models/loading.py, models/registry.py).

A multimodal Gemma 4 checkpoint loads as the multimodal model, or text-only with its REAL
language-model weights; sharded checkpoints load; the key rules are idempotent; any weight the
rules do not account for is an error naming it; fp32 masters whatever the stored dtype.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from posttrain.models.experts import AUTOCAST_GROUPED_MM
from posttrain.models.family import is_dropped_key, map_checkpoint_key
from posttrain.models.gemma4 import GEMMA4
from posttrain.models.generic import GENERIC
from posttrain.models.loading import CheckpointMismatchError, load_policy
from posttrain.models.logprobs import token_logprobs
from posttrain.models.registry import family_for
from posttrain.models.tiny import tiny_gemma4_config, tiny_gemma4_multimodal_config

pytestmark = pytest.mark.unit

VOCAB = 320


def _checkpoint_keys(path: Path) -> list[str]:
    keys = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            keys += list(f.keys())
    return keys


@pytest.fixture(scope="module")
def multimodal_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny multimodal Gemma 4 (E-series text model + vision + audio towers), saved in 3+ shards."""
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(tiny_gemma4_config(VOCAB, variant="e_series")))
    path = tmp_path_factory.mktemp("mm")
    model.save_pretrained(path, max_shard_size="100KB")
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_the_fixture_is_really_sharded_and_multimodal(multimodal_checkpoint):
    path, _ = multimodal_checkpoint
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) >= 3
    keys = _checkpoint_keys(path)
    assert any(k.startswith("model.language_model.") for k in keys)
    assert any(k.startswith("model.vision_tower.") for k in keys) and any(k.startswith("model.audio_tower.") for k in keys)


def test_multimodal_checkpoint_loads_as_the_multimodal_model(multimodal_checkpoint):
    path, saved = multimodal_checkpoint
    model = load_policy(path)
    assert isinstance(model, Gemma4ForConditionalGeneration)
    own = model.state_dict()
    assert own.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(own[name], tensor), name


def test_text_only_load_of_a_multimodal_checkpoint_gets_the_real_language_model(multimodal_checkpoint):
    """transformers' Gemma4ForCausalLM.from_pretrained on this checkpoint re-initializes the language
    model; posttrain renames the keys and every text weight equals the saved one."""
    path, saved = multimodal_checkpoint
    model = load_policy(path, text_only=True)
    assert isinstance(model, Gemma4ForCausalLM)
    own = model.state_dict()
    assert not any("vision" in k or "audio" in k for k in own)
    for name, tensor in own.items():
        source = name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name
        if name == "lm_head.weight":  # tied to the embeddings
            source = "model.language_model.embed_tokens.weight"
        assert torch.equal(tensor, saved[source]), name


def test_key_rules_are_idempotent_and_drop_only_the_towers(multimodal_checkpoint):
    path, _ = multimodal_checkpoint
    keys = _checkpoint_keys(path)
    once = [map_checkpoint_key(k, GEMMA4.text_only_key_rules) for k in keys]
    twice = [map_checkpoint_key(k, GEMMA4.text_only_key_rules) for k in once]
    assert once == twice
    assert not any(k.startswith("model.language_model.") for k in once)
    dropped = {k for k in once if is_dropped_key(k, GEMMA4.text_only_dropped_keys)}
    assert dropped == {k for k in keys if re.match(r"model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.", k)}
    text_model_keys = set(Gemma4ForCausalLM(tiny_gemma4_config(VOCAB, variant="e_series")).state_dict()) - {"lm_head.weight"}
    assert set(once) - dropped == text_model_keys


def _rewrite_shards(path: Path, edit) -> None:
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / file)
        edit(file, tensors)
        save_file(tensors, path / file, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file} | {k: file for k in tensors}
    index_path.write_text(json.dumps(index))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_missing_language_model_weight_is_an_error_naming_it(multimodal_checkpoint, tmp_path):
    path = _copy(multimodal_checkpoint[0], tmp_path / "ckpt")
    victim = "model.language_model.layers.1.mlp.up_proj.weight"
    _rewrite_shards(path, lambda file, tensors: tensors.pop(victim, None))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_policy(path, text_only=True)
    with pytest.raises(CheckpointMismatchError, match=re.escape(victim)):
        load_policy(path)


def test_an_unknown_weight_is_an_error_even_in_a_text_only_load(multimodal_checkpoint, tmp_path):
    path = _copy(multimodal_checkpoint[0], tmp_path / "ckpt")
    extra = "model.language_model.layers.0.self_attn.rogue_proj.weight"

    def add(file, tensors):
        if file.endswith("00001-of-" + file.split("-of-")[-1]):
            tensors[extra] = torch.zeros(2, 2)

    _rewrite_shards(path, add)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: model\.layers\.0\.self_attn\.rogue_proj\.weight"):
        load_policy(path, text_only=True)


def test_bf16_multimodal_checkpoint_loads_as_fp32_masters(multimodal_checkpoint, tmp_path):
    path = _copy(multimodal_checkpoint[0], tmp_path / "ckpt")
    _rewrite_shards(path, lambda file, tensors: tensors.update({k: v.to(torch.bfloat16) for k, v in tensors.items()}))
    for text_only in (False, True):
        model = load_policy(path, text_only=text_only)
        assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_pickle_only_directory_is_refused(tmp_path):
    model = Gemma4ForCausalLM(tiny_gemma4_config(VOCAB))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_policy(tmp_path)


def test_registry_maps_gemma4_types_to_the_family_and_others_to_generic():
    assert family_for(tiny_gemma4_config(VOCAB)) is GEMMA4
    assert family_for(tiny_gemma4_multimodal_config(tiny_gemma4_config(VOCAB))) is GEMMA4
    assert family_for(Qwen3Config()) is GENERIC


def test_generic_family_loads_a_qwen3_checkpoint_exactly(tmp_path):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    saved = Qwen3ForCausalLM(config)
    saved.save_pretrained(tmp_path)
    loaded = load_policy(tmp_path)
    assert isinstance(loaded, Qwen3ForCausalLM)
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="does not take multimodal inputs"):
        from posttrain.models.logprobs import token_logprobs

        token_logprobs(loaded, torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), pixel_values=torch.zeros(1))


def test_moe_checkpoints_load_with_grouped_expert_gemms_and_the_same_values(tmp_path):
    """No per-expert Python loop in training: load_policy switches MoE experts to grouped GEMMs,
    which give the eager loop's logprobs and gradients."""
    torch.manual_seed(0)
    config = tiny_gemma4_config(300, variant="moe")
    Gemma4ForCausalLM(config).save_pretrained(tmp_path)
    grouped = load_policy(tmp_path)
    assert grouped.config._experts_implementation == AUTOCAST_GROUPED_MM
    eager = load_policy(tmp_path)
    eager.set_experts_implementation("eager")
    ids_BT = torch.randint(3, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    results = []
    for model in (grouped, eager):
        logprobs_BT = token_logprobs(model, ids_BT, torch.ones_like(ids_BT))
        logprobs_BT.sum().backward()
        results.append((logprobs_BT.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (grouped_lp, grouped_grads), (eager_lp, eager_grads) = results
    torch.testing.assert_close(grouped_lp, eager_lp, rtol=0, atol=1e-5)
    assert grouped_grads.keys() == eager_grads.keys()
    for name, grad in grouped_grads.items():
        assert float((grad - eager_grads[name]).abs().max() / eager_grads[name].abs().max()) < 1e-5, name
