"""A short supervised warm start before RL, through the supervised fine-tuning step.

RL can only reinforce what the policy sometimes does; a random-init model never answers, so
the quickstart first shows it a few solved examples. An example is a training prompt as RL
tokenizes it (its images too) followed by an answer and the end-of-turn token; the answer and
the end-of-turn token are supervised, the prompt is context. Each step draws `batch_size`
prompts (seeded, so every rank and every rerun draws the same) and takes one
`PolicyTrainer.sft_step`: the SFT loop's step, loss and normalization (algorithms/sft_loss.py),
micro-batches, packing and precision as the policy section sets them.

The steps run on a trainer of their own, discarded afterwards, for two reasons:

- Its AdamW (warm_start.lr, constant, no weight decay, gradients clipped at norm 1) is not RL's:
  RL starts with fresh Adam moments and its own lr schedule (warm-up included), as from a
  supervised checkpoint (what the warm start's former loop did too). Moments of another
  objective, gathered at another lr (the quickstart's is 10x RL's), would otherwise steer RL's
  first updates.
- It runs in one process. Under torchrun every rank runs the same warm start on its own whole
  copy of the model (the same batches, so the same weights), before the RL trainer shards the
  model with FSDP2 (a model is sharded once; `shard_policy` broadcasts rank 0's weights first).
  It therefore needs the memory of unsharded training, and `policy.parameter_offload` (a sharded
  setting) becomes `optimizer_offload` here.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.config.loss import LossConfig
from posttrain.config.schema import OptimizerConfig, PolicyConfig, SchedulerConfig, WarmStartConfig
from posttrain.data.batching import right_padded_rows
from posttrain.data.prompts import Prompt
from posttrain.training.trainer import NonFiniteTrainingError, PolicyTrainer, SupervisedBatch

WARM_START_MAX_GRAD_NORM = 1.0


def warm_start_examples(
    prompts: list[Prompt], answer_of: Callable[[Prompt], str], cfg: WarmStartConfig, *, seed: int
) -> Iterator[tuple[list[Prompt], list[str]]]:
    """Each step's prompts and answers: `cfg.batch_size` distinct prompts drawn from `seed`; with
    probability `cfg.label_noise` an answer is a random prompt's answer (an imperfect teacher)."""
    rng = random.Random(seed)
    for _ in range(cfg.num_steps):
        batch = rng.sample(prompts, min(cfg.batch_size, len(prompts)))
        answers = [answer_of(rng.choice(prompts) if rng.random() < cfg.label_noise else p) for p in batch]
        yield batch, answers


def supervised_examples(
    prompts: list[Prompt], answers: list[str], tokenizer: PreTrainedTokenizerBase, end_of_turn_id: int
) -> SupervisedBatch:
    """Right-padded prompt + answer + end-of-turn rows, supervised on the answer and end-of-turn
    tokens, with the prompts' images (none for text-only prompts)."""
    answer_ids = [tokenizer.encode(answer, add_special_tokens=False) + [end_of_turn_id] for answer in answers]
    rows = right_padded_rows([p.token_ids for p in prompts], answer_ids, pad_token_id=tokenizer.pad_token_id)
    images = tuple(p.multimodal for p in prompts) if any(p.multimodal is not None for p in prompts) else ()
    return SupervisedBatch(rows["input_ids"], rows["attention_mask"], rows["response_mask"], images)


def warm_start_policy(policy: PolicyConfig, cfg: WarmStartConfig) -> PolicyConfig:
    """The policy section for the warm start's trainer: the run's compute settings (precision,
    micro-batches, packing, attention, compile) with the warm start's optimizer, in one process."""
    return policy.model_copy(
        update={
            "train_global_batch_size": cfg.batch_size,
            "optimizer": OptimizerConfig(lr=cfg.lr, weight_decay=0.0),
            "scheduler": SchedulerConfig(),  # constant lr
            "max_grad_norm": WARM_START_MAX_GRAD_NORM,
            "parameter_offload": False,
            "optimizer_offload": policy.optimizer_offload or policy.parameter_offload,
        }
    )


def warm_start(
    model: torch.nn.Module,
    prompts: list[Prompt],
    answer_of: Callable[[Prompt], str],
    tokenizer: PreTrainedTokenizerBase,
    cfg: WarmStartConfig,
    policy: PolicyConfig,
    *,
    end_of_turn_id: int,
    seed: int,
    max_consecutive_nonfinite_steps: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Run `cfg.num_steps` SFT steps on solved `prompts` (answers from `answer_of`); returns the
    loss per step (nats per supervised token). Raises `NonFiniteTrainingError` after
    `max_consecutive_nonfinite_steps` skipped steps in a row."""
    trainer = PolicyTrainer(
        model,
        warm_start_policy(policy, cfg),
        LossConfig(),  # the policy-gradient loss's settings: sft_step never reads them
        total_optimizer_steps=cfg.num_steps,
    )
    losses = []
    for step, (batch, answers) in enumerate(warm_start_examples(prompts, answer_of, cfg, seed=seed)):
        metrics = trainer.sft_step(supervised_examples(batch, answers, tokenizer, end_of_turn_id))
        losses.append(metrics["loss"])
        if on_step is not None:
            on_step(step, losses[-1])
        if trainer.consecutive_nonfinite_steps >= max_consecutive_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"warm start step {step + 1}: the last {trainer.consecutive_nonfinite_steps} steps had a non-finite loss "
                f"or gradient norm (grpo.max_consecutive_nonfinite_steps: {max_consecutive_nonfinite_steps}); try a lower "
                "warm_start.lr or policy.precision: float32"
            )
    return losses
