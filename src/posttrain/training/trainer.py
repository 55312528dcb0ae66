"""The policy trainer: fp32 master weights, autocast compute, micro-batching, one normalization.

The trainer does not know which algorithm it runs: it takes a `TrainBatch` (tokens, loss mask,
advantages, generator logprobs) and the loss config (`train`), a `SupervisedBatch` of
conversations (`sft_step`) or a `PreferenceBatch` of pairs (`dpo_step`), and owns the only place
where the loss is normalized: each optimizer step's token (sequence, pair) count over the whole
step's samples is computed once and handed to every micro-batch's loss, so accumulation over
micro-batches gives exactly the full-batch loss and gradient whatever the micro-batch size. All
steps end in the same clip / update / skip.

A step whose loss or gradient norm is not finite is skipped whole: no backward after the
non-finite loss, gradients zeroed, no optimizer update (weights and Adam moments stay bit for
bit what they were), so the weights are never poisoned and any checkpoint holds finite ones. The
lr schedule still advances (it counts attempted steps). `consecutive_nonfinite_steps` counts the
skips in a row; the loop decides when there were too many.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from posttrain.algorithms.dpo_loss import dpo_loss, sequence_logprobs
from posttrain.algorithms.mismatch import gen_kl_error, token_mult_prob_error
from posttrain.algorithms.pg_loss import clipped_pg_loss
from posttrain.algorithms.sft_loss import sft_loss
from posttrain.config.loss import LossConfig
from posttrain.config.schema import PolicyConfig
from posttrain.models.document_attention import resolve_training_attention, set_training_attention
from posttrain.rollout.base import MultimodalPrompt, image_inputs
from posttrain.training.batching import micro_batches
from posttrain.training.distributed import Distributed, LogprobModule, all_reduce_sum, decoder_layers, shard_policy
from posttrain.training.embedding_grads import embedding_tables, sparse_backward, zero_dense_grads
from posttrain.training.offload import HostAdamW


class MasterWeightsError(TypeError):
    """Raised when trainable weights are not fp32: optimizer updates would be silently lost to rounding."""


class NonFiniteTrainingError(RuntimeError):
    """Raised by the loop after grpo.max_consecutive_nonfinite_steps optimizer steps in a row were skipped."""


def assert_fp32_master_weights(model: torch.nn.Module) -> None:
    wrong = [f"{name} ({p.dtype})" for name, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if wrong:
        raise MasterWeightsError(
            f"{len(wrong)} trainable parameters are not float32 master weights, e.g. {', '.join(wrong[:3])}; "
            "load the policy with posttrain.models.load_policy (which keeps fp32 masters) and choose the compute "
            "dtype with policy.precision instead of casting the model"
        )


@dataclass
class TrainBatch:
    """Samples as right-padded rows of prompt + response tokens; `images` holds each row's image
    tensors (None for a text-only row), or is empty for a text-only batch."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor  # 1 on response tokens that count in the loss
    advantages_B: torch.Tensor
    gen_logprobs_BT: torch.Tensor  # logprobs the rollout engine reported (0 off the response)
    images: tuple[MultimodalPrompt | None, ...] = ()

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    def _tensors(self) -> list[torch.Tensor]:
        return [self.input_ids_BT, self.attention_mask_BT, self.loss_mask_BT, self.advantages_B, self.gen_logprobs_BT]

    def rows(self, start: int, stop: int) -> TrainBatch:
        return TrainBatch(*(t[start:stop] for t in self._tensors()), images=self.images[start:stop])

    def to(self, device: torch.device) -> TrainBatch:
        images = tuple(None if m is None else m.to(device) for m in self.images)
        return TrainBatch(*(t.to(device) for t in self._tensors()), images=images)

    def multimodal_inputs(self) -> dict[str, torch.Tensor]:
        """The rows' images for the model's forward, in row order (each row's placeholders take
        its own images in turn); empty when no row has one."""
        return image_inputs(self.images)


