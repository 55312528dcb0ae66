"""The GRPO / DAPO loop: rollout -> score -> advantages -> train -> refresh -> log -> checkpoint.

DAPO is this loop with dynamic sampling, clip-higher, token-level loss and overlong reward
shaping switched on in the recipe. Everything algorithmic is a pure function in
`posttrain.algorithms`; this file only wires the parts, top to bottom.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from posttrain.algorithms.advantages import group_advantages
from posttrain.algorithms.dynamic_sampling import DynamicSamplingBuffer, informative_groups
from posttrain.algorithms.reward_shaping import overlong_filter_mask
from posttrain.checkpoint.store import latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain.config.schema import RecipeConfig
from posttrain.loops.rollouts import PromptImages, generate_and_score
from posttrain.loops.setup import RunParts, build_run, export_final_model
from posttrain.loops.validation import validate
from posttrain.metrics.console import Console
from posttrain.metrics.logger import MetricsLogger
from posttrain.metrics.samples import rollout_samples
from posttrain.training.distributed import Distributed, gather_groups, init_distributed
from posttrain.training.trainer import NonFiniteTrainingError, PolicyTrainer, TrainBatch


@dataclass
class RunResult:
    log_dir: Path
    validation_accuracy: dict[int, float]


def to_train_batch(groups: dict[str, torch.Tensor], cfg: RecipeConfig, images: PromptImages | None = None) -> TrainBatch:
    """Flatten [P, G, ...] groups into samples, compute advantages, trim padding columns; with
    `images`, each row's images by the groups' image_index."""
    grpo = cfg.grpo
    valid_PG = torch.ones_like(groups["rewards"], dtype=torch.bool)
    if grpo.overlong_filtering:
        valid_PG = overlong_filter_mask(groups["truncated"])
    advantages_PG = group_advantages(
        groups["rewards"],
        valid_PG,
        leave_one_out_baseline=grpo.use_leave_one_out_baseline,
        normalize_rewards=grpo.normalize_rewards,
    )
    flat = {key: value.flatten(0, 1) for key, value in groups.items()}
    width = int(flat["attention_mask"].sum(dim=-1).max())
    loss_mask_BT = flat["response_mask"][:, :width] * valid_PG.flatten().unsqueeze(-1)
    return TrainBatch(
        input_ids_BT=flat["input_ids"][:, :width],
        attention_mask_BT=flat["attention_mask"][:, :width],
        loss_mask_BT=loss_mask_BT,
        advantages_B=advantages_PG.flatten(),
        gen_logprobs_BT=flat["gen_logprobs"][:, :width],
        images=images.rows(flat["image_index"]) if images is not None else (),
    )


def rollout_metrics(generated: list[dict[str, torch.Tensor]], kept: dict[str, torch.Tensor]) -> dict[str, float]:
    raw_rewards = torch.cat([g["raw_rewards"].flatten() for g in generated])
    lengths = torch.cat([g["lengths"].flatten() for g in generated])
    truncated = torch.cat([g["truncated"].flatten() for g in generated]).float()
    return {
        "train/reward": float(raw_rewards.mean()),
        "train/accuracy": float((raw_rewards >= 1.0).float().mean()),
        "train/filtered_reward": float(kept["raw_rewards"].mean()),
        "train/shaped_reward": float(kept["rewards"].mean()),
        "train/mean_gen_tokens_per_sample": float(lengths.mean()),
        "train/max_gen_tokens": float(lengths.max()),
        "train/truncation_rate": float(truncated.mean()),
        "train/num_generated_samples": float(raw_rewards.numel()),
    }


def reference_policy(parts: RunParts, cfg: RecipeConfig) -> torch.nn.Module | None:
    """The frozen policy the KL penalty pulls towards: the policy as RL starts (after the warm
    start), saved once in the run directory so that a resumed run uses the same one."""
    if cfg.loss_fn.reference_policy_kl_penalty == 0:
        return None  # no KL term: no reference copy, no reference forward passes
    reference = copy.deepcopy(parts.model).requires_grad_(False).eval()
    path = parts.log_dir / "reference_policy.safetensors"
    if path.is_file():
        load_model(reference, str(path))
    else:  # temporary file, then rename: a kill mid-write must not leave a truncated reference
        tmp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_model(reference, str(tmp_path))
        os.replace(tmp_path, path)
    return reference


def collect_step_groups(
    parts: RunParts, cfg: RecipeConfig, buffer: DynamicSamplingBuffer, step: int, distributed: Distributed | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Generate and score one batch of prompt groups, or several until dynamic sampling has
    `num_prompts_per_step` informative groups. Returns the groups to train on and metrics.

    Under torchrun every rank draws the same prompts, generates and scores every world-th one,
    and receives all ranks' groups: the dynamic-sampling decisions, the carry-over and the data
    position are then the same on every rank, as in one process."""
    distributed = distributed or Distributed()
    rank, world = distributed.rank, distributed.world_size
    grpo = cfg.grpo
    num_prompts = grpo.num_prompts_per_step * (grpo.batch_multiplier if grpo.use_dynamic_sampling else 1)
    metrics: dict[str, float] = {}
    generated = []
    while True:
        seed = grpo.seed * 1_000_003 + step * 1_009 + len(generated) + rank * 7_919_993
        params = replace(parts.sampling_params, seed=seed)
        groups, timings = generate_and_score(
            parts.train_prompts.next_batch(num_prompts)[rank::world],
            engine=parts.engine,
            params=params,
            env=parts.env,
            tokenizer=parts.tokenizer,
            grpo=grpo,
            num_generations=grpo.num_generations_per_prompt,
            width=cfg.policy.max_total_sequence_length,
            images=parts.images,
            console=parts.console,
        )
        for key, value in timings.items():
            metrics[key] = metrics.get(key, 0.0) + value
        groups = gather_groups(groups, distributed)
        generated.append(groups)
        if not grpo.use_dynamic_sampling:
            kept = groups
            break
        buffer.add(groups, informative_groups(groups["rewards"]))
        if buffer.is_full:
            kept = buffer.take()
            if not grpo.dynamic_sampling_carry_over:
                metrics["train/dynamic_sampling_dropped_groups"] = float(buffer.discard_carry_over())
            break
    metrics.update(rollout_metrics(generated, kept))
    if grpo.use_dynamic_sampling:
        sampled = sum(g["rewards"].shape[0] for g in generated)
        informative = sum(int(informative_groups(g["rewards"]).sum()) for g in generated)
        metrics["train/dynamic_sampling_gen_batches"] = float(len(generated))
        metrics["train/dynamic_sampling_kept_fraction"] = informative / sampled
    return kept, metrics


