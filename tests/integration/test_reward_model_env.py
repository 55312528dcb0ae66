"""End to end on CPU: the quickstart's DAPO loop with a reward model as the environment.

The reward model is a random-init tiny Qwen3 sequence classifier with its own tokenizer (Gemma 4
chat format), saved locally; its scores are continuous, so dynamic sampling and the [0, 1]
reward scaling of the quickstart are off.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForSequenceClassification

import posttrain.loops.setup as setup
from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.data.arithmetic import arithmetic_samples
from posttrain.environments import RewardModelEnvironment, build
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.tiny import train_tokenizer

pytestmark = pytest.mark.integration


def save_tiny_reward_model(path) -> None:
    samples = arithmetic_samples(300, seed=1, operation="max")
    tokenizer = train_tokenizer([f"{s.prompt} {s.ground_truth}" for s in samples] + ["user model"], vocab_size=300)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_dapo_with_a_reward_model_environment(tmp_path, monkeypatch):
    rm_dir = tmp_path / "rm"
    save_tiny_reward_model(rm_dir)
    built = []

    def build_and_keep(name, **options):  # the run's environment, to inspect after the run
        environment = build(name, **options)
        built.append(environment)
        return environment

    monkeypatch.setattr(setup, "build", build_and_keep)
    cfg = load_config(
        QUICKSTART_RECIPE,
        RecipeConfig,
        [
            f"logger.log_dir={tmp_path / 'run'}",
            "logger.progress=false",
            "env.name=reward_model",
            f"env.options={{model: {rm_dir}, device: cpu, batch_size: 64}}",
            "grpo.reward_scaling.enabled=false",  # it clamps to [0, 1]; reward-model scores are unbounded
            "grpo.use_dynamic_sampling=false",
            "warm_start.num_steps=20",
            "grpo.max_num_steps=3",
            "grpo.val_period=0",
            "grpo.val_at_start=false",
            "grpo.max_val_samples=16",  # validated once, after the last step
        ],
    )
    run_grpo(cfg, console=Console(enabled=False))

    steps = [r for r in read_metrics(tmp_path / "run") if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert math.isfinite(record["train/reward"])
        assert record["env/scored"] == 256.0 and record["env/verifier_errors"] == 0.0
        assert record["train/grad_norm"] > 0  # rewards differ within groups: non-zero advantages
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-3  # fp32 generator and trainer
        assert record["train/gen_kl_error"] < 1e-5
    assert len({r["train/reward"] for r in steps}) == 3  # continuous rewards: no two steps alike
    assert math.isfinite(steps[-1]["validation/mean_reward"])

    [environment] = [e for e in built if isinstance(e, RewardModelEnvironment)]
    saved = load_file(rm_dir / "model.safetensors")
    live = environment.model.state_dict()
    assert all(torch.equal(live[key], saved[key]) for key in saved)  # the reward model never changed
    assert not environment.model.training and not any(p.requires_grad for p in environment.model.parameters())
