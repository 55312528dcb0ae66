"""FSDP2 data parallelism on CPU (gloo): two processes, each training on half the rows, take the
same optimizer step as one process on all of them (loss, gradient norm, updated weights), for
padded and packed micro-batches, different micro-batch x accumulation splits, KV-shared layers and
grouped MoE experts; the rollout
engine's weights are refreshed from the shards exactly."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import Gemma4ForCausalLM

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig
from posttrain.models.loading import use_grouped_experts
from posttrain.models.tiny import tiny_gemma4_config
from posttrain.rollout.continuous_engine import ContinuousBatchingEngine
from posttrain.training.distributed import Distributed
from posttrain.training.trainer import PolicyTrainer, TrainBatch

pytestmark = pytest.mark.unit

ROWS, WIDTH = 8, 20
CASES = {
    # name: (policy overrides, micro-batch rows in one process, per rank with two processes)
    "padded": ({}, 2, 2),
    "packed": ({"sequence_packing": True}, 4, 1),
    "e_series": ({}, 8, 4),  # KV-shared layers across FSDP units
    "moe": ({}, 4, 2),  # experts as grouped GEMMs, sharded
    # bf16 gathers vs the one-process bf16 autocast: bf16 norms and residual stream, so close, not equal
    "bf16_gathers": ({"fsdp_param_dtype": "bfloat16", "precision": "bfloat16"}, 4, 2),
    "optimizer_offload": ({"optimizer_offload": True}, 4, 2),  # AdamW on each rank's host copy of its shards
    "parameter_offload": ({"parameter_offload": True}, 4, 2),  # shards, gradients and AdamW in host memory
}

VARIANTS = {"e_series": "e_series", "moe": "moe"}


def _batch() -> TrainBatch:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, WIDTH + 1, (ROWS,), generator=gen).tolist()
    ids = torch.zeros(ROWS, WIDTH, dtype=torch.long)
    attention = torch.zeros(ROWS, WIDTH, dtype=torch.long)
    loss = torch.zeros(ROWS, WIDTH, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, 300, (length,), generator=gen)
        attention[row, :length] = 1
        loss[row, length // 2 : length] = 1  # the second half is the "response"
    return TrainBatch(ids, attention, loss, torch.linspace(-1, 1, ROWS), torch.zeros(ROWS, WIDTH))


def run_step(case: str, distributed: Distributed, device: str = "cpu") -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One optimizer step of `case` on this rank's rows; returns metrics and the full weights (on CPU)."""
    overrides, single_micro, rank_micro = CASES[case]
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant=VARIANTS.get(case, "basic"))).to(device)
    use_grouped_experts(model)  # as load_policy does
    fields = dict(
        precision="float32",
        train_global_batch_size=ROWS // distributed.world_size,
        train_micro_batch_size=rank_micro if distributed.enabled else single_micro,
        max_grad_norm=None,
        optimizer=OptimizerConfig(lr=1e-3, eps=1e-6),
    )
    if not distributed.enabled:  # the reference is the plain one-process step (parameter offload needs FSDP2)
        overrides = {k: v for k, v in overrides.items() if k != "parameter_offload"}
    policy = PolicyConfig(**{**fields, **overrides})
    engine = ContinuousBatchingEngine(model, pad_token_id=0, precision="bfloat16_autocast")  # before sharding
    trainer = PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=1, distributed=distributed)
    share = ROWS // distributed.world_size
    batch = _batch().rows(distributed.rank * share, (distributed.rank + 1) * share)
    metrics = trainer.train(batch, temperature=0.9)
    engine.refresh_weights(trainer.model.named_parameters())  # gathers the shards in bf16
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()  # noqa: E731
    params = {name: full(param) for name, param in trainer.model.named_parameters()}
    # Adam's first moment after one step is (1 - beta1) * gradient: the gradient, gathered
    if policy.parameter_offload:  # compute stays on the model's device, the shards moved to the host
        assert all(p.to_local().device.type == "cpu" for p in trainer.model.parameters())
    if policy.optimizer_offload:  # the moments are host copies of this rank's shards: compare the weights only
        moments = {}
    else:
        moments = {f"grad/{name}": full(trainer.optimizer.state[p]["exp_avg"]) / 0.1 for name, p in trainer.model.named_parameters()}
    engine_params = dict(engine.model.named_parameters())
    metrics["refresh_max_error"] = max(
        float((engine_params[name].float().cpu() - params[name].to(engine_params[name].dtype).float()).abs().max())
        for name in params
    )
    return metrics, {**params, **moments}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_take_the_one_process_step(case, tmp_path):
    expected_metrics, expected_params = run_step(case, Distributed())
    out = tmp_path / "rank0.pt"
    sys.path.insert(0, str(Path(__file__).parent))
    from _fsdp_worker import main  # noqa: PLC0415

    mp.start_processes(main, args=(2, _free_port(), str(out), case), nprocs=2, start_method="spawn")
    check_two_processes(case, torch.load(out, weights_only=True), expected_metrics, expected_params)


def check_two_processes(case: str, got: dict, expected_metrics: dict, expected_params: dict) -> None:
    """Rank 0's saved step against the one-process step (also used by tests/gpu/test_fsdp_cuda.py)."""
    bf16 = case == "bf16_gathers"
    assert got["metrics"]["refresh_max_error"] == expected_metrics["refresh_max_error"] == 0.0  # bit-exact copies
    # the first step's loss is -sum(A n) / N whatever the logprobs (ratio 1): the gradient carries the test
    assert got["metrics"]["loss"] == pytest.approx(expected_metrics["loss"], abs=1e-6)
    assert got["metrics"]["grad_norm"] == pytest.approx(expected_metrics["grad_norm"], rel=5e-2 if bf16 else 1e-5)
    if bf16:
        return  # Adam's first step is about lr * sign(g): bf16 rounding flips signs of small gradients
    assert got["params"].keys() == expected_params.keys()
    for name, value in got["params"].items():
        expected = expected_params[name]
        if name.startswith("grad/"):  # gradients: fp32 summation-order noise is ~1e-6 of their scale
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)
        else:  # Adam's first step, lr * g / (|g| + eps), magnifies noise-floor gradients (~1e-8) up to lr / 10
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-4, msg=name)
    torch.manual_seed(0)
    initial = Gemma4ForCausalLM(tiny_gemma4_config(300, variant=VARIANTS.get(case, "basic")))
    moved = max(float((expected_params[n] - p).abs().max()) for n, p in initial.named_parameters())
    assert moved > 5e-4  # the step moved the weights by about lr: the comparison is not vacuous


def test_parameter_offload_needs_torchrun_and_replaces_optimizer_offload():
    model = Gemma4ForCausalLM(tiny_gemma4_config(300))
    with pytest.raises(ValueError, match="launch with torchrun"):
        PolicyTrainer(model, PolicyConfig(parameter_offload=True), LossConfig(), total_optimizer_steps=1)
    with pytest.raises(ValueError, match="set optimizer_offload: false"):
        PolicyConfig(parameter_offload=True, optimizer_offload=True)
