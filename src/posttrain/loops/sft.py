"""The supervised fine-tuning loop: conversations -> assistant-masked tokens -> optimizer steps ->
validation loss -> log -> checkpoint -> export.

It runs on GRPO's engine (`PolicyTrainer.sft_step`: micro-batches, packing, autocast, clipping,
AdamW or its host offload, the lr schedule, non-finite skipping, FSDP2 under torchrun) and builds
the model, data and run directory with GRPO's helpers (loops/setup.py); there is no rollout
engine and no environment. The loss and its normalization are in `algorithms/sft_loss.py`; the
loop (validation, logging, checkpoints, export) is the one DPO shares, loops/supervised.py, and
this file holds what is SFT's own: the data, the step, the validation loss, the resume.

Data order: step s (1-based) trains on `step_indices(s, ...)`: epochs of floor(N / B) steps over
an order reshuffled per epoch from (sft.seed, epoch). A resumed run finds its place from its step
alone.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algorithms.sft_loss import sft_loss
from posttrain.checkpoint.store import load_checkpoint
from posttrain.config.schema import DPOConfig, RecipeConfig, SFTConfig
from posttrain.data.chat import TokenizedConversation, chat_corpus, tokenize_conversations
from posttrain.loops.grpo import phase_peak_gib
from posttrain.loops.setup import (
    LoadedData,
    end_of_turn_id,
    load_data,
    load_trainable_policy,
    model_directory,
    note_skipped_rows,
    prepare_run_dir,
)
from posttrain.loops.supervised import (
    SupervisedLoop,
    SupervisedParts,
    checkpoint_to_resume,
    resume_trainer,
    run_supervised_loop,
    start_processes,
    supervised_trainer,
)
from posttrain.metrics.console import Console
from posttrain.models.loading import has_vision_tower, load_processor
from posttrain.training.distributed import Distributed, all_reduce_sum
from posttrain.training.trainer import PolicyTrainer, SupervisedBatch

LOOP_STATE_ALGORITHM = "sft"  # stored in each checkpoint: a grpo run's checkpoints are never resumed here


class NotAnSFTCheckpointError(ValueError):
    """The run directory's latest checkpoint was written by another algorithm's run."""


@dataclass
class SFTResult:
    log_dir: Path
    validation_loss: dict[int, float]  # step -> validation/loss (step 0: before training)


SFTParts = SupervisedParts[TokenizedConversation]


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


def train_step(
    parts: SFTParts, trainer: PolicyTrainer, cfg: RecipeConfig, step: int, *, distributed: Distributed, console: Console
) -> dict[str, float]:
    """One optimizer step on this rank's share of step `step`'s conversations (the `training`
    phase, its rows counted); train/* and timing metrics."""
    start = time.perf_counter()
    global_batch = cfg.policy.train_global_batch_size
    indices = step_indices(step, len(parts.train), global_batch, seed=cfg.sft.seed, shuffle=cfg.data.shuffle)
    conversations = rank_share([parts.train[i] for i in indices], distributed)
    console.phase("training", total=len(conversations))
    step_metrics = trainer.sft_step(supervised_batch(conversations, pad_token_id=parts.tokenizer.pad_token_id), on_rows=console.phase_advance)
    metrics = {f"train/{key}": value for key, value in step_metrics.items()}
    metrics["train/epoch"] = float((step - 1) // steps_per_epoch(len(parts.train), global_batch))
    metrics["timing/training"] = time.perf_counter() - start
    metrics.update({f"memory/training_{kind}_gib": v for kind, v in phase_peak_gib(trainer.device).items()})
    return metrics


def validation_loss(
    trainer: PolicyTrainer,
    conversations: list[TokenizedConversation],
    *,
    pad_token_id: int,
    distributed: Distributed,
    console: Console | None = None,
) -> dict[str, float]:
    """The mean NLL per supervised token over all the (non-empty) validation `conversations`, each
    rank taking its share, by the same loss function as training, without gradients. With a
    `console`, the `validation` phase counts this rank's rows."""
    start = time.perf_counter()
    batch = supervised_batch(rank_share(padded_for_ranks(conversations, distributed.world_size), distributed), pad_token_id=pad_token_id)
    if console is not None:
        console.phase("validation", total=len(batch))
    logprobs_BT = trainer.logprobs(batch, temperature=1.0, on_rows=console.phase_advance if console is not None else None)
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


def restore(checkpoint: Path, parts: SFTParts, trainer: PolicyTrainer, console: Console) -> int:
    """Resume where `checkpoint` left off (weights, optimizer, scheduler, RNG, the non-finite
    streak; the data position follows from the step). Returns its step."""
    loop_state = load_checkpoint(checkpoint, model=parts.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    if loop_state.get("algorithm") != LOOP_STATE_ALGORITHM:  # grpo checkpoints carry no algorithm key
        raise NotAnSFTCheckpointError(f"{checkpoint} was not written by an sft run; point logger.log_dir at a new run directory")
    resume_trainer(trainer, loop_state, console)
    return loop_state["step"]


# ------------------------------------------------------------------------------------- the loop


def run_sft(cfg: RecipeConfig, *, console: Console, distributed: Distributed | None = None) -> SFTResult:
    """Supervised fine-tuning, in one process or (under torchrun) one per device: each rank trains
    on its share of every global batch (FSDP2), the loss normalized over all ranks; rank 0 logs.
    The loop itself is loops/supervised.py's."""
    distributed, console = start_processes(cfg, "sft", console, distributed)
    parts = build_sft_run(cfg, console=console, distributed=distributed)
    num_steps = total_steps(cfg.sft, steps_per_epoch(len(parts.train), cfg.policy.train_global_batch_size))
    trainer = supervised_trainer(parts.model, cfg, num_steps, distributed)

    checkpoint = checkpoint_to_resume(parts.checkpoint_dir, cfg, distributed)
    resumed_step = restore(checkpoint, parts, trainer, console) if checkpoint is not None else -1
    if checkpoint is not None:
        console.note(f"resumed from {checkpoint} (step {resumed_step})")
    pad_token_id = parts.tokenizer.pad_token_id
    loop = SupervisedLoop(
        algorithm=LOOP_STATE_ALGORITHM,
        settings=cfg.sft,
        num_steps=num_steps,
        train_step=partial(train_step, parts, trainer, cfg, distributed=distributed, console=console),
        validate=(
            partial(validation_loss, trainer, parts.validation, pad_token_id=pad_token_id, distributed=distributed, console=console)
            if parts.validation
            else None
        ),
        kept_metric="validation/loss",
        bar_info=lambda metrics: f"loss {metrics['train/loss']:.4f}",
    )
    validation_losses = run_supervised_loop(
        loop, parts, trainer, cfg, resumed_step=resumed_step, first_record=parts.data_metrics, console=console, distributed=distributed
    )
    return SFTResult(log_dir=parts.log_dir, validation_loss=validation_losses)
