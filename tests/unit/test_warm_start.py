"""The warm start before RL: its examples (prompt + answer + end-of-turn, supervised on the answer
and end-of-turn only, the prompts' images kept), its seeded draws, and its steps, which are the
SFT step on a trainer and AdamW of its own: step 0's loss is the hand-computed masked
cross-entropy, with images too."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

from posttrain.config.schema import PolicyConfig, WarmStartConfig
from posttrain.data.arithmetic import arithmetic_samples
from posttrain.data.prompts import tokenize_multimodal_prompts, tokenize_prompts
from posttrain.data.shapes import shape_count_samples
from posttrain.loops.setup import end_of_turn_id
from posttrain.loops.warm_start import supervised_examples, warm_start, warm_start_examples, warm_start_policy
from posttrain.models.loading import load_policy, load_tokenizer
from posttrain.models.logprobs import token_logprobs
from posttrain.models.tiny import (
    END_OF_TURN,
    build_tiny_processor,
    tiny_gemma4_config,
    tiny_gemma4_multimodal_config,
    train_tokenizer,
)
from posttrain.rollout.base import image_inputs

pytestmark = pytest.mark.unit


def answer_of(prompt) -> str:
    return str(prompt.sample.ground_truth)


@pytest.fixture(scope="module")
def text_setup(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    prompts = tokenize_prompts(arithmetic_samples(16, seed=3), tokenizer, template="{prompt}", max_prompt_tokens=64).prompts
    return load_policy(tiny_checkpoint), tokenizer, prompts


@pytest.fixture(scope="module")
def image_setup():
    corpus = [s.prompt + " " + s.ground_truth for s in shape_count_samples(50, seed=0)]
    tokenizer = train_tokenizer(corpus, vocab_size=300, multimodal=True)
    torch.manual_seed(0)
    model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(tiny_gemma4_config(len(tokenizer)), audio=False))
    samples = shape_count_samples(4, seed=1, image_sizes=[(48, 48), (36, 24)])
    prompts = tokenize_multimodal_prompts(samples, build_tiny_processor(tokenizer), template="{prompt}", max_prompt_tokens=200).prompts
    return model, tokenizer, prompts


def masked_cross_entropy(model, batch) -> float:
    """-(sum of the supervised tokens' log-probabilities) / (supervised tokens), from the model's
    full logits (the head as transformers computes it)."""
    with torch.no_grad():
        logits_BTV = model(batch.input_ids_BT, attention_mask=batch.attention_mask_BT, **batch.multimodal_inputs()).logits
    logprobs_BT1V = torch.log_softmax(logits_BTV[:, :-1].float(), dim=-1)
    target_logprobs_BT1 = logprobs_BT1V.gather(-1, batch.input_ids_BT[:, 1:, None]).squeeze(-1)
    mask_BT1 = batch.loss_mask_BT[:, 1:].float()
    return float(-(target_logprobs_BT1 * mask_BT1).sum() / mask_BT1.sum())


def test_supervised_tokens_decode_to_the_answer_and_end_of_turn(text_setup):
    _, tokenizer, prompts = text_setup
    answers = ["42", "7", "1234"]
    batch = supervised_examples(prompts[:3], answers, tokenizer, end_of_turn_id(tokenizer))
    assert batch.images == ()  # text-only prompts: no image inputs
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids, mask = batch.input_ids_BT[row], batch.loss_mask_BT[row].bool()
        assert tokenizer.decode(ids[mask]) == f"{answer}{END_OF_TURN}"
        length = int(batch.attention_mask_BT[row].sum())
        assert ids[: len(prompt.token_ids)].tolist() == prompt.token_ids  # the prompt as RL sees it, unsupervised
        assert not mask[: len(prompt.token_ids)].any() and not mask[length:].any()  # nor the padding


def test_draws_are_seeded_and_label_noise_swaps_answers(text_setup):
    _, _, prompts = text_setup
    clean = list(warm_start_examples(prompts, answer_of, WarmStartConfig(num_steps=3, batch_size=8), seed=5))
    assert clean == list(warm_start_examples(prompts, answer_of, WarmStartConfig(num_steps=3, batch_size=8), seed=5))
    for batch, answers in clean:
        assert len(set(map(id, batch))) == 8 and answers == [answer_of(p) for p in batch]
    noisy = list(warm_start_examples(prompts, answer_of, WarmStartConfig(num_steps=20, batch_size=8, label_noise=0.5), seed=5))
    wrong = sum(a != answer_of(p) for batch, answers in noisy for p, a in zip(batch, answers)) / (20 * 8)
    assert 0.25 < wrong < 0.6  # half the answers are a random prompt's (which is sometimes the right one)


def test_the_warm_start_optimizer_is_its_own():
    policy = PolicyConfig(precision="float32", parameter_offload=True, train_micro_batch_size=7, sequence_packing=True)
    ws = WarmStartConfig(batch_size=32, lr=3e-3)
    got = warm_start_policy(policy, ws)
    assert (got.optimizer.lr, got.optimizer.weight_decay, got.max_grad_norm) == (3e-3, 0.0, 1.0)
    assert (got.scheduler.warmup_steps, got.scheduler.decay) == (0, "constant")
    assert (got.parameter_offload, got.optimizer_offload) == (False, True)  # one process: no FSDP2 shards to offload
    assert (got.precision, got.train_micro_batch_size, got.sequence_packing) == ("float32", 7, True)


def test_step_zero_loss_is_the_masked_cross_entropy_and_adam_moves_by_lr(text_setup):
    base, tokenizer, prompts = text_setup
    ws = WarmStartConfig(num_steps=1, batch_size=4, lr=1e-3)
    [(batch_prompts, answers)] = warm_start_examples(prompts, answer_of, ws, seed=0)
    expected = masked_cross_entropy(base, supervised_examples(batch_prompts, answers, tokenizer, end_of_turn_id(tokenizer)))
    model = copy.deepcopy(base)
    # micro-batches of 2 rows (accumulated) and a policy lr that must not be used
    policy = PolicyConfig(precision="float32", train_micro_batch_size=2, optimizer={"lr": 0.5})
    run = dict(end_of_turn_id=end_of_turn_id(tokenizer), seed=0, max_consecutive_nonfinite_steps=3)
    [loss] = warm_start(model, prompts, answer_of, tokenizer, ws, policy, **run)
    assert loss == pytest.approx(expected, abs=1e-5)
    # Adam's first step moves every weight with a gradient by lr (m / sqrt(v) = sign(g)), whatever the clipping
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), base.parameters()))
    assert moved == pytest.approx(ws.lr, rel=1e-3)
    again = copy.deepcopy(base)
    assert warm_start(again, prompts, answer_of, tokenizer, ws, policy, **run) == [loss]  # deterministic


@pytest.mark.parametrize("micro", [4, 1])
def test_step_zero_loss_with_images_is_the_masked_cross_entropy_on_each_row_s_images(image_setup, micro):
    base, tokenizer, prompts = image_setup
    ws = WarmStartConfig(num_steps=1, batch_size=4, lr=1e-4)
    [(batch_prompts, answers)] = warm_start_examples(prompts, answer_of, ws, seed=0)
    batch = supervised_examples(batch_prompts, answers, tokenizer, end_of_turn_id(tokenizer))
    assert len(batch.images) == 4 and all(m is not None for m in batch.images)
    expected = masked_cross_entropy(base, batch)
    mask_BT1 = batch.loss_mask_BT[:, 1:].float()
    with torch.no_grad():  # the same rows without their images score differently: the images reach the model
        blind_BT1 = token_logprobs(base, batch.input_ids_BT, batch.attention_mask_BT)
    assert abs(float(-(blind_BT1 * mask_BT1).sum() / mask_BT1.sum()) - expected) > 1e-4
    assert image_inputs(batch.images).keys() == batch.multimodal_inputs().keys()
    policy = PolicyConfig(precision="float32", train_micro_batch_size=micro)
    [loss] = warm_start(
        copy.deepcopy(base), prompts, answer_of, tokenizer, ws, policy, end_of_turn_id=end_of_turn_id(tokenizer), seed=0,
        max_consecutive_nonfinite_steps=3,
    )
    assert loss == pytest.approx(expected, abs=1e-5)
