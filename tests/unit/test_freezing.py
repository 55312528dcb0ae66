"""Freezing (models/freezing.py) and its wiring: config keys, optimizer membership, training, resume, fp32 masters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Qwen3Config,
)
from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig, Gemma4VisionConfig

from posttrain.checkpoint.store import CheckpointOptimizerMismatchError, load_checkpoint, save_checkpoint
from posttrain.config import ConfigError, RecipeConfig, load_config, load_recipe
from posttrain.config.loader import validate_config
from posttrain.config.loss import LossConfig
from posttrain.config.schema import FreezeConfig, OptimizerConfig, PolicyConfig
from posttrain.loops.setup import build_run
from posttrain.metrics.console import Console
from posttrain.models.activation_checkpointing import enable_activation_checkpointing, is_activation_checkpointing
from posttrain.models.freezing import FreezeConfigError, apply_freeze_config
from posttrain.models.loading import load_policy
from posttrain.training.trainer import PolicyTrainer, TrainBatch

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
TEMPERATURE = 1.0
VISION = ("model.vision_tower.", "model.embed_vision.")
AUDIO = ("model.audio_tower.", "model.embed_audio.")
LANGUAGE = ("model.language_model.",)  # lm_head is tied to the embeddings: not a parameter name of its own


# ----------------------------------------------------------------------------------- tiny models


def _text_config() -> Gemma4TextConfig:
    return Gemma4TextConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        sliding_window=8,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=300,
        final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )


def _multimodal_config(*, audio: bool = True) -> Gemma4Config:
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=4,
        position_embedding_size=64,
    )
    audio_config = (
        Gemma4AudioConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, output_proj_dims=32, subsampling_conv_channels=[8, 4]
        )
        if audio
        else None
    )
    return Gemma4Config(
        text_config=_text_config(),
        vision_config=vision,
        audio_config=audio_config,
        image_token_id=290,
        audio_token_id=291,
        video_token_id=292,
        boi_token_id=293,
        eoi_token_id=294,
        boa_token_id=295,
        eoa_token_index=296,
    )


def _multimodal(seed: int = 0, *, audio: bool = True) -> Gemma4ForConditionalGeneration:
    torch.manual_seed(seed)
    return Gemma4ForConditionalGeneration(_multimodal_config(audio=audio))


def _qwen3() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16
    )
    return AutoModelForCausalLM.from_config(config)


def _gemma4_text() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_text_config())


def _frozen(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def _numel(model: torch.nn.Module, names: set[str]) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name in names)


# ------------------------------------------------------------------------------------- towers


def test_vision_and_audio_towers_freeze_exactly_their_parameters():
    model = _multimodal()
    summary = apply_freeze_config(model, FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True))
    names = {name for name, _ in model.named_parameters()}
    expected = {name for name in names if name.startswith(VISION + AUDIO)}
    assert {"model.embed_vision.embedding_projection.weight", "model.embed_audio.embedding_projection.weight"} <= expected
    assert _frozen(model) == expected
    assert summary.frozen_groups == ("vision_tower", "audio_tower") and summary.no_op_flags == ()
    assert summary.frozen_parameters == _numel(model, expected)
    assert summary.trainable_parameters == _numel(model, names - expected)
    assert summary.frozen_parameters + summary.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert summary.trainable_parameters == sum(p.numel() for p in model.model.language_model.parameters())


def test_towers_and_language_model_partition_the_multimodal_model():
    model = _multimodal()
    names = {name for name, _ in model.named_parameters()}
    assert all(sum(name.startswith(prefixes) for prefixes in (VISION, AUDIO, LANGUAGE)) == 1 for name in names)
    summary = apply_freeze_config(model, FreezeConfig(freeze_audio_tower=False, freeze_language_model=True))
    assert _frozen(model) == {name for name in names if name.startswith(LANGUAGE)}
    assert not model.lm_head.weight.requires_grad  # tied to the (frozen) embeddings
    assert summary.frozen_groups == ("language_model",)
    with pytest.raises(FreezeConfigError, match="leaves no trainable parameter.*vision_tower, audio_tower, language_model"):
        apply_freeze_config(
            _multimodal(), FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True, freeze_language_model=True)
        )


def test_absent_audio_tower_is_a_reported_no_op():
    model = _multimodal(audio=False)
    summary = apply_freeze_config(model, FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True))
    assert _frozen(model) == {name for name, _ in model.named_parameters() if name.startswith(VISION)}
    assert summary.frozen_groups == ("vision_tower",)
    assert summary.no_op_flags == ("freeze_audio_tower (Gemma4ForConditionalGeneration has no audio_tower)",)
    assert "no-op: freeze_audio_tower" in summary.describe()


@pytest.mark.parametrize("build", [_gemma4_text, _qwen3], ids=["gemma4-text-only", "qwen3-generic"])
def test_tower_flags_on_a_text_only_model_are_no_ops(build):
    model = build()
    total = sum(p.numel() for p in model.parameters())
    summary = apply_freeze_config(model, FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True))
    assert _frozen(model) == set()
    assert (summary.frozen_parameters, summary.trainable_parameters) == (0, total)
    assert [flag.split()[0] for flag in summary.no_op_flags] == ["freeze_vision_tower", "freeze_audio_tower"]
    with pytest.raises(FreezeConfigError, match="leaves no trainable parameter.*language_model"):
        apply_freeze_config(build(), FreezeConfig(freeze_language_model=True))


# ------------------------------------------------------------------------------------ patterns


def test_pattern_freezes_just_the_matching_parameters():
    model = _multimodal()
    summary = apply_freeze_config(model, FreezeConfig(freeze_audio_tower=False, patterns=["model.language_model.layers.0.*"]))
    expected = {name for name, _ in model.named_parameters() if name.startswith("model.language_model.layers.0.")}
    assert expected and _frozen(model) == expected
    assert summary.frozen_groups == ("pattern 'model.language_model.layers.0.*'",)
    assert summary.frozen_parameters == _numel(model, expected)


def test_pattern_matches_module_paths_and_tied_names():
    model = _multimodal()
    apply_freeze_config(model, FreezeConfig(freeze_audio_tower=False, patterns=["*.embed_tokens"]))  # a module path
    assert _frozen(model) == {"model.language_model.embed_tokens.weight"}
    tied = _multimodal()
    apply_freeze_config(tied, FreezeConfig(freeze_audio_tower=False, patterns=["lm_head"]))  # the tied alias
    assert _frozen(tied) == {"model.language_model.embed_tokens.weight"}
    untied = _qwen3()
    apply_freeze_config(untied, FreezeConfig(patterns=["lm_head"]))
    assert _frozen(untied) == {"lm_head.weight"}


@pytest.mark.parametrize(
    ("pattern", "suggestion"),
    [
        ("model.language_model.layer.0.*", "model.language_model.layers.0"),
        ("model.embed_token", "model.embed_tokens"),
    ],
)
def test_pattern_matching_nothing_names_it_and_suggests_module_paths(pattern, suggestion):
    model = _multimodal() if "language_model" in pattern else _qwen3()
    with pytest.raises(FreezeConfigError, match="matches no parameter") as error:
        apply_freeze_config(model, FreezeConfig(freeze_audio_tower=False, patterns=[pattern]))
    assert repr(pattern) in str(error.value) and suggestion in str(error.value)
    assert _frozen(model) == set()  # nothing half-applied


def test_freezing_everything_by_pattern_is_an_error():
    model = _qwen3()
    with pytest.raises(FreezeConfigError, match=r"leaves no trainable parameter in Qwen3ForCausalLM \(frozen: pattern '\*'\)"):
        apply_freeze_config(model, FreezeConfig(patterns=["*"]))
    assert _frozen(model) == set()


# ----------------------------------------------------------------------- optimizer and training


PROMPTS = [[2, 4, 40], [2, 4, 41, 5], [2, 4], [2, 4, 60, 61, 5]]
RESPONSES = [[22, 23, 1], [24], [25, 26, 27, 5], [28, 1]]


def _batch() -> TrainBatch:
    width = max(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))
    ids, attn, loss = [], [], []
    for prompt, response in zip(PROMPTS, RESPONSES):
        pad = width - len(prompt) - len(response)
        ids.append(prompt + response + [0] * pad)
        attn.append([1] * (len(prompt) + len(response)) + [0] * pad)
        loss.append([0] * len(prompt) + [1] * len(response) + [0] * pad)
    return TrainBatch(
        input_ids_BT=torch.tensor(ids),
        attention_mask_BT=torch.tensor(attn),
        loss_mask_BT=torch.tensor(loss),
        advantages_B=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        gen_logprobs_BT=torch.zeros(len(ids), width),
    )


POLICY = PolicyConfig(
    precision="float32",
    train_global_batch_size=4,
    train_micro_batch_size=4,
    optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.1),
)
FREEZE = FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True, patterns=["model.language_model.layers.0.*"])


def _trainer(model: torch.nn.Module, freeze: FreezeConfig = FREEZE) -> PolicyTrainer:
    apply_freeze_config(model, freeze)
    return PolicyTrainer(model, POLICY, LossConfig(), total_optimizer_steps=4)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_optimizer_holds_only_trainable_parameters_and_frozen_ones_do_not_move():
    model = _multimodal()
    trainer = _trainer(model)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert not held & {id(p) for p in model.parameters() if not p.requires_grad}

    before = _snapshot(model)
    trainer.train(_batch(), TEMPERATURE)
    frozen = _frozen(model)
    assert any(name.startswith("model.language_model.layers.0.") for name in frozen)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        if name in frozen:
            assert torch.equal(param, before[name]), f"frozen {name} moved"
            assert param.grad is None, name
        else:
            assert not torch.equal(param, before[name]), f"trainable {name} did not move"


def test_activation_checkpointing_with_frozen_embeddings_gives_the_same_step():
    """Checkpointing composes with freezing: with frozen input embeddings the recomputed layers still get
    their gradients, and the step equals the one without checkpointing."""
    freeze = FreezeConfig(patterns=["*.embed_tokens"])
    plain, checkpointed = _multimodal(), _multimodal()
    enable_activation_checkpointing(checkpointed)
    for model in (plain, checkpointed):
        _trainer(model, freeze).train(_batch(), TEMPERATURE)
    assert is_activation_checkpointing(checkpointed)
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------ resume


def _bf16_copy(path: Path) -> None:
    """Rewrite a checkpoint's weights as bf16 tensors (as a bf16 training run would store them)."""
    weights = path / "model.safetensors"
    save_file({key: tensor.to(torch.bfloat16) for key, tensor in load_file(weights).items()}, weights)


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys() and state_a["state"]
    for index, state in state_a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_b["state"][index][key]), (index, key)
            assert value.dtype == state_b["state"][index][key].dtype == torch.float32, (index, key)


