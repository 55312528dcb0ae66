"""A non-Gemma causal LM end to end through the generic family entry: a tiny Qwen3 (transformers'
own implementation, tokenizer trained locally) warm-started and trained with DAPO on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.data.arithmetic import arithmetic_samples
from posttrain.loops.grpo import run_grpo
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.tiny import END_OF_TURN, train_tokenizer

pytestmark = pytest.mark.integration


def save_tiny_qwen3(path, *, max_value: int) -> None:
    samples = arithmetic_samples(500, seed=0, max_value=max_value, operation="max")
    tokenizer = train_tokenizer([f"{s.prompt} {s.ground_truth}" for s in samples] + ["user model"], vocab_size=300)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)],
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_qwen3_runs_the_whole_loop_through_the_generic_family(tmp_path):
    save_tiny_qwen3(tmp_path / "qwen3", max_value=99)
    cfg = load_config(
        QUICKSTART_RECIPE,
        RecipeConfig,
        [
            f"policy.model_name={tmp_path / 'qwen3'}",
            "tiny_model=null",
            f"logger.log_dir={tmp_path / 'run'}",
            "logger.progress=false",
            "warm_start.num_steps=500",
            "grpo.max_num_steps=4",
            "grpo.val_period=4",
        ],
    )
    result = run_grpo(cfg, console=Console(enabled=False))
    steps = [r for r in read_metrics(result.log_dir) if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:  # fp32 generator and trainer: the same logprobs through the generic path
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-3
        assert record["train/gen_kl_error"] < 1e-5
        assert record["train/grad_norm"] > 0
    # the supervised warm start taught the task through the same loading and logprob code
    assert result.validation_accuracy[0] > 0.15, result.validation_accuracy
