"""Non-finite steps (training/trainer.py, loops/grpo.py): skipped whole, counted, and a stop after N in a row."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig, SchedulerConfig
from posttrain.loops.grpo import check_nonfinite_streak
from posttrain.models.loading import load_policy
from posttrain.training.trainer import NonFiniteTrainingError, PolicyTrainer, TrainBatch

pytestmark = pytest.mark.unit

TEMPERATURE = 1.0


@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    return load_policy(tiny_checkpoint)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _trainer(model, **overrides) -> PolicyTrainer:
    fields = dict(precision="float32", train_global_batch_size=4, train_micro_batch_size=2, optimizer=OptimizerConfig(lr=1e-3))
    return PolicyTrainer(model, PolicyConfig(**{**fields, **overrides}), LossConfig(), total_optimizer_steps=10)


def _batch(advantages: list[float], rows: int = 4) -> TrainBatch:
    """`rows` samples of a 3-token prompt and a 3-token response; advantages repeat to `rows`."""
    ids_BT = torch.tensor([[2, 4, 40 + b, 22 + b, 23, 1] for b in range(rows)])
    loss_BT = torch.tensor([[0, 0, 0, 1, 1, 1]] * rows)
    return TrainBatch(
        input_ids_BT=ids_BT,
        attention_mask_BT=torch.ones_like(ids_BT),
        loss_mask_BT=loss_BT,
        advantages_B=torch.tensor([advantages[b % len(advantages)] for b in range(rows)]),
        gen_logprobs_BT=torch.zeros(ids_BT.shape),
    )


GOOD = [1.0, -1.0, 0.5, -0.5]
NAN = [1.0, -1.0, float("nan"), -0.5]  # one bad sample, in the second micro-batch


def _snapshot(trainer: PolicyTrainer) -> tuple[dict[str, torch.Tensor], dict]:
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return weights, copy.deepcopy(trainer.optimizer.state_dict())


def _assert_unchanged(trainer: PolicyTrainer, before: tuple[dict[str, torch.Tensor], dict]) -> None:
    weights, optimizer_state = before
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, weights[name]), name  # bit for bit
    now = trainer.optimizer.state_dict()
    assert now["state"].keys() == optimizer_state["state"].keys()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(now["state"][index][key], value), (index, key)
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing left to leak into the next step


def test_nan_loss_skips_the_step_and_leaves_weights_and_optimizer_untouched(model):
    trainer = _trainer(model)
    first = trainer.train(_batch(GOOD), TEMPERATURE)  # a real step first: Adam has moments to protect
    assert first["skipped_nonfinite_steps"] == 0.0 and first["consecutive_nonfinite_steps"] == 0.0
    before = _snapshot(trainer)

    metrics = trainer.train(_batch(NAN), TEMPERATURE)
    assert metrics["skipped_nonfinite_steps"] == 1.0
    assert metrics["consecutive_nonfinite_steps"] == 1.0
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["grad_norm"])
    _assert_unchanged(trainer, before)
    assert trainer.scheduler.last_epoch == 2  # the schedule counts attempted steps


def test_nonfinite_gradient_with_a_finite_loss_is_skipped(model):
    trainer = _trainer(model)
    trainer.train(_batch(GOOD), TEMPERATURE)
    before = _snapshot(trainer)
    handle = model.model.layers[0].mlp.up_proj.weight.register_hook(lambda grad: grad * float("inf"))
    metrics = trainer.train(_batch(GOOD), TEMPERATURE)
    handle.remove()
    assert math.isfinite(metrics["loss"]) and not math.isfinite(metrics["grad_norm"])
    assert metrics["skipped_nonfinite_steps"] == 1.0
    _assert_unchanged(trainer, before)


def test_a_skipped_step_leaves_no_trace_in_the_next_one(base_model):
    """bad, good == good: no gradient of the skipped step is carried into the next update (constant lr)."""
    skipped, clean = _trainer(copy.deepcopy(base_model)), _trainer(copy.deepcopy(base_model))
    skipped.train(_batch(NAN), TEMPERATURE)
    after_skip = skipped.train(_batch(GOOD), TEMPERATURE)
    reference = clean.train(_batch(GOOD), TEMPERATURE)
    assert after_skip["consecutive_nonfinite_steps"] == 0.0  # a good step ends the streak
    assert after_skip["loss"] == reference["loss"] and after_skip["grad_norm"] == reference["grad_norm"]
    for (name, a), b in zip(skipped.model.named_parameters(), clean.model.parameters()):
        assert torch.equal(a, b), name


def test_counts_per_optimizer_step_within_one_rl_step(model):
    """Two optimizer steps per batch: the count is a sum (not a mean) and the streak runs across calls."""
    trainer = _trainer(model, train_global_batch_size=2, train_micro_batch_size=1)
    nan_then_good = _batch([float("nan"), 1.0, 0.5, -0.5])
    metrics = trainer.train(nan_then_good, TEMPERATURE)
    assert metrics["skipped_nonfinite_steps"] == 1.0 and metrics["consecutive_nonfinite_steps"] == 0.0
    all_nan = _batch([float("nan")])
    assert trainer.train(all_nan, TEMPERATURE)["skipped_nonfinite_steps"] == 2.0
    assert trainer.train(all_nan, TEMPERATURE)["consecutive_nonfinite_steps"] == 4.0


def test_streak_below_the_limit_passes(tmp_path):
    check_nonfinite_streak(0, 3, step=5, checkpoint_dir=tmp_path)
    check_nonfinite_streak(2, 3, step=5, checkpoint_dir=tmp_path)


def test_streak_at_the_limit_stops_with_advice(tmp_path):
    with pytest.raises(NonFiniteTrainingError) as error:
        check_nonfinite_streak(3, 3, step=7, checkpoint_dir=tmp_path / "checkpoints")
    message = str(error.value)
    assert "step 7" in message and "grpo.max_consecutive_nonfinite_steps: 3" in message
    assert "no checkpoint was saved yet" in message
    for advice in ("policy.optimizer.lr", "policy.max_grad_norm", "data", "policy.precision: float32"):
        assert advice in message


# --------------------------------------------------------------- resuming with changed settings


def test_resume_with_a_lower_lr_uses_it_at_the_same_schedule_position(base_model):
    """Loading an optimizer's state restores the lr it was saved with; `apply_optimizer_config`
    puts this run's settings back, so the advice "lower the lr and resume" does something."""
    policy = dict(precision="float32", train_global_batch_size=4, train_micro_batch_size=4, max_grad_norm=1.0)

    def trainer(lr: float) -> PolicyTrainer:
        cfg = PolicyConfig(**policy, optimizer=OptimizerConfig(lr=lr), scheduler=SchedulerConfig(warmup_steps=4))
        return PolicyTrainer(copy.deepcopy(base_model), cfg, LossConfig(), total_optimizer_steps=10)

    saved = trainer(1e-3)
    saved.train(_batch(GOOD), TEMPERATURE)  # warm-up step 1 of 4: next lr is 2/4 of the peak
    state = (copy.deepcopy(saved.optimizer.state_dict()), copy.deepcopy(saved.scheduler.state_dict()))

    same = trainer(1e-3)
    same.optimizer.load_state_dict(state[0])
    same.scheduler.load_state_dict(state[1])
    groups_before = copy.deepcopy(same.optimizer.param_groups[0])
    assert same.apply_optimizer_config() == []
    assert {k: v for k, v in same.optimizer.param_groups[0].items() if k != "params"} == {
        k: v for k, v in groups_before.items() if k != "params"
    }

    lower = trainer(1e-4)
    lower.optimizer.load_state_dict(state[0])
    lower.scheduler.load_state_dict(state[1])
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # the checkpoint's, without the fix
    assert lower.apply_optimizer_config() == ["lr 0.001 -> 0.0001"]
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert lower.train(_batch(GOOD), TEMPERATURE)["lr"] == pytest.approx(5e-5)
    assert lower.scheduler.get_last_lr()[0] == pytest.approx(7.5e-5)  # step 3 of 4 of the new peak
