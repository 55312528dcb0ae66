"""The DPO loop: preference pairs -> response-masked tokens -> reference logprobs (once) ->
optimizer steps -> validation preference metrics -> log -> checkpoint -> export.

It runs on the trainer's engine (`PolicyTrainer.dpo_step`: micro-batches of whole pairs, packing,
autocast, clipping, AdamW or its host offload, the lr schedule, non-finite skipping, FSDP2 under
torchrun) and builds the model and run directory with the shared helpers (loops/setup.py); there
is no rollout engine and no environment. The loss and its normalization are in
`algorithms/dpo_loss.py`.

Reference logprobs. The reference policy is the initial policy. Before the first step the policy
itself scores both responses of every training and validation pair, once (`pair_logprobs`:
`PolicyTrainer.logprobs`, no gradient, micro-batched, the chunked logprob head), and the sums over
each response's scored tokens are kept on the host: 8 bytes a pair, and no second copy of the
model. They are constants, so every checkpoint stores them with a fingerprint of the tokenized
data; a resumed run restores them (the weights have moved since, so they could not be recomputed
from the policy) and refuses to resume over data that tokenizes differently.

Data order: as SFT's (loops/sft.py `step_indices`): epochs of floor(N / B) steps over an order
reshuffled per epoch from (dpo.seed, epoch); a resumed run finds its place from its step alone.

The loop (validation, logging, checkpoints, export) is the one SFT shares, loops/supervised.py;
this file holds what is DPO's own: the pairs, the reference logprobs, the step, the validation
metrics, the resume.
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.algorithms.dpo_loss import dpo_loss, sequence_logprobs
from posttrain.checkpoint.store import load_checkpoint
from posttrain.config.schema import RecipeConfig
from posttrain.data.preferences import (
    PreferencePair,
    TokenizedPair,
    load_preference_source,
    preference_corpus,
    tokenize_preferences,
)
from posttrain.data.sources import BadRows, DataError
from posttrain.loops.grpo import phase_peak_gib
from posttrain.loops.setup import end_of_turn_id, load_trainable_policy, model_directory, prepare_run_dir
from posttrain.loops.sft import step_indices, steps_per_epoch, supervised_batch, total_steps
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
from posttrain.training.distributed import Distributed, gather_groups
from posttrain.training.trainer import PolicyTrainer, PreferenceBatch, SupervisedBatch

LOOP_STATE_ALGORITHM = "dpo"  # stored in each checkpoint: another algorithm's checkpoints are never resumed here
T = TypeVar("T")
REFERENCE_CHUNK_PAIRS = 256  # pairs scored per PolicyTrainer.logprobs call: bounds its [rows, tokens] output


class NotADPOCheckpointError(ValueError):
    """The run directory's latest checkpoint was written by another algorithm's run."""


@dataclass
class DPOResult:
    log_dir: Path
    validation_preference_accuracy: dict[int, float]  # step -> validation/rewards/accuracy (step 0: before training, 0.5)


@dataclass
class ReferenceLogprobs:
    """The initial policy's summed response logprobs, [pairs, 2] (chosen, rejected), on the host."""

    train_P2: torch.Tensor
    validation_P2: torch.Tensor
    fingerprint: str  # data_fingerprint of the pairs they were computed for

    def state(self) -> dict[str, Any]:
        return {"train": self.train_P2, "validation": self.validation_P2, "fingerprint": self.fingerprint}


DPOParts = SupervisedParts[TokenizedPair]


# ------------------------------------------------------------------------------- pure helpers


def pair_rows(pairs: list[TokenizedPair], *, pad_token_id: int) -> SupervisedBatch:
    """Right-padded rows, pair p's chosen sequence in row 2p and its rejected one in row 2p + 1."""
    return supervised_batch([s for pair in pairs for s in (pair.chosen, pair.rejected)], pad_token_id=pad_token_id)


def preference_batch(pairs: list[TokenizedPair], reference_P2: torch.Tensor, *, pad_token_id: int) -> PreferenceBatch:
    """The pairs' rows (`pair_rows`) with their reference logprobs, [pairs, 2] (chosen, rejected)."""
    return PreferenceBatch(pair_rows(pairs, pad_token_id=pad_token_id), reference_P2)


def data_fingerprint(*pair_lists: list[TokenizedPair]) -> str:
    """sha256 of the pairs' token ids and masks, in order: equal exactly when the tokenized data is."""
    digest = hashlib.sha256()
    for pairs in pair_lists:
        digest.update(array("Q", [len(pairs)]).tobytes())
        for pair in pairs:
            for sequence in (pair.chosen, pair.rejected):
                digest.update(array("Q", [len(sequence.token_ids)]).tobytes())
                digest.update(array("Q", sequence.token_ids).tobytes() + bytes(sequence.loss_mask))
    return digest.hexdigest()