def test_resume_with_freezing_restores_weights_and_optimizer_exactly(tmp_path):
    model = _multimodal(seed=0)
    trainer = _trainer(model)
    trainer.train(_batch(), TEMPERATURE)
    path = save_checkpoint(
        tmp_path, 1, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, loop_state={}, keep_top_k=None
    )

    fresh = _multimodal(seed=1)
    fresh_trainer = _trainer(fresh)
    assert not torch.equal(fresh.model.language_model.norm.weight, model.model.language_model.norm.weight)
    load_checkpoint(path, model=fresh, optimizer=fresh_trainer.optimizer, scheduler=fresh_trainer.scheduler)

    assert _frozen(fresh) == _frozen(model)
    for (name, param), (_, restored) in zip(model.named_parameters(), fresh.named_parameters()):
        assert restored.dtype == torch.float32 and torch.equal(param, restored), name
    _assert_same_optimizer_state(trainer.optimizer, fresh_trainer.optimizer)
    assert fresh_trainer.scheduler.last_epoch == trainer.scheduler.last_epoch == 1

    # training on from the restored state is training on from the original
    trainer.train(_batch(), TEMPERATURE)
    fresh_trainer.train(_batch(), TEMPERATURE)
    for (name, param), (_, restored) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(param, restored), name


