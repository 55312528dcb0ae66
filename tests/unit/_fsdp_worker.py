"""Worker for test_fsdp.py: one rank of a gloo process group, training on its share of the rows."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world_size: int, port: int, out_path: str, case: str, backend: str = "gloo") -> None:
    """`backend` nccl: rank r on GPU r (tests/gpu/test_fsdp_cuda.py)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    sys.path.insert(0, os.path.dirname(__file__))
    from test_fsdp import run_step  # noqa: PLC0415 (the test module defines the shared step)

    from posttrain.training.distributed import init_distributed

    distributed = init_distributed(backend)
    metrics, params = run_step(case, distributed, device=f"cuda:{rank}" if backend == "nccl" else "cpu")
    if rank == 0:
        torch.save({"metrics": metrics, "params": params}, out_path)
    dist.barrier()
    dist.destroy_process_group()
