"""The trainer with images (TrainBatch.images): its logprobs equal `token_logprobs` with the same
images, the images change them, micro-batches that split image and text rows take the full-batch
step, and a trainable vision tower moves."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig
from posttrain.data.prompts import tokenize_multimodal_prompts
from posttrain.data.shapes import shape_count_samples
from posttrain.data.types import Sample
from posttrain.models.logprobs import token_logprobs
from posttrain.models.tiny import (
    build_tiny_processor,
    tiny_gemma4_config,
    tiny_gemma4_multimodal_config,
    train_tokenizer,
)
from posttrain.training.trainer import PolicyTrainer, TrainBatch

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup():
    corpus = [s.prompt + " " + s.ground_truth for s in shape_count_samples(50, seed=0)]
    tokenizer = train_tokenizer(corpus, vocab_size=300, multimodal=True)
    processor = build_tiny_processor(tokenizer)
    torch.manual_seed(0)
    text_config = tiny_gemma4_config(len(tokenizer))
    model = Gemma4ForConditionalGeneration(tiny_gemma4_multimodal_config(text_config, audio=False))
    samples = [*shape_count_samples(3, seed=1, image_sizes=[(48, 48), (36, 24)])]
    samples.insert(1, Sample(prompt="What is 2+2?", ground_truth="4", metadata={}, origin="text:0"))
    prompts = tokenize_multimodal_prompts(samples, processor, template="{prompt}", max_prompt_tokens=200).prompts
    return model, tokenizer, prompts


def _batch(prompts, tokenizer) -> TrainBatch:
    responses = [tokenizer.encode(text, add_special_tokens=False) for text in ("3", "4 is it", "12", "2")]
    rows = [p.token_ids + r for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention, loss = torch.zeros_like(ids), torch.zeros_like(ids)
    for b, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
        loss[b, len(prompt.token_ids) : len(row)] = 1
    return TrainBatch(
        ids, attention, loss, torch.tensor([1.0, -0.5, 0.5, -1.0]), torch.zeros(ids.shape), images=tuple(p.multimodal for p in prompts)
    )


def _policy(micro: int) -> PolicyConfig:
    return PolicyConfig(
        precision="float32",
        train_global_batch_size=4,
        train_micro_batch_size=micro,
        max_grad_norm=None,
        optimizer=OptimizerConfig(lr=1e-3, eps=1e-6),
    )


def test_trainer_logprobs_use_each_row_s_images(setup):
    model, tokenizer, prompts = setup
    batch = _batch(prompts, tokenizer)
    assert [m is None for m in batch.images] == [False, True, False, False]
    trainer = PolicyTrainer(copy.deepcopy(model), _policy(micro=2), LossConfig(), total_optimizer_steps=1)
    got = trainer.logprobs(batch, temperature=0.9)[:, 1:]
    with torch.no_grad():
        expected = token_logprobs(trainer.model, batch.input_ids_BT, batch.attention_mask_BT, temperature=0.9, **batch.multimodal_inputs())
        text_only = token_logprobs(trainer.model, batch.input_ids_BT, batch.attention_mask_BT, temperature=0.9)
    mask = batch.loss_mask_BT[:, 1:].bool()
    torch.testing.assert_close(got[mask], expected[mask], rtol=0, atol=1e-5)
    image_rows = torch.tensor([m is not None for m in batch.images])
    assert (got - text_only)[mask & image_rows[:, None]].abs().max() > 1e-3  # the images matter
    torch.testing.assert_close(got[1][mask[1]], text_only[1][mask[1]], rtol=0, atol=1e-5)  # the text row does not see them


def test_micro_batches_splitting_images_take_the_full_batch_step(setup):
    model, tokenizer, prompts = setup
    batch = _batch(prompts, tokenizer)
    results = {}
    for micro in (4, 1, 3):
        trainer = PolicyTrainer(copy.deepcopy(model), _policy(micro), LossConfig(), total_optimizer_steps=1)
        metrics = trainer.train(batch, temperature=1.0)
        grads = {n: trainer.optimizer.state[p]["exp_avg"] / 0.1 for n, p in trainer.model.named_parameters() if p in trainer.optimizer.state}
        results[micro] = metrics, grads
    full_metrics, full_grads = results[4]
    vision = [n for n in full_grads if "vision_tower" in n]
    assert vision and max(float(full_grads[n].abs().max()) for n in vision) > 0  # the tower is trained
    for micro in (1, 3):
        metrics, grads = results[micro]
        assert metrics["grad_norm"] == pytest.approx(full_metrics["grad_norm"], rel=1e-5)
        for name, grad in grads.items():  # per tensor, relative to its norm: tiny vision-norm gradients sit
            expected = full_grads[name]  # at the fp32 noise of larger ones element by element
            assert float((grad - expected).norm()) <= 1e-4 * float(expected.norm()), f"{micro} {name}"