def test_resume_from_bf16_weights_keeps_fp32_masters_held_by_the_optimizer(tmp_path):
    """Catches a downcast on resume: bf16 tensors in the checkpoint, or a load that swaps in new
    parameter objects (load_state_dict(assign=True)) which the optimizer would no longer update."""
    model = _multimodal(seed=0)
    trainer = _trainer(model)
    trainer.train(_batch(), TEMPERATURE)
    path = save_checkpoint(
        tmp_path, 1, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, loop_state={}, keep_top_k=None
    )
    _bf16_copy(path)

    fresh = _multimodal(seed=1)
    fresh_trainer = _trainer(fresh)
    params_before = {name: id(p) for name, p in fresh.named_parameters()}
    load_checkpoint(path, model=fresh, optimizer=fresh_trainer.optimizer, scheduler=fresh_trainer.scheduler)

    assert {name: id(p) for name, p in fresh.named_parameters()} == params_before
    held = {id(p) for group in fresh_trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in fresh.parameters() if p.requires_grad}
    for (name, param), (_, restored) in zip(model.named_parameters(), fresh.named_parameters()):
        assert restored.dtype == torch.float32, name
        assert torch.equal(restored, param.to(torch.bfloat16).float()), name
    _assert_same_optimizer_state(trainer.optimizer, fresh_trainer.optimizer)
    fresh_trainer.train(_batch(), TEMPERATURE)  # the fp32-master check passes again
    assert all(p.dtype == torch.float32 for p in fresh.parameters())


