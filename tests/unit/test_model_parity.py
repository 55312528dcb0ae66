"""Every model variant, exactly right: posttrain's logprobs and generator against transformers' own.

For each tiny variant (Gemma 4 basic, dense 31B-like, MoE 26B-like, E-series, multimodal; a
Qwen3 through the generic family), in fp32 on CPU:
- `token_logprobs` equals log_softmax of transformers' own (softcapped) logits, with left padding,
  with and without activation checkpointing, and its gradients equal the reference's;
- the generator's logprobs for the tokens it sampled equal `token_logprobs` on those sequences;
- greedy generation equals transformers' `generate`.
Sequences are longer than the variants' sliding windows, so bounded sliding caches are exercised.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from posttrain.models.activation_checkpointing import enable_activation_checkpointing, is_activation_checkpointing
from posttrain.models.logprobs import position_ids_from_mask, token_logprobs
from posttrain.models.registry import family_for
from posttrain.models.tiny import tiny_gemma4_config, tiny_gemma4_multimodal_config
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.torch_engine import TorchRolloutEngine

pytestmark = pytest.mark.unit

VOCAB = 320
PAD = 0
TEMPERATURE = 0.7
TOL = {"rtol": 0, "atol": 1e-5}  # fp32
VARIANTS = ["basic", "dense", "moe", "e_series", "multimodal", "qwen3"]


def _build(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "qwen3":
        config = Qwen3Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            pad_token_id=PAD,
        )
        model = Qwen3ForCausalLM(config)
    elif variant == "multimodal":
        model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(tiny_gemma4_config(VOCAB, variant="dense")))
    else:
        model = Gemma4ForCausalLM(tiny_gemma4_config(VOCAB, variant=variant))
    _spread_logits(model)
    return model.eval()


@torch.no_grad()
def _spread_logits(model: torch.nn.Module) -> None:
    """Random-init logits are nearly uniform; widen them (final norm x5: raw logits of ~5) so that the
    softcap moves logprobs by far more than the tolerance, without fp32 noise of huge logits."""
    model.get_decoder().norm.weight.mul_(5.0)


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return _build(request.param)


def _random_rows(lengths: list[int], seed: int) -> list[list[int]]:
    """Token rows that avoid special and multimodal placeholder ids."""
    gen = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(10, VOCAB - 40, (n - 1,), generator=gen).tolist() for n in lengths]


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids_BT = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask_BT = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids_BT, mask_BT


def _reference_logprobs(model, ids_BT, mask_BT, temperature) -> torch.Tensor:
    """log_softmax of transformers' own forward logits (softcap included by transformers), [B, T-1]."""
    extra = {}
    if family_for(model.config).is_multimodal(model.config):
        extra["mm_token_type_ids"] = torch.zeros_like(ids_BT)
    logits_BTV = model(
        input_ids=ids_BT, attention_mask=mask_BT, position_ids=position_ids_from_mask(mask_BT), use_cache=False, **extra
    ).logits
    logprobs_BTV = torch.log_softmax(logits_BTV[:, :-1].float() / temperature, dim=-1)
    return logprobs_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def test_softcap_moves_logprobs_far_beyond_the_tolerance(model):
    """Precondition for the parity tests to check the softcap: without it, logprobs move by > 20x the tolerance."""
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap is None:
        pytest.skip("no final-logit softcap in this family")
    ids_BT, mask_BT = _left_padded(_random_rows([16], seed=0))
    hidden_BTH = model.base_model(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state
    raw_BTV = model.get_output_embeddings()(hidden_BTH)[:, :-1] / TEMPERATURE
    uncapped_BT1 = torch.log_softmax(raw_BTV, -1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    got_BT1 = token_logprobs(model, ids_BT, mask_BT, temperature=TEMPERATURE)
    assert (got_BT1 - uncapped_BT1).abs().max() > 20 * TOL["atol"]


@torch.no_grad()
def test_token_logprobs_equal_transformers_forward_with_left_padding(model):
    rows = _random_rows([24, 17, 9], seed=1)
    ids_BT, mask_BT = _left_padded(rows)
    got_BT1 = token_logprobs(model, ids_BT, mask_BT, temperature=TEMPERATURE)
    expected_BT1 = _reference_logprobs(model, ids_BT, mask_BT, TEMPERATURE)
    real_BT1 = mask_BT[:, :-1].bool() & mask_BT[:, 1:].bool()
    torch.testing.assert_close(got_BT1[real_BT1], expected_BT1[real_BT1], **TOL)
    # and each left-padded row equals the same sequence alone, unpadded
    for row, seq in enumerate(rows):
        alone_T1 = _reference_logprobs(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long), TEMPERATURE)
        torch.testing.assert_close(got_BT1[row, ids_BT.shape[1] - len(seq) :], alone_T1[0], **TOL)


def _logprobs_and_grads(model, ids_BT, mask_BT, *, reference: bool):
    model.zero_grad(set_to_none=True)
    logprobs_BT1 = (_reference_logprobs if reference else _ours)(model, ids_BT, mask_BT, TEMPERATURE)
    weights_BT1 = mask_BT[:, 1:].float() * torch.linspace(0.5, 1.5, logprobs_BT1.shape[1])
    (logprobs_BT1 * weights_BT1).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs_BT1.detach(), grads


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|: fp32 summation-order noise is ~1e-7 of a tensor's
    scale, but single elements that are sums of cancelling terms can differ by far more than their
    own size (posttrain's chunked head sums the tied embedding's gradient in another order than
    autograd through full logits)."""
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def _ours(model, ids_BT, mask_BT, temperature):
    return token_logprobs(model, ids_BT, mask_BT, temperature=temperature)


def test_logprobs_and_gradients_with_activation_checkpointing_equal_the_reference(model):
    ids_BT, mask_BT = _left_padded(_random_rows([22, 14], seed=2))
    reference = copy.deepcopy(model).train()
    expected_BT1, expected_grads = _logprobs_and_grads(reference, ids_BT, mask_BT, reference=True)

    plain = copy.deepcopy(model).train()
    checkpointed = copy.deepcopy(model).train()
    enable_activation_checkpointing(checkpointed)
    assert is_activation_checkpointing(checkpointed) and not is_activation_checkpointing(plain)
    real_BT1 = mask_BT[:, 1:].bool()
    for candidate in (plain, checkpointed):
        got_BT1, grads = _logprobs_and_grads(candidate, ids_BT, mask_BT, reference=False)
        torch.testing.assert_close(got_BT1[real_BT1], expected_BT1[real_BT1], **TOL)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert _relative_error(grad, expected_grads[name]) < 1e-5, name


def test_generator_logprobs_equal_token_logprobs(model):
    prompts = _random_rows([14, 7, 11, 5], seed=3)
    engine = TorchRolloutEngine(model, pad_token_id=PAD, dtype=torch.float32)
    params = SamplingParams(temperature=TEMPERATURE, max_new_tokens=12, seed=7)
    rollouts = engine.generate(prompts, params)
    assert sum(len(r.token_ids) for r in rollouts) == 4 * 12  # no stop ids: every row runs to the limit
    for rollout in rollouts:
        ids = rollout.prompt_token_ids + rollout.token_ids
        with torch.no_grad():
            lp_T1 = token_logprobs(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), temperature=TEMPERATURE)
        response_N = lp_T1[0, len(rollout.prompt_token_ids) - 1 :]
        torch.testing.assert_close(torch.tensor(rollout.logprobs), response_N, **TOL)


def test_greedy_generation_equals_transformers_generate(model):
    prompts = _random_rows([13, 6, 10], seed=4)
    ids_BT, mask_BT = _left_padded(prompts)
    engine = TorchRolloutEngine(model, pad_token_id=PAD, dtype=torch.float32)
    rollouts = engine.generate(prompts, SamplingParams(top_k=1, max_new_tokens=10))
    never = list(family_for(model.config).placeholder_token_ids(model.config))
    extra = {"suppress_tokens": never} if never else {}
    with torch.no_grad():
        expected_BN = model.generate(
            input_ids=ids_BT,
            attention_mask=mask_BT,
            do_sample=False,
            max_new_tokens=10,
            min_new_tokens=10,
            pad_token_id=PAD,
            eos_token_id=None,
            **extra,
        )[:, ids_BT.shape[1] :]
    assert [r.token_ids for r in rollouts] == expected_BN.tolist()


def test_reentrant_checkpointing_breaks_kv_sharing_which_is_why_posttrain_never_uses_it():
    """Evidence for the non-reentrant rule: on the E-series (KV-shared layers) reentrant checkpointing
    gives wrong gradients; on a model without KV sharing it is exact."""
    ids_BT, mask_BT = _left_padded(_random_rows([22, 14], seed=2))
    for variant, reentrant_is_exact in (("basic", True), ("e_series", False)):
        model = _build(variant)
        _, expected = _logprobs_and_grads(copy.deepcopy(model).train(), ids_BT, mask_BT, reference=True)
        reentrant = copy.deepcopy(model).train()
        reentrant.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        _, grads = _logprobs_and_grads(reentrant, ids_BT, mask_BT, reference=False)
        worst = max(_relative_error(grads[name], expected[name]) for name in expected)
        assert (worst < 1e-5) == reentrant_is_exact, (variant, worst)
