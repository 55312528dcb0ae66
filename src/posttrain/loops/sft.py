"""The supervised fine-tuning loop: conversations -> assistant-masked tokens -> optimizer steps ->
validation loss -> log -> checkpoint -> export.

It runs on GRPO's engine (`PolicyTrainer.sft_step`: micro-batches, packing, autocast, clipping,
AdamW or its host offload, the lr schedule, non-finite skipping, FSDP2 under torchrun) and builds
the model, data and run directory with GRPO's helpers (loops/setup.py); there is no rollout
engine and no environment. The loss and its normalization are in `algorithms/sft_loss.py`.

Data order: step s (1-based) trains on `step_indices(s, ...)`: epochs of floor(N / B) steps over
an order reshuffled per epoch from (sft.seed, epoch). A resumed run finds its place from its step
alone.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algorithms.sft_loss import sft_loss
from posttrain.checkpoint.store import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.config.loss import LossConfig
from posttrain.config.schema import DPOConfig, RecipeConfig, SFTConfig
from posttrain.data.chat import TokenizedConversation, chat_corpus, tokenize_conversations
from posttrain.loops.grpo import check_distributed_recipe, check_nonfinite_streak, phase_peak_gib
from posttrain.loops.setup import (
    LoadedData,
    end_of_turn_id,
    export_final_model,
    load_data,
    load_trainable_policy,
    model_directory,
    note_skipped_rows,
    prepare_run_dir,
)
from posttrain.metrics.console import Console
from posttrain.metrics.logger import MetricsLogger
from posttrain.models.loading import has_vision_tower, load_processor
from posttrain.training.distributed import Distributed, all_reduce_sum, init_distributed
from posttrain.training.trainer import PolicyTrainer, SupervisedBatch

LOOP_STATE_ALGORITHM = "sft"  # stored in each checkpoint: a grpo run's checkpoints are never resumed here


class NotAnSFTCheckpointError(ValueError):
    """The run directory's latest checkpoint was written by another algorithm's run."""


@dataclass
class SFTResult:
    log_dir: Path
    validation_loss: dict[int, float]  # step -> validation/loss (step 0: before training)


@dataclass
class SFTParts:
    log_dir: Path
    checkpoint_dir: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    train: list[TokenizedConversation]
    validation: list[TokenizedConversation]
    processor: Any = None  # a multimodal policy's processor, exported with the model
    data_metrics: dict[str, float] = field(default_factory=dict)  # data/*: logged with the run's first record


# ------------------------------------------------------------------------------- pure helpers


def steps_per_epoch(num_conversations: int, global_batch: int, *, items: str = "conversations") -> int:
    """Whole global batches per pass over the data (the remainder sits each epoch out); `items`
    names the data in the error (dpo: "pairs")."""
    if num_conversations < global_batch:
        raise ValueError(
            f"{num_conversations} training {items} do not fill one global batch of policy.train_global_batch_size = "
            f"{global_batch}; lower it or add data"
        )
    return num_conversations // global_batch


def total_steps(sft: SFTConfig | DPOConfig, per_epoch: int) -> int:
    """sft.max_num_steps, or sft.max_num_epochs worth of steps when that is fewer (dpo's the same)."""
    if sft.max_num_epochs is None:
        return sft.max_num_steps
    return min(sft.max_num_steps, sft.max_num_epochs * per_epoch)


def step_indices(step: int, num_conversations: int, global_batch: int, *, seed: int, shuffle: bool) -> list[int]:
    """The conversations of optimizer step `step` (1-based): the step's slice of its epoch's order,
    reshuffled per epoch from (seed, epoch), or the data order without `shuffle`."""
    epoch, position = divmod(step - 1, steps_per_epoch(num_conversations, global_batch))
    order = list(range(num_conversations))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[position * global_batch : (position + 1) * global_batch]


def supervised_batch(conversations: list[TokenizedConversation], *, pad_token_id: int) -> SupervisedBatch:
    """Right-padded rows of the conversations' tokens, attention mask and loss mask."""
    width = max(len(c.token_ids) for c in conversations)
    input_ids_BT = torch.full((len(conversations), width), pad_token_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((len(conversations), width), dtype=torch.long)
    loss_mask_BT = torch.zeros((len(conversations), width), dtype=torch.long)
    for row, conversation in enumerate(conversations):
        length = len(conversation.token_ids)
        input_ids_BT[row, :length] = torch.tensor(conversation.token_ids)
        attention_mask_BT[row, :length] = 1
        loss_mask_BT[row, :length] = torch.tensor(conversation.loss_mask)
    return SupervisedBatch(input_ids_BT, attention_mask_BT, loss_mask_BT)


def rank_share(conversations: list[TokenizedConversation], distributed: Distributed) -> list[TokenizedConversation]:
    """This rank's contiguous share of a list whose length divides by the world size."""
    share = len(conversations) // distributed.world_size
    return conversations[distributed.rank * share : (distributed.rank + 1) * share]


def padded_for_ranks(conversations: list[TokenizedConversation], world_size: int) -> list[TokenizedConversation]:
    """The conversations and unsupervised copies of the first, up to a multiple of `world_size`:
    every rank then runs the same number of forward passes (each gathers FSDP2 shards together)
    and the copies add nothing to the loss."""
    filler = replace(conversations[0], loss_mask=[0] * len(conversations[0].token_ids))
    return conversations + [filler] * (-len(conversations) % world_size)


# ----------------------------------------------------------------------------------- the parts


def tokenize_sft_data(
    cfg: RecipeConfig, data: LoadedData, tokenizer: PreTrainedTokenizerBase, console: Console
) -> tuple[list[TokenizedConversation], list[TokenizedConversation], dict[str, float]]:
    """Training and validation conversations, and the data/* metrics; skipped rows and dropped
    conversations are noted on the console."""
    max_tokens = cfg.policy.max_total_sequence_length
    tokenize = partial(tokenize_conversations, tokenizer=tokenizer, max_tokens=max_tokens, end_of_turn_id=end_of_turn_id(tokenizer))
    train, validation = tokenize(data.train), tokenize(data.validation)
    note_skipped_rows(data, console)
    dropped = train.dropped + validation.dropped
    if dropped:
        console.note(
            f"data: dropped {len(train.dropped)} training and {len(validation.dropped)} validation conversations longer "
            f"than policy.max_total_sequence_length = {max_tokens} tokens, first: {', '.join(dropped[:5])}"
        )
    metrics = {
        "data/train_conversations": float(len(train.conversations)),
        "data/validation_conversations": float(len(validation.conversations)),
        "data/dropped_long_conversations": float(len(dropped)),
        "data/skipped_bad_rows": float(len(data.skipped_rows)),
    }
    return train.conversations, validation.conversations, metrics


def build_sft_run(cfg: RecipeConfig, *, console: Console, distributed: Distributed) -> SFTParts:
    """Run directory, data, model and tokenizer; the data is read before any model is built."""
    log_dir, checkpoint_dir = prepare_run_dir(cfg, distributed)
    torch.manual_seed(cfg.sft.seed)
    data = load_data(cfg)
    model_dir = model_directory(cfg, data.train, log_dir, distributed, corpus_of=chat_corpus)
    model, tokenizer, _ = load_trainable_policy(cfg, model_dir, console, distributed)
    train, validation, data_metrics = tokenize_sft_data(cfg, data, tokenizer, console)
    processor = load_processor(model_dir, trust_remote_code=cfg.policy.trust_remote_code) if has_vision_tower(model) else None
    return SFTParts(log_dir, checkpoint_dir, model, tokenizer, train, validation, processor, data_metrics)


# ------------------------------------------------------------------------------------ the steps


def train_step(parts: SFTParts, trainer: PolicyTrainer, cfg: RecipeConfig, step: int, distributed: Distributed) -> dict[str, float]:
    """One optimizer step on this rank's share of step `step`'s conversations; train/* and timing metrics."""
    start = time.perf_counter()
    global_batch = cfg.policy.train_global_batch_size
    indices = step_indices(step, len(parts.train), global_batch, seed=cfg.sft.seed, shuffle=cfg.data.shuffle)
    conversations = rank_share([parts.train[i] for i in indices], distributed)
    step_metrics = trainer.sft_step(supervised_batch(conversations, pad_token_id=parts.tokenizer.pad_token_id))
    metrics = {f"train/{key}": value for key, value in step_metrics.items()}
    metrics["train/epoch"] = float((step - 1) // steps_per_epoch(len(parts.train), global_batch))
    metrics["timing/training"] = time.perf_counter() - start
    metrics.update({f"memory/training_{kind}_gib": v for kind, v in phase_peak_gib(trainer.device).items()})
    return metrics


def validation_loss(
    trainer: PolicyTrainer, conversations: list[TokenizedConversation], *, pad_token_id: int, distributed: Distributed
) -> dict[str, float]:
    """The mean NLL per supervised token over all the (non-empty) validation `conversations`, each
    rank taking its share, by the same loss function as training, without gradients."""
    start = time.perf_counter()
    batch = supervised_batch(rank_share(padded_for_ranks(conversations, distributed.world_size), distributed), pad_token_id=pad_token_id)
    logprobs_BT = trainer.logprobs(batch, temperature=1.0)
    if distributed.enabled:  # FSDP2 keeps the root's gathered parameters after a forward, for the backward
        trainer.logprob_module.reshard()  # that never comes here: free them (and shard them for the optimizer again)
    mask_BT = batch.loss_mask_BT.float().to(logprobs_BT.device)
    tokens = all_reduce_sum(float(mask_BT.sum()), distributed, trainer.device)
    _, loss_metrics = sft_loss(logprobs_BT, mask_BT, global_normalizer=tokens)
    return {
        "validation/loss": all_reduce_sum(loss_metrics["loss"], distributed, trainer.device),
        "validation/supervised_tokens": tokens,
        "timing/validation": time.perf_counter() - start,
    }


def save(parts: SFTParts, trainer: PolicyTrainer, cfg: RecipeConfig, step: int) -> None:
    loop_state = {
        "algorithm": LOOP_STATE_ALGORITHM,
        "step": step,
        "consecutive_nonfinite_steps": trainer.consecutive_nonfinite_steps,
    }
    save_checkpoint(
        parts.checkpoint_dir,
        step,
        model=parts.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        loop_state=loop_state,
        keep_top_k=cfg.checkpointing.keep_top_k,
    )


def restore(checkpoint: Path, parts: SFTParts, trainer: PolicyTrainer, console: Console) -> int:
    """Resume where `checkpoint` left off (weights, optimizer, scheduler, RNG, the non-finite
    streak; the data position follows from the step). Returns its step."""
    loop_state = load_checkpoint(checkpoint, model=parts.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    if loop_state.get("algorithm") != LOOP_STATE_ALGORITHM:  # grpo checkpoints carry no algorithm key
        raise NotAnSFTCheckpointError(f"{checkpoint} was not written by an sft run; point logger.log_dir at a new run directory")
    changed = trainer.apply_optimizer_config()
    if changed:
        console.note(f"resume: this run's policy.optimizer settings replace the checkpoint's: {', '.join(changed)}")
    trainer.consecutive_nonfinite_steps = loop_state["consecutive_nonfinite_steps"]
    return loop_state["step"]


# ------------------------------------------------------------------------------------- the loop


def run_sft(cfg: RecipeConfig, *, console: Console, distributed: Distributed | None = None) -> SFTResult:
    """Supervised fine-tuning, in one process or (under torchrun) one per device: each rank trains
    on its share of every global batch (FSDP2), the loss normalized over all ranks; rank 0 logs."""
    if cfg.algorithm != "sft":
        raise ValueError(f"run_sft runs algorithm sft; this recipe's algorithm is {cfg.algorithm}")
    distributed = distributed or init_distributed()
    if distributed.enabled:
        check_distributed_recipe(cfg, distributed.world_size)
    if not distributed.is_main:
        console = Console(enabled=False)
    sft, policy = cfg.sft, cfg.policy
    parts = build_sft_run(cfg, console=console, distributed=distributed)
    console.record_warnings(parts.log_dir / "warnings.log")
    num_steps = total_steps(sft, steps_per_epoch(len(parts.train), policy.train_global_batch_size))
    trainer = PolicyTrainer(
        parts.model,
        policy.model_copy(update={"train_global_batch_size": policy.train_global_batch_size // distributed.world_size}),
        LossConfig(),  # the policy-gradient loss's settings: sft_step never reads them
        total_optimizer_steps=num_steps,
        distributed=distributed,
    )
    logger = MetricsLogger.for_run(cfg) if distributed.is_main else None
    validate = partial(validation_loss, trainer, parts.validation, pad_token_id=parts.tokenizer.pad_token_id, distributed=distributed)

    checkpoint = latest_checkpoint(parts.checkpoint_dir) if cfg.checkpointing.enabled or not distributed.enabled else None
    start_step = restore(checkpoint, parts, trainer, console) if checkpoint is not None else 0
    if checkpoint is not None:
        console.note(f"resumed from {checkpoint} (step {start_step})")
    if logger is not None:  # records an earlier attempt logged after this checkpoint (or at all) are redone
        logger.start(start_step if checkpoint is not None else -1)
    first_record, validation_losses = dict(parts.data_metrics), {}
    if checkpoint is None and sft.val_at_start and parts.validation:
        val = validate()
        validation_losses[0] = val["validation/loss"]
        if logger is not None:
            logger.log(0, {**first_record, **val})
        first_record = {}
        console.report_step("sft", 0, num_steps, val)

    console.start_progress("SFT", total=num_steps, completed=start_step, plain_lines=False)
    try:
        for step in range(start_step + 1, num_steps + 1):
            metrics = train_step(parts, trainer, cfg, step, distributed)
            is_last = step == num_steps
            if parts.validation and ((sft.val_period and step % sft.val_period == 0) or (is_last and sft.val_at_end)):
                metrics.update(validate())
                validation_losses[step] = metrics["validation/loss"]
            if logger is not None:
                logger.log(step, {**first_record, **metrics})
            first_record = {}
            console.report_step("sft", step, num_steps, metrics)
            console.advance(f"loss {metrics['train/loss']:.4f}")

            limit = sft.max_consecutive_nonfinite_steps
            check_nonfinite_streak(
                trainer.consecutive_nonfinite_steps,
                limit,
                step=step,
                checkpoint_dir=parts.checkpoint_dir,
                setting="sft.max_consecutive_nonfinite_steps",
            )
            if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or is_last):
                save(parts, trainer, cfg, step)
    finally:
        if logger is not None:
            logger.close()
    console.stop_progress()
    if cfg.checkpointing.export_final:
        export_final_model(parts, cfg, console)
    return SFTResult(log_dir=parts.log_dir, validation_loss=validation_losses)