@dataclass
class SupervisedBatch:
    """Supervised sequences as right-padded rows; `images` holds each row's image tensors (None
    for a text-only row), or is empty for a text-only batch (as in `TrainBatch`)."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor  # 1 on the supervised tokens (logprobs_BT[:, t] scores token t)
    images: tuple[MultimodalPrompt | None, ...] = ()

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    def rows(self, start: int, stop: int) -> SupervisedBatch:
        return SupervisedBatch(
            self.input_ids_BT[start:stop], self.attention_mask_BT[start:stop], self.loss_mask_BT[start:stop], self.images[start:stop]
        )

    def to(self, device: torch.device) -> SupervisedBatch:
        images = tuple(None if m is None else m.to(device) for m in self.images)
        return SupervisedBatch(self.input_ids_BT.to(device), self.attention_mask_BT.to(device), self.loss_mask_BT.to(device), images)

    def multimodal_inputs(self) -> dict[str, torch.Tensor]:
        """The rows' images for the model's forward, in row order; empty when no row has one."""
        return image_inputs(self.images)


@dataclass
class PreferenceBatch:
    """Preference pairs for DPO: `sequences` holds pair p's chosen sequence (prompt + response) in
    row 2p and its rejected one in row 2p + 1, the responses' scored tokens in the loss mask;
    `reference_logprobs_P2[p]` holds the reference policy's logprobs of the two responses (chosen,
    rejected), summed over those tokens. Rows are sliced by pair, so a pair is never split."""

    sequences: SupervisedBatch
    reference_logprobs_P2: torch.Tensor

    def __len__(self) -> int:
        return len(self.reference_logprobs_P2)

    def rows(self, start: int, stop: int) -> PreferenceBatch:
        """Pairs start..stop."""
        return PreferenceBatch(self.sequences.rows(2 * start, 2 * stop), self.reference_logprobs_P2[start:stop])

    def to(self, device: torch.device) -> PreferenceBatch:
        return PreferenceBatch(self.sequences.to(device), self.reference_logprobs_P2.to(device))

    def pair_lengths(self) -> list[int]:
        """Real tokens of each pair's two sequences together (what a token budget counts)."""
        return self.sequences.attention_mask_BT.sum(dim=-1).view(-1, 2).sum(dim=-1).tolist()