def rank_pairs(items: list[T], distributed: Distributed) -> list[T]:
    """This rank's pairs (or pair indices) of a list whose length divides by the world size: every
    world_size-th, from its rank on (the order gather_groups puts the ranks' results back in)."""
    return items[distributed.rank :: distributed.world_size]


# ----------------------------------------------------------------------------------- the parts


def load_preference_data(cfg: RecipeConfig) -> tuple[list[PreferencePair], list[PreferencePair], list[str]]:
    """Training pairs, the first dpo.max_val_samples validation pairs, and the skipped rows' messages."""
    bad_rows = BadRows(cfg.data.on_bad_row)
    train = load_preference_source(cfg.data.train, split="train", bad_rows=bad_rows)
    validation = []
    if cfg.data.validation is not None:
        validation = load_preference_source(cfg.data.validation, split="validation", bad_rows=bad_rows)[: cfg.dpo.max_val_samples]
    return train, validation, bad_rows.skipped


def tokenize_dpo_data(
    cfg: RecipeConfig,
    train: list[PreferencePair],
    validation: list[PreferencePair],
    skipped_rows: list[str],
    tokenizer: PreTrainedTokenizerBase,
    console: Console,
) -> tuple[list[TokenizedPair], list[TokenizedPair], dict[str, float]]:
    """Training and validation pairs tokenized, and the data/* metrics; skipped rows and dropped
    pairs are noted on the console."""
    max_tokens = cfg.policy.max_total_sequence_length
    tokenize = partial(tokenize_preferences, tokenizer=tokenizer, max_tokens=max_tokens, end_of_turn_id=end_of_turn_id(tokenizer))
    train_pairs, validation_pairs = tokenize(train), tokenize(validation)
    if skipped_rows:
        console.note(f"data: skipped {len(skipped_rows)} malformed rows (data.on_bad_row: skip), first: {'; '.join(skipped_rows[:3])}")
    dropped = train_pairs.dropped + validation_pairs.dropped
    if dropped:
        console.note(
            f"data: dropped {len(train_pairs.dropped)} training and {len(validation_pairs.dropped)} validation pairs with a "
            f"sequence longer than policy.max_total_sequence_length = {max_tokens} tokens, first: {', '.join(dropped[:5])}"
        )
    metrics = {
        "data/train_pairs": float(len(train_pairs.pairs)),
        "data/validation_pairs": float(len(validation_pairs.pairs)),
        "data/dropped_long_pairs": float(len(dropped)),
        "data/skipped_bad_rows": float(len(skipped_rows)),
    }
    return train_pairs.pairs, validation_pairs.pairs, metrics


def build_dpo_run(cfg: RecipeConfig, *, console: Console, distributed: Distributed) -> DPOParts:
    """Run directory, data, model and tokenizer; the data is read before any model is built."""
    log_dir, checkpoint_dir = prepare_run_dir(cfg, distributed)
    torch.manual_seed(cfg.dpo.seed)
    train, validation, skipped = load_preference_data(cfg)
    # model_directory only slices the training data (pairs here) and hands it to corpus_of (a tiny model's tokenizer)
    model_dir = model_directory(cfg, train, log_dir, distributed, corpus_of=preference_corpus)
    model, tokenizer, _ = load_trainable_policy(cfg, model_dir, console, distributed)
    train_pairs, validation_pairs, data_metrics = tokenize_dpo_data(cfg, train, validation, skipped, tokenizer, console)
    processor = load_processor(model_dir, trust_remote_code=cfg.policy.trust_remote_code) if has_vision_tower(model) else None
    return DPOParts(log_dir, checkpoint_dir, model, tokenizer, train_pairs, validation_pairs, processor, data_metrics)


# ------------------------------------------------------------------------- scoring the pairs


