"""Worker for test_distributed_grpo.py: one rank of a gloo process group running the GRPO loop."""

from __future__ import annotations

import os


def main(rank: int, world_size: int, port: int, overrides: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    import torch.distributed as dist  # noqa: PLC0415

    from posttrain.cli.main import QUICKSTART_RECIPE  # noqa: PLC0415
    from posttrain.config import RecipeConfig, load_config  # noqa: PLC0415
    from posttrain.loops.grpo import run_grpo  # noqa: PLC0415
    from posttrain.metrics.console import Console  # noqa: PLC0415

    cfg = load_config(QUICKSTART_RECIPE, RecipeConfig, overrides)
    run_grpo(cfg, console=Console(enabled=False))
    dist.barrier()
    dist.destroy_process_group()