def test_resume_with_another_freeze_config_is_refused(tmp_path):
    model = _multimodal(seed=0)
    trainer = _trainer(model)
    trainer.train(_batch(), TEMPERATURE)
    path = save_checkpoint(
        tmp_path, 1, model=model, optimizer=trainer.optimizer, scheduler=trainer.scheduler, loop_state={}, keep_top_k=None
    )
    fresh = _multimodal(seed=1)
    fresh_trainer = _trainer(fresh, FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True))
    with pytest.raises(CheckpointOptimizerMismatchError, match=r"only in this run: \['model.language_model.layers.0."):
        load_checkpoint(path, model=fresh, optimizer=fresh_trainer.optimizer, scheduler=fresh_trainer.scheduler)


# --------------------------------------------------------------------- load_policy from bf16


@pytest.fixture(scope="module")
def bf16_multimodal_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = _multimodal().to(torch.bfloat16)
    path = tmp_path_factory.mktemp("mm_bf16")
    model.save_pretrained(path)
    return path, {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("text_only", [False, True])
def test_load_policy_from_bf16_checkpoint_gives_fp32_masters(bf16_multimodal_checkpoint, text_only):
    path, stored = bf16_multimodal_checkpoint
    assert all(tensor.dtype == torch.bfloat16 for tensor in stored.values())
    model = load_policy(path, text_only=text_only)
    names = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in names.values())
    if text_only:
        assert type(model).__name__ == "Gemma4ForCausalLM"
        expected = {name.replace("model.language_model.", "model."): t for name, t in stored.items() if name.startswith(LANGUAGE)}
    else:
        expected = stored
    assert names.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(names[name], tensor.float()), name
    summary = apply_freeze_config(model, FreezeConfig(freeze_vision_tower=True, freeze_audio_tower=True))
    assert (summary.frozen_parameters == 0) == text_only
    PolicyTrainer(model, POLICY, LossConfig(), total_optimizer_steps=1)  # fp32-master check on the trainable ones


# ----------------------------------------------------------------------------------- build_run


def test_build_run_loads_freezes_checkpoints_and_reports(tiny_checkpoint, tmp_path, capsys):
    cfg = validate_config(
        {
            "policy": {
                "model_name": tiny_checkpoint,
                "device": "cpu",
                "train_global_batch_size": 4,
                "max_total_sequence_length": 32,
                "activation_checkpointing": True,
                "freeze_config": {"freeze_vision_tower": True, "patterns": ["model.layers.0.*"]},
                "generation": {"max_new_tokens": 4},
            },
            "data": {"train": {"type": "arithmetic", "size": 8}},
            "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 2},
            "logger": {"log_dir": str(tmp_path)},
        },
        RecipeConfig,
    )
    parts = build_run(cfg, console=Console())
    assert _frozen(parts.model) == {name for name, _ in parts.model.named_parameters() if name.startswith("model.layers.0.")}
    assert is_activation_checkpointing(parts.model)
    assert not parts.engine.model.training  # the generator's copy never recomputes
    out = capsys.readouterr().out
    assert "trainable" in out and "frozen: pattern 'model.layers.0.*'" in out
    assert "no-op: freeze_vision_tower (Gemma4ForCausalLM has no vision_tower), freeze_audio_tower" in out


# ------------------------------------------------------------------------------------- config


def test_freeze_config_defaults():
    policy = PolicyConfig()
    assert policy.text_only is False and policy.activation_checkpointing is False
    freeze = policy.freeze_config
    assert (freeze.freeze_vision_tower, freeze.freeze_audio_tower, freeze.freeze_language_model) == (False, True, False)
    assert freeze.patterns == []


def test_misspelt_freeze_key_fails_at_load_with_a_suggestion(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(
        f"defaults: {REPO / 'recipes' / 'quickstart.yaml'}\npolicy:\n  freeze_config:\n    freeze_vison_tower: true\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(recipe, RecipeConfig)
    message = str(error.value)
    assert "policy.freeze_config.freeze_vison_tower: unknown key" in message
    assert "did you mean 'freeze_vision_tower'?" in message


SHIPPED = sorted(p for p in (REPO / "recipes").resolve().rglob("*.yaml") if p.parent.name != "twins")  # twins/: overlays


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_freeze_the_towers_for_text_only_training(path):
    """Text recipes freeze both towers; vision recipes (vlm_* and their twins) freeze the audio
    tower and state their choice for the vision tower."""
    freeze = load_config(path, RecipeConfig).policy.freeze_config
    assert freeze.freeze_audio_tower
    stated = load_recipe(path)["policy"]["freeze_config"]  # stated, not left to the defaults
    if path.name.startswith("vlm"):
        assert "freeze_vision_tower" in stated
    else:
        assert freeze.freeze_vision_tower