def restore(checkpoint: Path, parts: RunParts, trainer: PolicyTrainer, buffer: DynamicSamplingBuffer) -> int:
    """Resume exactly where `checkpoint` left off: weights, optimizer, scheduler, RNG, data
    position, dynamic-sampling carry-over and the non-finite streak. Returns its step."""
    loop_state = load_checkpoint(checkpoint, model=parts.model, optimizer=trainer.optimizer, scheduler=trainer.scheduler)
    changed = trainer.apply_optimizer_config()
    if changed:
        parts.console.note(f"resume: this run's policy.optimizer settings replace the checkpoint's: {', '.join(changed)}")
    parts.train_prompts.load_state_dict(loop_state["data"])
    buffer.load_state_dict(loop_state["dynamic_sampling"])
    # Checkpoints written before the counter existed never saved a streak: 0 is their true value.
    trainer.consecutive_nonfinite_steps = loop_state.get("consecutive_nonfinite_steps", 0)
    parts.engine.refresh_weights(parts.model.named_parameters())
    return loop_state["step"]


def save(parts: RunParts, trainer: PolicyTrainer, buffer: DynamicSamplingBuffer, step: int) -> None:
    loop_state = {
        "step": step,
        "data": parts.train_prompts.state_dict(),
        "dynamic_sampling": buffer.state_dict(),
        "consecutive_nonfinite_steps": trainer.consecutive_nonfinite_steps,
    }
    save_checkpoint(
        parts.checkpoint_dir,
        step,
        model=parts.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        loop_state=loop_state,
        keep_top_k=parts.cfg.checkpointing.keep_top_k,
    )