def pair_logprobs(
    trainer: PolicyTrainer,
    pairs: list[TokenizedPair],
    *,
    pad_token_id: int,
    distributed: Distributed,
    on_pairs: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Every pair's two responses scored by the current weights: [pairs, 2] (chosen, rejected)
    logprobs summed over their scored tokens, float32 on the host, the same on every rank (each
    scores its share; copies of the first pair even the shares out, so every rank runs the same
    FSDP2 passes, and are dropped). Passes of policy.logprob_batch_size sequences (null:
    train_micro_batch_size sequences, half a training micro-batch's). `on_pairs(n)` after each
    chunk of REFERENCE_CHUNK_PAIRS: n pairs of `pairs` scored by all ranks together (a progress
    display)."""
    if not pairs:
        return torch.zeros((0, 2))
    world = distributed.world_size
    padded = pairs + [pairs[0]] * (-len(pairs) % world)
    share, pieces = rank_pairs(padded, distributed), []
    for start in range(0, len(share), REFERENCE_CHUNK_PAIRS):
        chunk = share[start : start + REFERENCE_CHUNK_PAIRS]
        batch = pair_rows(chunk, pad_token_id=pad_token_id)
        logprobs_BT = trainer.logprobs(batch, temperature=1.0)
        pieces.append(sequence_logprobs(logprobs_BT, batch.loss_mask_BT.to(logprobs_BT.device)).view(-1, 2).float().cpu())
        if on_pairs is not None:
            # Share index i is pair i * world + rank, and the ranks score their chunks in step (FSDP2
            # passes wait for each other): after this chunk, every pair before (start + len) * world is done.
            on_pairs(min((start + len(chunk)) * world, len(pairs)) - min(start * world, len(pairs)))
    if distributed.enabled:  # FSDP2 keeps the root's gathered parameters after a forward, for the backward
        trainer.logprob_module.reshard()  # that never comes here: free them (and shard them for the optimizer again)
    return gather_groups({"logprobs": torch.cat(pieces)}, distributed)["logprobs"][: len(pairs)]


def compute_reference(parts: DPOParts, trainer: PolicyTrainer, distributed: Distributed, console: Console) -> tuple[ReferenceLogprobs, float]:
    """The reference logprobs of every training and validation pair, from the current (initial)
    weights, and the seconds they took; a progress bar counts the pairs."""
    start = time.perf_counter()
    console.start_progress("reference logprobs", total=len(parts.train) + len(parts.validation))
    score = partial(
        pair_logprobs,
        trainer,
        pad_token_id=parts.tokenizer.pad_token_id,
        distributed=distributed,
        on_pairs=lambda pairs: console.advance(amount=pairs),
    )
    reference = ReferenceLogprobs(score(parts.train), score(parts.validation), data_fingerprint(parts.train, parts.validation))
    console.stop_progress()
    seconds = time.perf_counter() - start
    console.note(f"reference logprobs: {len(parts.train)} training and {len(parts.validation)} validation pairs scored in {seconds:.1f} s")
    return reference, seconds


def validation_metrics(
    trainer: PolicyTrainer,
    pairs: list[TokenizedPair],
    reference_P2: torch.Tensor,
    *,
    beta: float,
    sft_weight: float,
    pad_token_id: int,
    distributed: Distributed,
    console: Console | None = None,
) -> dict[str, float]:
    """The DPO loss and its metrics over all the validation `pairs` (validation/*), by the same
    loss function as training, without gradients. With a `console`, the `validation` phase
    counts the pairs."""
    start = time.perf_counter()
    if console is not None:
        console.phase("validation", total=len(pairs))
    on_pairs = console.phase_advance if console is not None else None
    policy_P2 = pair_logprobs(trainer, pairs, pad_token_id=pad_token_id, distributed=distributed, on_pairs=on_pairs)
    _, metrics = dpo_loss(
        policy_P2[:, 0],
        policy_P2[:, 1],
        reference_P2[:, 0],
        reference_P2[:, 1],
        beta=beta,
        sft_weight=sft_weight,
        global_pairs=float(len(pairs)),
        global_chosen_tokens=float(sum(sum(pair.chosen.loss_mask) for pair in pairs)),
    )
    return {**{f"validation/{key}": value for key, value in metrics.items()}, "timing/validation": time.perf_counter() - start}


# ------------------------------------------------------------------------------------ the steps


def train_step(
    parts: DPOParts,
    trainer: PolicyTrainer,
    reference: ReferenceLogprobs,
    cfg: RecipeConfig,
    step: int,
    *,
    distributed: Distributed,
    console: Console,
) -> dict[str, float]:
    """One optimizer step on this rank's share of step `step`'s pairs (the `training` phase, its
    pairs counted); train/* and timing metrics."""
    start = time.perf_counter()
    global_batch = cfg.policy.train_global_batch_size
    indices = rank_pairs(step_indices(step, len(parts.train), global_batch, seed=cfg.dpo.seed, shuffle=cfg.data.shuffle), distributed)
    batch = preference_batch([parts.train[i] for i in indices], reference.train_P2[indices], pad_token_id=parts.tokenizer.pad_token_id)
    console.phase("training", total=len(indices))
    step_metrics = trainer.dpo_step(batch, beta=cfg.dpo.beta, sft_weight=cfg.dpo.sft_weight, on_pairs=console.phase_advance)
    metrics = {f"train/{key}": value for key, value in step_metrics.items()}
    metrics["train/epoch"] = float((step - 1) // steps_per_epoch(len(parts.train), global_batch))
    metrics["timing/training"] = time.perf_counter() - start
    metrics.update({f"memory/training_{kind}_gib": v for kind, v in phase_peak_gib(trainer.device).items()})
    return metrics


def restore(checkpoint: Path, parts: DPOParts, trainer: PolicyTrainer, console: Console) -> tuple[int, ReferenceLogprobs]:
    """Resume where `checkpoint` left off (weights, optimizer, scheduler, RNG, the non-finite
    streak, the reference logprobs; the data position follows from the step). Returns its step
    and the reference logprobs.

    Raises:
        NotADPOCheckpointError: another algorithm wrote it.
        DataError: the data tokenizes differently from the data its reference logprobs belong to.
    """
    loop_state = load_checkpoint(checkpoint, model=parts.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    if loop_state.get("algorithm") != LOOP_STATE_ALGORITHM:  # grpo checkpoints carry no algorithm key
        raise NotADPOCheckpointError(f"{checkpoint} was not written by a dpo run; point logger.log_dir at a new run directory")
    saved = loop_state["reference_logprobs"]
    reference = ReferenceLogprobs(saved["train"], saved["validation"], saved["fingerprint"])
    if reference.fingerprint != data_fingerprint(parts.train, parts.validation):
        raise DataError(
            f"{checkpoint}: its reference logprobs were computed for other preference pairs than this run's (the data, "
            "tokenizer, policy.max_total_sequence_length or dpo.max_val_samples changed); the reference policy is the "
            "initial one, gone from a resumed run: resume with the original data, or start a new run directory"
        )
    resume_trainer(trainer, loop_state, console)
    return loop_state["step"], reference


# ------------------------------------------------------------------------------------- the loop


def run_dpo(cfg: RecipeConfig, *, console: Console, distributed: Distributed | None = None) -> DPOResult:
    """Direct preference optimization, in one process or (under torchrun) one per device: each
    rank trains on its share of every global batch of pairs (FSDP2), the loss normalized over all
    ranks; rank 0 logs. The loop itself is loops/supervised.py's."""
    distributed, console = start_processes(cfg, "dpo", console, distributed)
    dpo = cfg.dpo
    parts = build_dpo_run(cfg, console=console, distributed=distributed)
    num_steps = total_steps(dpo, steps_per_epoch(len(parts.train), cfg.policy.train_global_batch_size, items="pairs"))
    trainer = supervised_trainer(parts.model, cfg, num_steps, distributed)

    checkpoint = checkpoint_to_resume(parts.checkpoint_dir, cfg, distributed)
    first_record = dict(parts.data_metrics)
    if checkpoint is not None:
        resumed_step, reference = restore(checkpoint, parts, trainer, console)
        console.note(f"resumed from {checkpoint} (step {resumed_step}; reference logprobs restored)")
    else:
        resumed_step = -1
        reference, seconds = compute_reference(parts, trainer, distributed, console)
        first_record["timing/reference_logprobs"] = seconds
    pad_token_id = parts.tokenizer.pad_token_id
    validate = partial(
        validation_metrics,
        trainer,
        parts.validation,
        reference.validation_P2,
        beta=dpo.beta,
        sft_weight=dpo.sft_weight,
        pad_token_id=pad_token_id,
        distributed=distributed,
        console=console,
    )
    loop = SupervisedLoop(
        algorithm=LOOP_STATE_ALGORITHM,
        settings=dpo,
        num_steps=num_steps,
        train_step=partial(train_step, parts, trainer, reference, cfg, distributed=distributed, console=console),
        validate=validate if parts.validation else None,
        kept_metric="validation/rewards/accuracy",
        bar_info=lambda metrics: f"loss {metrics['train/loss']:.4f} margin {metrics['train/rewards/margin']:.3f}",
        checkpoint_state={"reference_logprobs": reference.state()},  # constants: a resumed run cannot recompute them
    )
    accuracy = run_supervised_loop(
        loop, parts, trainer, cfg, resumed_step=resumed_step, first_record=first_record, console=console, distributed=distributed
    )
    return DPOResult(log_dir=parts.log_dir, validation_preference_accuracy=accuracy)
