"""Trainer vs generator logprobs in bf16 on the real E2B shape (random init), on one GPU.

The generator samples with a KV cache from its own weight copy; the trainer recomputes the same
tokens from fp32 master weights under bf16 autocast, exactly as a GRPO step does. Reports
`token_mult_prob_error` per group of 8 sequences (median, max) and `gen_kl_error` over 4096
sampled tokens, for the two bf16 generator precisions, and writes them to
$POSTTRAIN_RESULTS_DIR (if set) as JSON. benchmarks/gemma4_parity.py breaks the numbers down.

Run through the device tool: `python -m pytest tests/gpu -q -s`.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch
from transformers import Gemma4ForCausalLM

from posttrain.algorithms.mismatch import gen_kl_error, token_mult_prob_error
from posttrain.loops.rollouts import pack_rollouts
from posttrain.loops.setup import GENERATOR_PRECISION
from posttrain.models.gemma4_presets import gemma4_preset_config, temper_random_init_attention
from posttrain.models.logprobs import token_logprobs
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.torch_engine import TorchRolloutEngine

pytestmark = pytest.mark.gpu

NUM_SEQUENCES, GROUP, PROMPT_TOKENS, NEW_TOKENS = 64, 8, 64, 64
# bfloat16_autocast: the trainer's numerics, target below 1.01; bfloat16: NeMo-RL's gate, 1.05.
MEDIAN_TARGET = {"bfloat16_autocast": 1.01, "bfloat16": 1.05}


@pytest.fixture(scope="module")
def e2b():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma4ForCausalLM(gemma4_preset_config("e2b", text_only=True)).float()
    temper_random_init_attention(model)  # untempered random init is chaotic: see its docstring
    return model


@pytest.mark.parametrize("precision", list(MEDIAN_TARGET))
def test_e2b_generator_matches_trainer(e2b, precision):
    gen = torch.Generator().manual_seed(1)
    prompts = [[2] + torch.randint(1000, 200_000, (PROMPT_TOKENS - 1,), generator=gen).tolist() for _ in range(NUM_SEQUENCES)]
    dtype, autocast = GENERATOR_PRECISION[precision]
    engine = TorchRolloutEngine(e2b, pad_token_id=0, dtype=dtype, autocast=autocast, max_batch_size=NUM_SEQUENCES)
    rollouts = engine.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, seed=0))
    del engine

    tme, kl, tokens = [], [], 0
    for start in range(0, NUM_SEQUENCES, GROUP):
        group = rollouts[start : start + GROUP]
        packed = {k: v.cuda() for k, v in pack_rollouts(group, width=PROMPT_TOKENS + NEW_TOKENS, pad_token_id=0).items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            old_BT = torch.nn.functional.pad(token_logprobs(e2b, packed["input_ids"], packed["attention_mask"]), (1, 0))
        mask_BT = packed["response_mask"].float()
        tme.append(token_mult_prob_error(packed["gen_logprobs"], old_BT, mask_BT))
        kl.append(gen_kl_error(packed["gen_logprobs"], old_BT, mask_BT))
        tokens += int(mask_BT.sum())
    result = {
        "model": "gemma4 e2b preset shape (text, random init, attention tempered)",
        "generator": f"posttrain TorchRolloutEngine, policy.generation.dtype={precision}",
        "trainer": "fp32 masters, bf16 autocast, posttrain.models.token_logprobs",
        "sampled_tokens": tokens,
        "groups_of_sequences": len(tme),
        "token_mult_prob_error_median": statistics.median(tme),
        "token_mult_prob_error_max": max(tme),
        "gen_kl_error_mean": statistics.fmean(kl),
        "gen_kl_error_max": max(kl),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
    }
    print("\n" + json.dumps(result, indent=1))
    if out := os.environ.get("POSTTRAIN_RESULTS_DIR"):
        Path(out, f"gemma4_e2b_parity-{precision}.json").write_text(json.dumps(result, indent=1) + "\n")
    assert tokens == NUM_SEQUENCES * NEW_TOKENS  # no stop ids: every row samples NEW_TOKENS
    assert result["token_mult_prob_error_median"] < MEDIAN_TARGET[precision]