def phase_peak_gib(device: torch.device) -> dict[str, float]:
    """CUDA memory since the previous call: the peak of allocated tensors, and what the caching
    allocator holds now (GiB); resets the peak. Empty off CUDA."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak": peak, "reserved": torch.cuda.memory_reserved(device) / 2**30}


def check_nonfinite_streak(
    consecutive: int, limit: int, *, step: int, checkpoint_dir: Path, setting: str = "grpo.max_consecutive_nonfinite_steps"
) -> None:
    """Raise `NonFiniteTrainingError` once `limit` optimizer steps in a row were skipped (`setting`:
    the recipe key of the limit, for the message). Skipped steps never change the weights, so every
    checkpoint on disk holds finite, usable ones."""
    if consecutive < limit:
        return
    checkpoint = latest_checkpoint(checkpoint_dir)
    where = f"the latest checkpoint is {checkpoint}" if checkpoint is not None else "no checkpoint was saved yet"
    raise NonFiniteTrainingError(
        f"step {step}: the last {consecutive} optimizer steps had a non-finite loss or gradient norm and were "
        f"skipped ({setting}: {limit}), so the run stops. The weights never took a "
        f"non-finite update; {where}. Try a lower policy.optimizer.lr or policy.max_grad_norm, check the data and "
        "the environment's rewards for NaN/inf, or train with policy.precision: float32; `posttrain train` with "
        "the changed recipe resumes from the checkpoint with the new settings."
    )


class DistributedRecipeError(ValueError):
    """The recipe cannot run on this many processes (raised before any work)."""


def check_distributed_recipe(cfg: RecipeConfig, world: int) -> None:
    """What a torchrun launch needs from the recipe (any algorithm), checked before any work."""
    grpo, policy = cfg.grpo, cfg.policy
    problems = []
    if cfg.checkpointing.enabled or cfg.checkpointing.export_final:
        problems.append(
            "checkpointing.enabled and checkpointing.export_final: sharded checkpoints are not written yet; "
            "set both to false for a multi-process run"
        )
    if cfg.algorithm == "grpo":
        num_prompts = grpo.num_prompts_per_step * (grpo.batch_multiplier if grpo.use_dynamic_sampling else 1)
        if num_prompts % world:
            problems.append(f"grpo.num_prompts_per_step (x batch_multiplier) = {num_prompts}: must divide by {world} ranks")
        if grpo.use_dynamic_sampling and grpo.num_prompts_per_step % world:
            problems.append(f"grpo.num_prompts_per_step = {grpo.num_prompts_per_step}: must divide by {world} ranks")
    unit = " pairs" if cfg.algorithm == "dpo" else ""  # DPO's batch sizes count preference pairs
    if policy.train_global_batch_size % world:
        problems.append(f"policy.train_global_batch_size = {policy.train_global_batch_size}{unit}: must divide by {world} ranks")
    if problems:
        raise DistributedRecipeError(f"this recipe cannot run on {world} processes: " + "; ".join(problems))


def run_grpo(cfg: RecipeConfig, *, console: Console, distributed: Distributed | None = None) -> RunResult:
    """The loop, in one process or (under torchrun) one per device: every rank generates its share
    of each step's prompts, all ranks see all groups, each trains on its share of the samples
    (FSDP2), and rank 0 logs."""
    if cfg.algorithm != "grpo":
        raise ValueError(f"run_grpo runs algorithm grpo; this recipe's algorithm is {cfg.algorithm} (posttrain.loops.sft.run_sft)")
    distributed = distributed or init_distributed()
    if distributed.enabled:
        check_distributed_recipe(cfg, distributed.world_size)
    if not distributed.is_main:
        console = Console(enabled=False)
    parts: RunParts = build_run(cfg, console=console, distributed=distributed)
    grpo, policy, shown = cfg.grpo, cfg.policy, cfg.logger.sample_generations
    checkpoint = latest_checkpoint(parts.checkpoint_dir) if cfg.checkpointing.enabled or not distributed.enabled else None
    if checkpoint is None:
        parts.run_warm_start()  # the same on every rank; rank 0's weights are broadcast before sharding
    samples_per_step = grpo.num_prompts_per_step * grpo.num_generations_per_prompt
    trainer = PolicyTrainer(
        parts.model,
        policy.model_copy(update={"train_global_batch_size": policy.train_global_batch_size // distributed.world_size}),
        cfg.loss_fn,
        total_optimizer_steps=grpo.max_num_steps * samples_per_step // policy.train_global_batch_size,
        reference_model=reference_policy(parts, cfg),
        distributed=distributed,
    )
    buffer = DynamicSamplingBuffer(grpo.num_prompts_per_step, grpo.dynamic_sampling_max_gen_batches)
    logger = MetricsLogger.for_run(cfg) if distributed.is_main else None

    start_step, validation_accuracy = 0, {}
    first_record = dict(parts.data_metrics)  # data/* counts, logged once with this run's first record
    if checkpoint is not None:
        start_step = restore(checkpoint, parts, trainer, buffer)
        console.note(f"resumed from {checkpoint} (step {start_step})")
    # Records and warnings an earlier attempt logged after this checkpoint (or, without one, at all) are redone.
    console.record_warnings(parts.log_dir / "warnings.log", resumed_step=start_step if checkpoint is not None else -1)
    if logger is not None:
        logger.start(start_step if checkpoint is not None else -1)
    if checkpoint is None and grpo.val_at_start and parts.val_prompts:
        val = validate(parts, cfg, step=0)
        validation_accuracy[0] = val["validation/accuracy"]
        if logger is not None:
            logger.log(0, {**first_record, **val})
        first_record = {}
        console.report_step("grpo", 0, grpo.max_num_steps, val)

    console.start_progress("RL", total=grpo.max_num_steps, completed=start_step, plain_lines=False)
    try:
        for step in range(start_step + 1, grpo.max_num_steps + 1):
            step_start = time.perf_counter()
            kept, metrics = collect_step_groups(parts, cfg, buffer, step, distributed)
            metrics.update(parts.env.pop_metrics())  # this rank's scoring (rank 0's is logged)
            # step 1's generation peak also covers the setup (loading, warm start, the engine's copy)
            memory = {"generation": phase_peak_gib(trainer.device)}

            train_start = time.perf_counter()
            if policy.generation.release_weights_during_training:
                parts.engine.release_weights()  # its own weight copies are overwritten by the refresh below
            batch = to_train_batch(kept, cfg, parts.images)
            share = len(batch) // distributed.world_size  # each rank trains on its share of the samples
            batch = batch.rows(distributed.rank * share, (distributed.rank + 1) * share)
            console.phase("training", total=len(batch))
            train_metrics = trainer.train(batch, temperature=parts.sampling_params.temperature, on_rows=console.phase_advance)
            metrics.update({f"train/{key}": value for key, value in train_metrics.items()})
            metrics["timing/training"] = time.perf_counter() - train_start
            memory["training"] = phase_peak_gib(trainer.device)

            refresh_start = time.perf_counter()
            console.phase("weight refresh")
            parts.engine.refresh_weights(parts.model.named_parameters())
            metrics["timing/weight_refresh"] = time.perf_counter() - refresh_start
            metrics["timing/total_step"] = time.perf_counter() - step_start
            memory["weight_refresh"] = phase_peak_gib(trainer.device)
            metrics.update({f"memory/{phase}_{kind}_gib": v for phase, m in memory.items() for kind, v in m.items()})

            is_last = step == grpo.max_num_steps
            if parts.val_prompts and ((grpo.val_period and step % grpo.val_period == 0) or (is_last and grpo.val_at_end)):
                val = validate(parts, cfg, step=step)
                validation_accuracy[step] = val["validation/accuracy"]
                metrics.update(val)
            if logger is not None:
                if shown.period and step % shown.period == 0:  # sample generations as text
                    logger.log_samples(step, rollout_samples(kept, parts.tokenizer, step=step, count=shown.count))
                logger.log(step, {**first_record, **metrics})
            first_record = {}
            console.report_step("grpo", step, grpo.max_num_steps, metrics)
            console.advance()

            limit = grpo.max_consecutive_nonfinite_steps
            check_nonfinite_streak(trainer.consecutive_nonfinite_steps, limit, step=step, checkpoint_dir=parts.checkpoint_dir)
            if cfg.checkpointing.enabled and (step % cfg.checkpointing.save_period == 0 or is_last):
                console.phase("checkpoint save")
                save(parts, trainer, buffer, step)
            console.end_phase()
    finally:
        if logger is not None:
            logger.close()
    if cfg.checkpointing.export_final:
        console.phase("export")
        export_final_model(parts, cfg, console)
    console.stop_progress()
    return RunResult(log_dir=parts.log_dir, validation_accuracy=validation_accuracy)
