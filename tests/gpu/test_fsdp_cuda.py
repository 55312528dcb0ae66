"""FSDP2 over NCCL on two GPUs: two processes, each training on half the rows, take the same
optimizer step as one process on one GPU (loss, gradient norm, gradients, updated weights), and
the rollout engine's weights are refreshed from the shards exactly; the cases of the CPU (gloo)
test, tests/unit/test_fsdp.py.

Run through the device tool on nvidia-h200-x2: `python -m pytest tests/gpu/test_fsdp_cuda.py -q`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from _fsdp_worker import main  # noqa: E402
from test_fsdp import CASES, _free_port, check_two_processes, run_step  # noqa: E402

from posttrain.training.distributed import Distributed  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (nvidia-h200-x2)"),
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_gpus_take_the_one_gpu_step(case, tmp_path):
    expected_metrics, expected_params = run_step(case, Distributed(), device="cuda:0")
    out = tmp_path / "rank0.pt"
    mp.start_processes(main, args=(2, _free_port(), str(out), case, "nccl"), nprocs=2, start_method="spawn")
    check_two_processes(case, torch.load(out, weights_only=True), expected_metrics, expected_params)
