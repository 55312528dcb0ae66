"""The CPU-tested path on a CUDA device: logprob parity (fp32 and bf16) and a short DAPO run.

Run through the device tool: `python -m pytest tests/gpu -q -s` (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from posttrain.algorithms.mismatch import gen_kl_error, token_mult_prob_error
from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.loops.grpo import run_grpo
from posttrain.loops.rollouts import pack_rollouts
from posttrain.metrics.console import Console
from posttrain.metrics.logger import read_metrics
from posttrain.models.loading import load_policy, load_tokenizer, stop_token_ids
from posttrain.models.logprobs import token_logprobs
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.torch_engine import TorchRolloutEngine

pytestmark = pytest.mark.gpu


def mismatch_on_cuda(checkpoint: str, generator_dtype: torch.dtype, trainer_autocast: bool) -> tuple[float, float]:
    model = load_policy(checkpoint).cuda()
    tokenizer = load_tokenizer(checkpoint)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Compute {a}+{b}."}], add_generation_prompt=True, return_dict=True)["input_ids"]
        for a, b in [(1, 2), (37, 48), (5, 99), (60, 7)] * 16
    ]
    engine = TorchRolloutEngine(model, pad_token_id=tokenizer.pad_token_id, dtype=generator_dtype)
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=stop_token_ids(model), seed=0))
    packed = {k: v.cuda() for k, v in pack_rollouts(rollouts, width=64, pad_token_id=tokenizer.pad_token_id).items()}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=trainer_autocast):
        old = torch.nn.functional.pad(token_logprobs(model, packed["input_ids"], packed["attention_mask"]), (1, 0))
    mask = packed["response_mask"].float()
    return (
        token_mult_prob_error(packed["gen_logprobs"], old, mask),
        gen_kl_error(packed["gen_logprobs"], old, mask),
    )


def test_fp32_generator_matches_trainer_on_cuda(tiny_checkpoint):
    tme, kl = mismatch_on_cuda(tiny_checkpoint, torch.float32, trainer_autocast=False)
    print(f"\ncuda fp32: token_mult_prob_error {tme:.6f}, gen_kl_error {kl:.2e}")
    assert abs(tme - 1.0) < 1e-3 and kl < 1e-5


def test_bf16_generator_against_bf16_autocast_trainer_on_cuda(tiny_checkpoint):
    tme, kl = mismatch_on_cuda(tiny_checkpoint, torch.bfloat16, trainer_autocast=True)
    print(f"\ncuda bf16 generator vs bf16-autocast trainer: token_mult_prob_error {tme:.6f}, gen_kl_error {kl:.2e}")
    assert tme < 1.05  # NeMo-RL investigates above 1.05


def test_quickstart_dapo_on_cuda(tmp_path):
    overrides = [f"logger.log_dir={tmp_path}", "logger.progress=false", "policy.device=cuda", "grpo.max_num_steps=30", "grpo.val_period=30"]
    result = run_grpo(load_config(QUICKSTART_RECIPE, RecipeConfig, overrides), console=Console(enabled=False))
    steps = [r for r in read_metrics(tmp_path) if "train/reward" in r]
    print(f"\ncuda quickstart (30 steps): validation/accuracy {result.validation_accuracy}")
    assert len(steps) == 30
    assert all(abs(r["train/token_mult_prob_error"] - 1.0) < 1e-3 for r in steps)
