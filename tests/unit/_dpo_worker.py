"""Worker for test_dpo.py: one rank of a gloo process group taking its share of a DPO step."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world_size: int, port: int, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    sys.path.insert(0, os.path.dirname(__file__))
    from test_dpo import distributed_dpo_step  # noqa: PLC0415 (the test module defines the shared step)

    from posttrain.training.distributed import init_distributed

    result = distributed_dpo_step(init_distributed("gloo"))
    if rank == 0:
        torch.save(result, out_path)
    dist.barrier()
    dist.destroy_process_group()
