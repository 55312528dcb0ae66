"""The policy trainer (training/trainer.py): fp32 masters, autocast, micro-batching, metrics."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig, SchedulerConfig
from posttrain.models.loading import load_policy
from posttrain.training.trainer import (
    MasterWeightsError,
    PolicyTrainer,
    TrainBatch,
    aligned_token_logprobs,
    assert_fp32_master_weights,
    lr_multiplier,
)

pytestmark = pytest.mark.unit

TEMPERATURE = 1.0



@pytest.fixture(scope="module")
def base_model(tiny_checkpoint):
    return load_policy(tiny_checkpoint)


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _policy(**overrides) -> PolicyConfig:
    fields = dict(
        precision="float32",
        train_global_batch_size=4,
        train_micro_batch_size=4,
        max_grad_norm=1.0,
        optimizer=OptimizerConfig(lr=1e-3),
    )
    return PolicyConfig(**{**fields, **overrides})


# prompt lengths 3, 4, 2, 5 and response lengths 3, 1, 4, 2: right-padded to 8
PROMPTS = [[2, 4, 40], [2, 4, 41, 5], [2, 4], [2, 4, 60, 61, 5]]
RESPONSES = [[22, 23, 1], [24], [25, 26, 27, 5], [28, 1]]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]


def _batch(gen_logprobs_BT: torch.Tensor | None = None) -> TrainBatch:
    width = max(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))
    ids, attn, loss = [], [], []
    for prompt, response in zip(PROMPTS, RESPONSES):
        pad = width - len(prompt) - len(response)
        ids.append(prompt + response + [0] * pad)
        attn.append([1] * (len(prompt) + len(response)) + [0] * pad)
        loss.append([0] * len(prompt) + [1] * len(response) + [0] * pad)
    input_ids_BT = torch.tensor(ids)
    return TrainBatch(
        input_ids_BT=input_ids_BT,
        attention_mask_BT=torch.tensor(attn),
        loss_mask_BT=torch.tensor(loss),
        advantages_B=torch.tensor(ADVANTAGES),
        gen_logprobs_BT=gen_logprobs_BT if gen_logprobs_BT is not None else torch.zeros(input_ids_BT.shape),
    )


# ------------------------------------------------------------------------------ master weights


def test_assert_fp32_master_weights(model):
    assert_fp32_master_weights(model)  # fp32: fine
    model.to(torch.bfloat16)
    with pytest.raises(MasterWeightsError, match="not float32"):
        assert_fp32_master_weights(model)
    with pytest.raises(MasterWeightsError):
        PolicyTrainer(model, _policy(), LossConfig(), total_optimizer_steps=1)


def test_frozen_bf16_parameters_are_allowed(model):
    model.model.norm.to(torch.bfloat16).requires_grad_(False)
    assert_fp32_master_weights(model)


def test_bf16_autocast_step_keeps_fp32_and_moves_every_parameter(model):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = PolicyTrainer(model, _policy(precision="bfloat16"), LossConfig(), total_optimizer_steps=1)
    metrics = trainer.train(_batch(), TEMPERATURE)
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        assert not torch.equal(param, before[name]), f"{name} did not change"


# -------------------------------------------------------------------------------- lr schedule


@pytest.mark.parametrize(
    ("step", "warmup", "total", "decay", "expected"),
    [
        (0, 4, 10, "constant", 0.25),
        (1, 4, 10, "constant", 0.5),
        (3, 4, 10, "constant", 1.0),
        (9, 4, 10, "constant", 1.0),
        (0, 0, 10, "linear", 1.0),
        (2, 2, 10, "linear", 1.0),  # first step after warm-up: full lr
        (6, 2, 10, "linear", 0.5),  # 1 - 4/8
        (8, 2, 10, "linear", 0.25),  # 1 - 6/8
        (10, 2, 10, "linear", 0.0),
        (12, 2, 10, "linear", 0.0),  # clamped, never negative
        (0, 0, 4, "cosine", 1.0),
        (1, 0, 4, "cosine", 0.5 * (1 + math.cos(math.pi / 4))),  # 0.853553...
        (2, 0, 4, "cosine", 0.5),
        (4, 0, 4, "cosine", 0.0),
        (6, 0, 4, "cosine", 0.0),  # stays at 0 past the end
        (1, 2, 6, "cosine", 1.0),  # warm-up: 2/2
        (4, 2, 6, "cosine", 0.5),  # progress 2/4
    ],
)
def test_lr_multiplier_hand_values(step, warmup, total, decay, expected):
    assert lr_multiplier(step, warmup_steps=warmup, total_steps=total, decay=decay) == pytest.approx(expected, abs=1e-12)


def test_scheduler_applies_warmup_to_the_optimizer(model):
    policy = _policy(optimizer=OptimizerConfig(lr=0.01), scheduler=SchedulerConfig(warmup_steps=4))
    trainer = PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=10)
    first = trainer.train(_batch(), TEMPERATURE)
    second = trainer.train(_batch(), TEMPERATURE)
    assert first["lr"] == pytest.approx(0.0025)
    assert second["lr"] == pytest.approx(0.005)


# ------------------------------------------------------------------------ micro-batch invariance


def _hand_loss() -> float:
    """With one optimizer step per batch the ratio is 1, so the token-level loss is
    -sum_b A_b n_b / sum_b n_b, n_b = response tokens: -(3 - 1 + 2 - 1) / 10 = -0.3."""
    tokens = [len(r) for r in RESPONSES]
    return -sum(a * n for a, n in zip(ADVANTAGES, tokens)) / sum(tokens)


def test_micro_batch_invariance(base_model):
    """Micro-batches 1, 2 and 4 of one global batch of 4: same loss, gradient and update.

    No clipping, so a wrongly scaled gradient shows in grad_norm and in Adam's first moment
    (exp_avg = (1 - beta1) g after one step); Adam's eps is raised to 1e-6 because its first
    update, lr g / (|g| + eps), turns fp32 summation-order noise on gradients near 1e-8 into
    parameter differences near 1e-6 with the default eps.
    """
    policy = dict(max_grad_norm=None, optimizer=OptimizerConfig(lr=1e-3, eps=1e-6))
    params, first_moments, metrics = {}, {}, {}
    for micro in (1, 2, 4):
        model = copy.deepcopy(base_model)
        trainer = PolicyTrainer(model, _policy(train_micro_batch_size=micro, **policy), LossConfig(), total_optimizer_steps=1)
        metrics[micro] = trainer.train(_batch(), TEMPERATURE)
        params[micro] = {name: p.detach().clone() for name, p in model.named_parameters()}
        first_moments[micro] = {name: trainer.optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}

    assert metrics[4]["loss"] == pytest.approx(_hand_loss(), abs=1e-6)
    for micro in (1, 2):
        assert metrics[micro]["loss"] == pytest.approx(metrics[4]["loss"], abs=1e-6)
        assert metrics[micro]["grad_norm"] == pytest.approx(metrics[4]["grad_norm"], rel=1e-5)
        for name, param in params[micro].items():
            expected = first_moments[4][name]  # tolerance: fp32 summation-order noise, ~1e-6 of the scale
            torch.testing.assert_close(
                first_moments[micro][name], expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name
            )
            torch.testing.assert_close(param, params[4][name], rtol=0, atol=1e-6, msg=name)
    # the step did move the weights (the comparison above is not vacuous)
    initial = dict(base_model.named_parameters())
    moved = params[4]["model.layers.0.self_attn.q_proj.weight"] - initial["model.layers.0.self_attn.q_proj.weight"]
    assert moved.abs().max() > 1e-4


def test_sequence_level_loss_hand_value(model):
    """token_level_loss false: mean over sequences of each sequence's mean: -(1 - 1 + .5 - .5) / 4 = 0."""
    trainer = PolicyTrainer(model, _policy(train_micro_batch_size=1), LossConfig(token_level_loss=False), total_optimizer_steps=1)
    assert trainer.train(_batch(), TEMPERATURE)["loss"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------- mismatch metrics


def _own_logprobs(model, batch: TrainBatch) -> torch.Tensor:
    with torch.no_grad():
        lp_BT = aligned_token_logprobs(model, batch, TEMPERATURE)
    return lp_BT * batch.loss_mask_BT


def test_token_mult_prob_error_is_one_when_engine_agrees(model):
    batch = _batch()
    batch.gen_logprobs_BT = _own_logprobs(model, batch)
    trainer = PolicyTrainer(model, _policy(), LossConfig(), total_optimizer_steps=1)
    metrics = trainer.train(batch, TEMPERATURE)
    assert metrics["token_mult_prob_error"] == 1.0
    assert metrics["gen_kl_error"] == pytest.approx(0.0, abs=1e-7)


def test_token_mult_prob_error_with_constant_shift(model):
    batch = _batch()
    batch.gen_logprobs_BT = _own_logprobs(model, batch) + 0.1 * batch.loss_mask_BT
    trainer = PolicyTrainer(model, _policy(train_micro_batch_size=2), LossConfig(), total_optimizer_steps=1)
    metrics = trainer.train(batch, TEMPERATURE)
    # every valid token: exp(|0.1|); k3 with logr = -0.1: exp(-0.1) - 1 + 0.1
    assert metrics["token_mult_prob_error"] == pytest.approx(math.exp(0.1), abs=1e-6)
    assert metrics["gen_kl_error"] == pytest.approx(math.exp(-0.1) - 0.9, abs=1e-6)


# ---------------------------------------------------------------------------- optimizer steps


def test_two_global_batches_make_two_optimizer_steps(model):
    batch = _batch()
    batch.gen_logprobs_BT = _own_logprobs(model, batch) + 0.1 * batch.loss_mask_BT
    trainer = PolicyTrainer(model, _policy(train_global_batch_size=2, train_micro_batch_size=1), LossConfig(), total_optimizer_steps=2)
    metrics = trainer.train(batch, TEMPERATURE)
    assert trainer.scheduler.last_epoch == 2
    steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {2.0}
    # old logprobs come from the weights before the first step, so the shift is still exactly 0.1
    assert metrics["token_mult_prob_error"] == pytest.approx(math.exp(0.1), abs=1e-6)
    # step 1: rows 0, 1 -> -(3 - 1) / 4; step 2: rows 2, 3 -> -(2 - 1) / 6; ratio != 1 in step 2
    # only through the first update, so the mean loss is near (-0.5 - 1/6) / 2
    assert metrics["loss"] == pytest.approx((-0.5 - 1 / 6) / 2, abs=0.05)


# ------------------------------------------------------------------------------- KL penalty


def test_kl_penalty_needs_a_reference_model(model):
    with pytest.raises(ValueError, match="reference model"):
        PolicyTrainer(model, _policy(), LossConfig(reference_policy_kl_penalty=0.1), total_optimizer_steps=1)


def test_kl_penalty_against_a_different_reference(model, base_model):
    """The k3 penalty the trainer reports equals one computed by hand from both models' logprobs."""
    reference = copy.deepcopy(base_model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch()
    mask_BT = batch.loss_mask_BT.float()
    lp_BT = _own_logprobs(model, batch)
    ref_BT = _own_logprobs(reference, batch)
    log_r = (ref_BT - lp_BT).clamp(-20, 20)
    expected_k3 = float((((log_r.exp() - 1 - log_r).clamp(-10, 10)) * mask_BT).sum() / mask_BT.sum())
    assert expected_k3 > 1e-6  # the perturbation really moved the reference

    loss_cfg = LossConfig(reference_policy_kl_penalty=0.1, reference_policy_kl_type="k3")
    trainer = PolicyTrainer(model, _policy(), loss_cfg, total_optimizer_steps=1, reference_model=reference)
    metrics = trainer.train(batch, TEMPERATURE)
    assert metrics["kl_penalty"] == pytest.approx(expected_k3, rel=1e-4)


def test_no_reference_forward_when_beta_is_zero(model, base_model):
    trainer = PolicyTrainer(model, _policy(), LossConfig(), total_optimizer_steps=1, reference_model=base_model)
    assert trainer.reference_model is None
    assert trainer.train(_batch(), TEMPERATURE)["kl_penalty"] == 0.0


@pytest.mark.parametrize(
    ("packing", "micro_rows", "micro_tokens"),
    [(True, 4, None), (True, 4, 12), (False, 4, 12), (True, 1, None), (True, 2, 7)],
)
def test_packing_and_token_budgets_give_the_padded_step(base_model, packing, micro_rows, micro_tokens):
    """Sequence packing (one packed row per micro-batch) and micro-batches by token budget (row
    lengths 6, 5, 6, 7) give the padded full-batch step's loss, gradient norm and update."""
    policy = dict(max_grad_norm=None, optimizer=OptimizerConfig(lr=1e-3, eps=1e-6))
    results = {}
    for key, overrides in (
        ("padded", {}),
        ("candidate", dict(sequence_packing=packing, train_micro_batch_size=micro_rows, train_micro_batch_tokens=micro_tokens)),
    ):
        model = copy.deepcopy(base_model)
        trainer = PolicyTrainer(model, _policy(**policy, **overrides), LossConfig(), total_optimizer_steps=1)
        metrics = trainer.train(_batch(), TEMPERATURE)
        gradients = {name: trainer.optimizer.state[p]["exp_avg"] / 0.1 for name, p in model.named_parameters()}
        results[key] = metrics, {name: p.detach().clone() for name, p in model.named_parameters()}, gradients
    (padded, padded_params, padded_grads), (candidate, candidate_params, candidate_grads) = results.values()
    assert candidate["loss"] == pytest.approx(padded["loss"], abs=1e-6)
    assert candidate["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-5)
    for name, grad in candidate_grads.items():  # fp32 summation-order noise is ~1e-6 of a gradient's scale
        expected = padded_grads[name]
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)
    for name, param in candidate_params.items():
        # Adam's first step moves a weight by lr * g / (|g| + eps) (lr 1e-3, eps 1e-6): elements whose
        # gradient sits at the fp32 noise floor (~1e-8) may land up to lr * 1e-2 = 1e-5 apart
        torch.testing.assert_close(param, padded_params[name], rtol=0, atol=1e-5, msg=name)
    moved = padded_params["model.layers.0.mlp.up_proj.weight"] - dict(base_model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert moved.abs().max() > 1e-4  # the step did move the weights


def test_compiled_layers_give_the_eager_step(base_model):
    """`policy.compile`: every decoder layer under torch.compile (inductor, CPU here) takes the eager
    step: same loss, gradients within fp32 reordering noise of their scale."""
    results = {}
    for compiled in (False, True):
        model = copy.deepcopy(base_model)
        policy = _policy(max_grad_norm=None, optimizer=OptimizerConfig(lr=1e-3, eps=1e-6), compile=compiled)
        trainer = PolicyTrainer(model, policy, LossConfig(), total_optimizer_steps=1)
        metrics = trainer.train(_batch(), TEMPERATURE)
        gradients = {name: trainer.optimizer.state[p]["exp_avg"] / 0.1 for name, p in model.named_parameters()}
        results[compiled] = metrics, gradients
    (eager, eager_grads), (compiled, compiled_grads) = results[False], results[True]
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-6)
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-4)
    for name, grad in compiled_grads.items():
        expected = eager_grads[name]
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()), msg=name)
