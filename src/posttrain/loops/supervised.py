"""The loop SFT and DPO share, and the pieces of their setup and resume that are the same.

    run_sft / run_dpo (loops/sft.py, loops/dpo.py): check the recipe, build the parts and the
    trainer, restore a checkpoint (DPO: or score the reference logprobs), then
    run_supervised_loop: warnings.log and metrics.jsonl cut back to the resumed step, validation
    at step 0, each step: train -> validate when due -> log -> step line -> non-finite check ->
    checkpoint, then the export.

What differs, each algorithm's file keeps and hands over as a `SupervisedLoop` of plain values
and functions: its data, its step, its validation metrics, what its checkpoints carry besides the
step (DPO: the reference logprobs) and how it restores them. The driver does not know which
algorithm it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.checkpoint.store import latest_checkpoint, save_checkpoint
from posttrain.config.loss import LossConfig
from posttrain.config.schema import DPOConfig, RecipeConfig, SFTConfig
from posttrain.loops.grpo import check_distributed_recipe, check_nonfinite_streak
from posttrain.loops.setup import export_final_model
from posttrain.metrics.console import Console
from posttrain.metrics.logger import MetricsLogger
from posttrain.training.distributed import Distributed, init_distributed
from posttrain.training.trainer import PolicyTrainer

Item = TypeVar("Item")  # a training example: a tokenized conversation (SFT) or preference pair (DPO)


@dataclass
class SupervisedParts(Generic[Item]):
    """A supervised run's directory, model, tokenizer and tokenized data."""

    log_dir: Path
    checkpoint_dir: Path
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    train: list[Item]
    validation: list[Item]
    processor: Any = None  # a multimodal policy's processor, exported with the model
    data_metrics: dict[str, float] = field(default_factory=dict)  # data/*: logged with the run's first record


@dataclass
class SupervisedLoop:
    """What differs between the supervised loops, for `run_supervised_loop`.

    algorithm: "sft" or "dpo": the step line's fields, the bar's label, and the `algorithm` every
        checkpoint stores (a resume refuses another algorithm's checkpoints).
    settings: the recipe's sft or dpo section: validation schedule, non-finite limit.
    num_steps: the run's optimizer steps (sft/dpo max_num_steps, or fewer for max_num_epochs).
    train_step(step): one optimizer step (1-based) -> its train/*, timing/* and memory/* metrics.
    validate(): -> validation/* and timing/validation; None when there is no validation data.
    kept_metric: the validation metric the run's result keeps, per validation step.
    bar_info(metrics): the text after the progress bar once a step is done.
    checkpoint_state: saved in every checkpoint's loop_state besides the step and the streak.
    """

    algorithm: str
    settings: SFTConfig | DPOConfig
    num_steps: int
    train_step: Callable[[int], dict[str, float]]
    validate: Callable[[], dict[str, float]] | None
    kept_metric: str
    bar_info: Callable[[dict[str, float]], str]
    checkpoint_state: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ setup


def start_processes(
    cfg: RecipeConfig, algorithm: str, console: Console, distributed: Distributed | None
) -> tuple[Distributed, Console]:
    """The process group (under torchrun) once the recipe is checked for it, and the console:
    ranks other than 0 get a silent one."""
    if cfg.algorithm != algorithm:
        raise ValueError(f"run_{algorithm} runs algorithm {algorithm}; this recipe's algorithm is {cfg.algorithm}")
    distributed = distributed or init_distributed()
    if distributed.enabled:
        check_distributed_recipe(cfg, distributed.world_size)
    return distributed, console if distributed.is_main else Console(enabled=False)


