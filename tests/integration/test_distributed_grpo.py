"""The GRPO/DAPO loop on two processes (gloo, CPU), as torchrun would launch it: each rank
generates half of each step's prompts, all ranks see all groups (dynamic sampling decides the
same everywhere), each trains on half the samples with FSDP2, and rank 0 logs."""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.config import RecipeConfig, load_config
from posttrain.loops.grpo import check_distributed_recipe
from posttrain.metrics.logger import read_metrics

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_run_dapo_steps_with_exact_logprobs(tmp_path):
    from _grpo_worker import main  # noqa: PLC0415 (tests/integration is on sys.path)

    overrides = [
        f"logger.log_dir={tmp_path / 'run'}",
        "logger.progress=false",
        "warm_start.num_steps=150",
        "grpo.num_prompts_per_step=16",
        "policy.train_global_batch_size=128",
        "policy.train_micro_batch_size=32",
        "grpo.max_num_steps=3",
        "grpo.val_period=0",
        "grpo.val_at_end=false",
        "checkpointing.enabled=false",
        "checkpointing.export_final=false",
    ]
    mp.start_processes(main, args=(2, _free_port(), overrides), nprocs=2, start_method="spawn")
    records = [r for r in read_metrics(tmp_path / "run") if "train/reward" in r]
    assert [r["step"] for r in records] == [1, 2, 3]  # rank 0 alone logged, once per step
    for record in records:
        # each rank's fp32 engine matches the sharded trainer: the sharding is exact
        assert abs(record["train/token_mult_prob_error"] - 1.0) < 1e-3
        assert record["train/gen_kl_error"] < 1e-5
        # both ranks' samples were generated and gathered: 16 prompts x 8 samples per generation batch
        assert record["train/num_generated_samples"] % (16 * 8) == 0


def test_a_recipe_that_cannot_be_split_fails_before_any_work():
    cfg = load_config(
        QUICKSTART_RECIPE, RecipeConfig, ["grpo.num_prompts_per_step=31", "policy.train_global_batch_size=248", "policy.train_micro_batch_size=8"]
    )
    with pytest.raises(ValueError, match="checkpointing.enabled .*num_prompts_per_step = 31: must divide by 2"):
        check_distributed_recipe(cfg, 2)