def aligned_token_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float, *, packed: bool = False
) -> torch.Tensor:
    """logprobs_BT[:, t] scores the batch's token t; column 0 is 0. `packed`: computed as one packed
    sequence (same values, no padding computed)."""
    return LogprobModule(model)(batch.input_ids_BT, batch.attention_mask_BT, temperature, packed, **batch.multimodal_inputs())


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, decay: str) -> float:
    """Linear warm-up over `warmup_steps`, then constant, linear or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if decay == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PolicyTrainer:
    def __init__(
        self,
        model: torch.nn.Module,
        policy: PolicyConfig,
        loss: LossConfig,
        *,
        total_optimizer_steps: int,
        reference_model: torch.nn.Module | None = None,
        distributed: Distributed | None = None,
    ):
        """`reference_model` (frozen) is needed only when the loss has a KL penalty (beta > 0).
        `distributed` (torchrun, world size > 1): the model is sharded with FSDP2 here, each rank
        trains on its own rows, and the loss is normalized by the token count over all ranks."""
        assert_fp32_master_weights(model)
        # Where batches go and the model computes: the parameters' device now (parameter offload
        # later moves the shards to the host).
        self.device = next(model.parameters()).device
        self.attention = resolve_training_attention(policy.attention, model, self.device)
        for module in (model, reference_model):
            if module is not None:
                set_training_attention(module, self.attention)
        self.distributed = distributed or Distributed()
        if self.distributed.enabled and policy.train_micro_batch_tokens is not None:
            raise ValueError(
                "policy.train_micro_batch_tokens: token-budget micro-batches would give ranks different numbers "
                "of FSDP forward/backward passes; use train_micro_batch_size under torchrun"
            )
        if policy.compile:  # per layer, before sharding (FSDP2's hooks stay outside the compiled regions)
            # One graph per kind of layer (window, head size, KV sharing, MLP width). E2B has more
            # kinds than dynamo's default of 8 recompiles per function, past which it runs the rest eagerly.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for layer in decoder_layers(model):
                layer.compile()
        if policy.parameter_offload and not self.distributed.enabled:
            raise ValueError(
                "policy.parameter_offload shards the parameters to host memory with FSDP2: launch with torchrun "
                "(2 or more processes), or use optimizer_offload in one process"
            )
        if self.distributed.enabled:
            self.logprob_module = shard_policy(model, param_dtype=policy.fsdp_param_dtype, offload=policy.parameter_offload)
        else:
            self.logprob_module = LogprobModule(model)
        if loss.reference_policy_kl_penalty > 0 and reference_model is None:
            raise ValueError("loss_fn.reference_policy_kl_penalty > 0 needs a reference model")
        self.model = model
        # one process: embedding gradients accumulate in place over micro-batches (embedding_grads.py)
        self.embedding_tables = [] if self.distributed.enabled else embedding_tables(model)
        self.reference_model = reference_model if loss.reference_policy_kl_penalty > 0 else None
        self.policy = policy
        self.loss_cfg = loss
        opt = policy.optimizer
        trainable = [p for p in model.parameters() if p.requires_grad]
        if policy.optimizer_offload:
            self.optimizer = HostAdamW(trainable, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
        else:  # on CUDA one fused kernel per parameter group instead of foreach's chain of kernels
            fused = all(p.device.type == "cuda" for p in trainable) or None
            self.optimizer = torch.optim.AdamW(
                trainable, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay, fused=fused
            )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(
                step,
                warmup_steps=policy.scheduler.warmup_steps,
                total_steps=total_optimizer_steps,
                decay=policy.scheduler.decay,
            ),
        )
        self.consecutive_nonfinite_steps = 0  # optimizer steps skipped in a row (non-finite loss or grad norm)

    def apply_optimizer_config(self) -> list[str]:
        """After a resume: use this run's optimizer settings, not the checkpoint's (loading the
        optimizer's state restores the lr, betas, eps and weight decay it was saved with), so that
        a run restarted with, say, a lower lr trains with it. The lr keeps its schedule position.
        Returns the settings that changed; with none changed nothing is touched (exact resume)."""
        opt = self.policy.optimizer
        wanted = {"betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
        changed = set()
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            if base_lr != opt.lr:
                changed.add(f"lr {base_lr:g} -> {opt.lr:g}")
            saved = {"betas": tuple(group["betas"]), "eps": group["eps"], "weight_decay": group["weight_decay"]}
            changed.update(f"{key} {saved[key]} -> {value}" for key, value in wanted.items() if saved[key] != value)
        if not changed:
            return []
        multiplier = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)  # the lr of the next step, per unit
        self.scheduler.base_lrs = [opt.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group.update(wanted, lr=opt.lr * multiplier, initial_lr=opt.lr)
        return sorted(changed)

    def autocast(self):
        if self.policy.precision == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def logprobs(
        self, batch: TrainBatch | SupervisedBatch, temperature: float, on_rows: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Logprobs of every token under the current weights, micro-batched, no gradient;
        `on_rows(n)` after each micro-batch, n its rows (a progress display)."""
        size = self.policy.logprob_batch_size or self.policy.train_micro_batch_size
        chunks = []
        for start, stop in self._micro_batches(batch, size):
            rows = batch.rows(start, stop).to(self.device)
            with self.autocast():
                chunks.append(
                    self.logprob_module(
                        rows.input_ids_BT, rows.attention_mask_BT, temperature, self.policy.sequence_packing, **rows.multimodal_inputs()
                    )
                )
            if on_rows is not None:
                on_rows(stop - start)
        return torch.cat(chunks)

    def _micro_batches(self, batch: TrainBatch | SupervisedBatch, max_rows: int) -> list[tuple[int, int]]:
        lengths = batch.attention_mask_BT.sum(dim=-1).tolist()
        return micro_batches(lengths, max_rows, self.policy.train_micro_batch_tokens)

    def train(self, batch: TrainBatch, temperature: float, on_rows: Callable[[int], None] | None = None) -> dict[str, float]:
        """One or more optimizer steps over `batch` (train_global_batch_size samples each);
        `on_rows(n)` after each micro-batch's backward, n its rows (a progress display).

        With one optimizer step per rollout batch the old-policy logprobs equal the current ones
        (detached), so they come from the same forward pass. With several, they are computed up
        front, before the weights move.
        """
        global_batch = self.policy.train_global_batch_size
        old_logprobs_BT = self.logprobs(batch, temperature) if len(batch) > global_batch else None
        totals: dict[str, float] = defaultdict(float)
        num_steps = 0
        for start in range(0, len(batch), global_batch):
            step_old = old_logprobs_BT[start : start + global_batch] if old_logprobs_BT is not None else None
            for key, value in self._optimizer_step(batch.rows(start, start + global_batch), step_old, temperature, on_rows).items():
                totals[key] += value
            num_steps += 1
        metrics = {key: value / num_steps for key, value in totals.items()}
        metrics["skipped_nonfinite_steps"] = totals["skipped_nonfinite_steps"]  # a count, not a mean
        metrics["consecutive_nonfinite_steps"] = float(self.consecutive_nonfinite_steps)
        return metrics

    def _optimizer_step(
        self, batch: TrainBatch, old_logprobs_BT: torch.Tensor | None, temperature: float, on_rows: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        self.model.train()
        mask_BT = batch.loss_mask_BT.float()
        if self.loss_cfg.token_level_loss:
            global_normalizer = float(mask_BT.sum())
        else:
            global_normalizer = float((mask_BT.sum(dim=-1) > 0).sum())
        global_normalizer = all_reduce_sum(global_normalizer, self.distributed, self.device)
        metrics: dict[str, float] = defaultdict(float)
        finite = True  # every micro-batch's loss so far
        lp_old_pieces = []
        packed = self.policy.sequence_packing
        zero_dense_grads(self.embedding_tables)
        for start, stop in self._micro_batches(batch, self.policy.train_micro_batch_size):
            rows = batch.rows(start, stop).to(self.device)
            with self.autocast(), sparse_backward(self.embedding_tables):
                logprobs_BT = self.logprob_module(
                    rows.input_ids_BT, rows.attention_mask_BT, temperature, packed, **rows.multimodal_inputs()
                )
            rows_old_BT = logprobs_BT.detach() if old_logprobs_BT is None else old_logprobs_BT[start:stop]
            lp_old_pieces.append(rows_old_BT)
            ref_logprobs_BT = None
            if self.reference_model is not None:
                with torch.no_grad(), self.autocast():
                    ref_logprobs_BT = aligned_token_logprobs(self.reference_model, rows, temperature, packed=packed)
            loss, loss_metrics = clipped_pg_loss(
                logprobs_BT,
                rows_old_BT,
                rows.advantages_B,
                rows.loss_mask_BT.float(),
                self.loss_cfg,
                global_normalizer=max(global_normalizer, 1.0),
                gen_logprobs_BT=rows.gen_logprobs_BT,
                ref_logprobs_BT=ref_logprobs_BT,
            )
            finite = finite and math.isfinite(loss_metrics["loss"])  # already a python float: no extra sync
            # After a non-finite loss the step is skipped and its backward would only be wasted; with
            # several ranks every rank runs it anyway (each backward's reduce-scatter needs all of them).
            if finite or self.distributed.enabled:
                loss.backward()
            for key, value in loss_metrics.items():  # includes "loss": summed over micro-batches
                metrics[key] += value
            if on_rows is not None:
                on_rows(stop - start)

        if self.distributed.enabled:  # normalized like the loss: the sums over ranks are the global values
            metrics = defaultdict(float, {k: all_reduce_sum(v, self.distributed, self.device) for k, v in metrics.items()})
            finite = math.isfinite(metrics["loss"])
        metrics.update(self._apply_gradients(finite))

        old_BT = torch.cat(lp_old_pieces).to(mask_BT.device)
        metrics["token_mult_prob_error"] = token_mult_prob_error(batch.gen_logprobs_BT, old_BT, mask_BT)
        metrics["gen_kl_error"] = gen_kl_error(batch.gen_logprobs_BT, old_BT, mask_BT)
        for key in ("token_mult_prob_error", "gen_kl_error"):  # ranks hold equal row counts: mean of means
            metrics[key] = all_reduce_sum(metrics[key], self.distributed, self.device) / self.distributed.world_size
        return dict(metrics)

    def _apply_gradients(self, finite: bool) -> dict[str, float]:
        """End an optimizer step whose backward passes are done: clip, then update, or skip the
        update whole when the loss (`finite` False) or the gradient norm is not finite; advance
        the lr schedule either way. Returns grad_norm (pre-clip), lr and skipped_nonfinite_steps."""
        metrics = {"grad_norm": float("nan")}
        if finite:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad],
                self.policy.max_grad_norm if self.policy.max_grad_norm is not None else float("inf"),
            )
            metrics["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            finite = math.isfinite(metrics["grad_norm"])
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]  # the lr this step uses
        if finite:
            self.optimizer.step()
            self.consecutive_nonfinite_steps = 0
        else:  # skipped whole: the gradients (partial or NaN) are dropped below, weights and moments untouched
            self.consecutive_nonfinite_steps += 1
        metrics["skipped_nonfinite_steps"] = 0.0 if finite else 1.0
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when a run's first optimizer step is skipped: on purpose here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        return metrics

    def sft_step(self, batch: SupervisedBatch, on_rows: Callable[[int], None] | None = None) -> dict[str, float]:
        """One optimizer step of supervised fine-tuning on `batch`, this rank's rows of one global
        batch: loss = -(sum of the supervised tokens' logprobs) / (supervised tokens of the whole
        global batch, all ranks), accumulated over micro-batches (and packed when
        policy.sequence_packing), so neither changes the loss or the gradient. Logprobs at
        temperature 1: the model's own distribution. `on_rows(n)` after each micro-batch's
        backward, n its rows (a progress display). Returns loss, supervised_tokens, grad_norm, lr,
        skipped_nonfinite_steps and consecutive_nonfinite_steps."""
        self.model.train()
        supervised_tokens = all_reduce_sum(float(batch.loss_mask_BT.sum()), self.distributed, self.device)
        loss_sum, finite = 0.0, True
        zero_dense_grads(self.embedding_tables)
        for start, stop in self._micro_batches(batch, self.policy.train_micro_batch_size):
            rows = batch.rows(start, stop).to(self.device)
            with self.autocast(), sparse_backward(self.embedding_tables):
                logprobs_BT = self.logprob_module(
                    rows.input_ids_BT, rows.attention_mask_BT, 1.0, self.policy.sequence_packing, **rows.multimodal_inputs()
                )
            loss, loss_metrics = sft_loss(logprobs_BT, rows.loss_mask_BT.float(), global_normalizer=max(supervised_tokens, 1.0))
            finite = finite and math.isfinite(loss_metrics["loss"])
            if finite or self.distributed.enabled:  # as in _optimizer_step: every rank runs every backward
                loss.backward()
            loss_sum += loss_metrics["loss"]
            if on_rows is not None:
                on_rows(stop - start)
        if self.distributed.enabled:
            loss_sum = all_reduce_sum(loss_sum, self.distributed, self.device)
            finite = math.isfinite(loss_sum)
        metrics = {"loss": loss_sum, "supervised_tokens": supervised_tokens, **self._apply_gradients(finite)}
        metrics["consecutive_nonfinite_steps"] = float(self.consecutive_nonfinite_steps)
        return metrics

    def dpo_step(
        self, batch: PreferenceBatch, *, beta: float, sft_weight: float, on_pairs: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        """One optimizer step of DPO on `batch`, this rank's pairs of one global batch (loss in
        algorithms/dpo_loss.py). A micro-batch holds train_micro_batch_size whole pairs (both
        sequences in one forward pass, packed when policy.sequence_packing); every micro-batch's
        loss divides by the pairs and chosen-response tokens of the whole global batch (all ranks),
        so neither micro-batch size, packing nor the number of processes changes the loss or the
        gradient. Logprobs at temperature 1. `on_pairs(n)` after each micro-batch's backward, n its
        pairs (a progress display). Returns the loss and its metrics (rewards/*, logps/*, ...),
        pairs, chosen_tokens, grad_norm, lr, skipped_nonfinite_steps and consecutive_nonfinite_steps."""
        self.model.train()
        global_pairs = all_reduce_sum(float(len(batch)), self.distributed, self.device)
        chosen_tokens = float(batch.sequences.loss_mask_BT[0::2].sum())
        global_chosen_tokens = all_reduce_sum(chosen_tokens, self.distributed, self.device)
        metrics: dict[str, float] = defaultdict(float)
        finite = True
        zero_dense_grads(self.embedding_tables)
        for start, stop in micro_batches(batch.pair_lengths(), self.policy.train_micro_batch_size, self.policy.train_micro_batch_tokens):
            pairs = batch.rows(start, stop).to(self.device)
            rows = pairs.sequences
            with self.autocast(), sparse_backward(self.embedding_tables):
                logprobs_BT = self.logprob_module(rows.input_ids_BT, rows.attention_mask_BT, 1.0, self.policy.sequence_packing)
            policy_P2 = sequence_logprobs(logprobs_BT, rows.loss_mask_BT).view(-1, 2)
            reference_P2 = pairs.reference_logprobs_P2
            loss, loss_metrics = dpo_loss(
                policy_P2[:, 0],
                policy_P2[:, 1],
                reference_P2[:, 0],
                reference_P2[:, 1],
                beta=beta,
                sft_weight=sft_weight,
                global_pairs=global_pairs,
                global_chosen_tokens=global_chosen_tokens,
            )
            finite = finite and math.isfinite(loss_metrics["loss"])
            if finite or self.distributed.enabled:  # as in _optimizer_step: every rank runs every backward
                loss.backward()
            for key, value in loss_metrics.items():  # shares of global means: they sum
                metrics[key] += value
            if on_pairs is not None:
                on_pairs(stop - start)
        if self.distributed.enabled:
            metrics = defaultdict(float, {k: all_reduce_sum(v, self.distributed, self.device) for k, v in metrics.items()})
            finite = math.isfinite(metrics["loss"])
        metrics.update(pairs=global_pairs, chosen_tokens=global_chosen_tokens, **self._apply_gradients(finite))
        metrics["consecutive_nonfinite_steps"] = float(self.consecutive_nonfinite_steps)
        return dict(metrics)