def supervised_trainer(model: torch.nn.Module, cfg: RecipeConfig, num_steps: int, distributed: Distributed) -> PolicyTrainer:
    """The trainer of `num_steps` optimizer steps, each on this rank's share of the global batch."""
    policy = cfg.policy
    return PolicyTrainer(
        model,
        policy.model_copy(update={"train_global_batch_size": policy.train_global_batch_size // distributed.world_size}),
        LossConfig(),  # the policy-gradient loss's settings: sft_step and dpo_step never read them
        total_optimizer_steps=num_steps,
        distributed=distributed,
    )


def checkpoint_to_resume(checkpoint_dir: Path, cfg: RecipeConfig, distributed: Distributed) -> Path | None:
    """The latest checkpoint, or None; a multi-process run without checkpointing never resumes
    (its checkpoints would be sharded, which is not written yet)."""
    return latest_checkpoint(checkpoint_dir) if cfg.checkpointing.enabled or not distributed.enabled else None


def resume_trainer(trainer: PolicyTrainer, loop_state: dict[str, Any], console: Console) -> None:
    """After load_checkpoint: this run's optimizer settings, and the checkpoint's non-finite streak."""
    changed = trainer.apply_optimizer_config()
    if changed:
        console.note(f"resume: this run's policy.optimizer settings replace the checkpoint's: {', '.join(changed)}")
    trainer.consecutive_nonfinite_steps = loop_state["consecutive_nonfinite_steps"]


# ------------------------------------------------------------------------------------ the loop


def validation_due(settings: SFTConfig | DPOConfig, step: int, *, is_last: bool) -> bool:
    return bool(settings.val_period and step % settings.val_period == 0) or (is_last and settings.val_at_end)


def save(loop: SupervisedLoop, parts: SupervisedParts, trainer: PolicyTrainer, cfg: RecipeConfig, step: int) -> None:
    loop_state = {
        "algorithm": loop.algorithm,  # a resume refuses another algorithm's checkpoints
        "step": step,
        "consecutive_nonfinite_steps": trainer.consecutive_nonfinite_steps,
        **loop.checkpoint_state,
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


def run_supervised_loop(
    loop: SupervisedLoop,
    parts: SupervisedParts,
    trainer: PolicyTrainer,
    cfg: RecipeConfig,
    *,
    resumed_step: int,
    first_record: dict[str, float],
    console: Console,
    distributed: Distributed,
) -> dict[int, float]:
    """Steps resumed_step + 1 .. loop.num_steps (resumed_step: the restored checkpoint's step, -1
    without one), then the export. `first_record` goes into the first logged record. Returns
    loop.kept_metric per validation step of this attempt (step 0: before training)."""
    # What an earlier attempt logged after the checkpoint (or, without one, at all) is redone.
    console.record_warnings(parts.log_dir / "warnings.log", resumed_step=resumed_step)
    logger = MetricsLogger.for_run(cfg) if distributed.is_main else None
    if logger is not None:
        logger.start(resumed_step)
    settings, start_step, kept = loop.settings, max(resumed_step, 0), {}
    try:
        if resumed_step < 0 and settings.val_at_start and loop.validate is not None:
            metrics = loop.validate()
            kept[0] = metrics[loop.kept_metric]
            if logger is not None:
                logger.log(0, {**first_record, **metrics})
            first_record = {}
            console.report_step(loop.algorithm, 0, loop.num_steps, metrics)

        console.start_progress(loop.algorithm.upper(), total=loop.num_steps, completed=start_step, plain_lines=False)
        for step in range(start_step + 1, loop.num_steps + 1):
            metrics = loop.train_step(step)
            is_last = step == loop.num_steps
            if loop.validate is not None and validation_due(settings, step, is_last=is_last):
                metrics.update(loop.validate())
                kept[step] = metrics[loop.kept_metric]
            if logger is not None:
                logger.log(step, {**first_record, **metrics})
            first_record = {}
            console.report_step(loop.algorithm, step, loop.num_steps, metrics)
            console.advance(loop.bar_info(metrics))

            check_nonfinite_streak(
                trainer.consecutive_nonfinite_steps,
                settings.max_consecutive_nonfinite_steps,
                step=step,
                checkpoint_dir=parts.checkpoint_dir,
                setting=f"{loop.algorithm}.max_consecutive_nonfinite_steps",
            )
            if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or is_last):
                console.phase("checkpoint save")
                save(loop, parts, trainer, cfg, step)
            console.end_phase()
    finally:
        if logger is not None:
            logger.close()
    if cfg.checkpointing.export_final:
        console.phase("export")
        export_final_model(parts, cfg, console)
    console.stop_progress()
    return kept
