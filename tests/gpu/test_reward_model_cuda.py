"""The reward-model environment on its own CUDA device: the same scores as on CPU.

Run through the device tool: `python -m pytest tests/gpu -q -s`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from posttrain.environments import build

pytestmark = pytest.mark.gpu


def test_reward_model_on_cuda_scores_like_cpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))  # the unit tests' tiny reward model
    from test_reward_envs import PROMPTS, RESPONSES, save_tiny_reward_model

    path = save_tiny_reward_model(tmp_path / "rm")
    metadata = [{"ground_truth": None, "origin": f"test:{i}"} for i in range(len(PROMPTS))]
    cpu = build("reward_model", model=str(path), device="cpu", batch_size=4).score(PROMPTS, RESPONSES, metadata)
    env = build("reward_model", model=str(path), device="cuda:0", batch_size=4)
    assert {p.device.type for p in env.model.parameters()} == {"cuda"}
    cuda = env.score(PROMPTS, RESPONSES, metadata)
    print(f"\nreward model cpu {[round(x, 4) for x in cpu]} cuda {[round(x, 4) for x in cuda]}")
    torch.testing.assert_close(torch.tensor(cuda), torch.tensor(cpu), rtol=1e-4, atol=1e-4)
