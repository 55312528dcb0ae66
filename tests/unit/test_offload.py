"""Optimizer-state offload (`policy.optimizer_offload`, training/offload.py): the same updates as
torch's AdamW on the device, its moments in one host buffer streamed through in chunks, and an
exact resume through checkpoints (also from a checkpoint of torch's AdamW)."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma4ForCausalLM

from posttrain.checkpoint.store import load_checkpoint, save_checkpoint
from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig
from posttrain.models.tiny import tiny_gemma4_config
from posttrain.training import offload
from posttrain.training.offload import HostAdamW
from posttrain.training.trainer import PolicyTrainer, TrainBatch

pytestmark = pytest.mark.unit

ROWS, WIDTH = 6, 16


def _batch(seed: int) -> TrainBatch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (ROWS, WIDTH), generator=gen)
    mask = torch.ones_like(ids)
    loss = torch.zeros_like(ids)
    loss[:, WIDTH // 2 :] = 1
    return TrainBatch(ids, mask, loss, torch.linspace(-1, 1, ROWS), -torch.rand(ROWS, WIDTH, generator=gen))


def _trainer(offload: bool) -> PolicyTrainer:
    torch.manual_seed(0)
    model = Gemma4ForCausalLM(tiny_gemma4_config(300, variant="e_series"))
    policy = PolicyConfig(
        precision="float32",
        train_global_batch_size=ROWS,
        train_micro_batch_size=3,
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.1),
        optimizer_offload=offload,
    )
    return PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=4)


def _weights(trainer: PolicyTrainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("chunk", [offload.CHUNK_SCALARS, 1000])  # 1000: most parameters span several chunks
def test_offloaded_steps_equal_on_device_adamw(chunk, monkeypatch):
    monkeypatch.setattr(offload, "CHUNK_SCALARS", chunk)
    plain, offloaded = _trainer(False), _trainer(True)
    assert isinstance(offloaded.optimizer, HostAdamW)
    for seed in range(3):
        expected = plain.train(_batch(seed), temperature=1.0)
        got = offloaded.train(_batch(seed), temperature=1.0)
        assert got["loss"] == expected["loss"] and got["grad_norm"] == expected["grad_norm"]
    moved = 0.0
    initial = _weights(_trainer(False))
    for name, value in _weights(offloaded).items():
        torch.testing.assert_close(value, _weights(plain)[name], rtol=0, atol=0, msg=name)
        moved = max(moved, float((value - initial[name]).abs().max()))
    assert moved > 1e-3  # three steps of lr 1e-3 moved the weights: the comparison is not vacuous
    # the moments equal the on-device ones and are views of the one host buffer
    buffer = offloaded.optimizer._buffer
    trainable = sum(p.numel() for p in offloaded.model.parameters() if p.requires_grad)
    assert buffer.numel() == 2 * trainable
    plain_params = dict(plain.model.named_parameters())
    for name, param in offloaded.model.named_parameters():
        state, expected = offloaded.optimizer.state[param], plain.optimizer.state[plain_params[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], expected[key], rtol=0, atol=0, msg=f"{name} {key}")
            assert state[key].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert float(state["step"]) == float(expected["step"]) == 3


def test_offloaded_optimizer_resumes_exactly(tmp_path):
    reference = _trainer(True)
    for seed in range(3):
        reference.train(_batch(seed), temperature=1.0)

    first = _trainer(True)
    first.train(_batch(0), temperature=1.0)
    path = save_checkpoint(
        tmp_path, 1, model=first.model, optimizer=first.optimizer, scheduler=first.scheduler, loop_state={}, keep_top_k=None
    )
    resumed = _trainer(True)  # fresh weights and host copies: the checkpoint must replace both
    load_checkpoint(path, model=resumed.model, optimizer=resumed.optimizer, scheduler=resumed.scheduler)
    for seed in (1, 2):
        resumed.train(_batch(seed), temperature=1.0)
    for name, value in _weights(resumed).items():
        torch.testing.assert_close(value, _weights(reference)[name], rtol=0, atol=0, msg=name)


def test_offloaded_optimizer_resumes_from_a_plain_adamw_checkpoint(tmp_path):
    """A run that ran out of GPU memory can resume with optimizer_offload turned on."""
    reference = _trainer(False)
    for seed in range(3):
        reference.train(_batch(seed), temperature=1.0)

    first = _trainer(False)
    first.train(_batch(0), temperature=1.0)
    path = save_checkpoint(
        tmp_path, 1, model=first.model, optimizer=first.optimizer, scheduler=first.scheduler, loop_state={}, keep_top_k=None
    )
    resumed = _trainer(True)
    load_checkpoint(path, model=resumed.model, optimizer=resumed.optimizer, scheduler=resumed.scheduler)
    for seed in (1, 2):
        resumed.train(_batch(seed), temperature=1.0)
    for name, value in _weights(resumed).items():
        torch.testing.assert_close(value, _weights(reference)[name], rtol=0, atol=0, msg=name)
