"""Data-parallel training with FSDP2 (`fully_shard`): one process per device, launched by torchrun.

One process is the default and needs no launcher: `init_distributed()` then reports world size 1
and nothing is sharded. Under torchrun each decoder layer is its own FSDP unit and the root is
`LogprobModule`, the module whose forward computes the policy's logprobs: FSDP2 gathers a unit's
parameters in that unit's forward pre-hook, so the root must be the module that runs (the
chunked head reads the tied embedding outside the backbone's forward).

Mixed precision: parameters and optimizer state stay fp32 on their shards. `param_dtype`
"float32" gathers fp32 parameters and computes under the trainer's bf16 autocast, giving
exactly the one-process arithmetic; "bfloat16" gathers bf16 copies (half the communication,
bf16 norms and residual stream). Gradients are reduced in fp32 and summed, not averaged: the
loss is already normalized by the global token count (the trainer all-reduces it).

Parameter offload (`policy.parameter_offload`): the shards, their gradients and the optimizer
state live in pinned host memory; FSDP2 copies a unit's shards to the GPU before gathering them.
CUDA runs use NCCL for CUDA tensors and gloo for CPU ones (the gradient-norm reduction and the
engine refresh then see CPU shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from posttrain.models.logprobs import packed_token_logprobs, token_logprobs


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None) -> Distributed:
    """Join torchrun's process group (RANK / WORLD_SIZE set), or run as one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"  # collectives on host tensors too (parameter offload's shards)
        dist.init_process_group(backend)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def all_reduce_sum(value: float, distributed: Distributed, device: torch.device) -> float:
    if not distributed.enabled:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor)


class LogprobModule(torch.nn.Module):
    """The policy with its logprob computation as forward: aligned logprobs_BT (column 0 is 0)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor,
        temperature: float,
        packed: bool = False,
        **multimodal_inputs: torch.Tensor,
    ) -> torch.Tensor:
        if packed:
            if multimodal_inputs:
                raise ValueError("policy.sequence_packing is text-only; batches with images run as padded rows")
            return packed_token_logprobs(self.model, input_ids_BT, attention_mask_BT, temperature=temperature)
        logprobs_BT1 = token_logprobs(self.model, input_ids_BT, attention_mask_BT, temperature=temperature, **multimodal_inputs)
        return torch.nn.functional.pad(logprobs_BT1, (1, 0), value=0.0)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    base = model.base_model
    text_model = getattr(base, "language_model", base)
    return list(text_model.layers)


def shard_policy(model: torch.nn.Module, *, param_dtype: str = "float32", offload: bool = False) -> LogprobModule:
    """FSDP2 over the default process group: one unit per decoder layer, the rest in the root.
    `offload`: the shards move to pinned host memory (the model's device stays the compute device)."""
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if param_dtype == "bfloat16" else torch.float32, reduce_dtype=torch.float32
    )
    on_cuda = next(model.parameters()).device.type == "cuda"
    options = {"mp_policy": policy, **({"offload_policy": CPUOffloadPolicy(pin_memory=on_cuda)} if offload else {})}
    broadcast_parameters(model)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    root = fully_shard(LogprobModule(model), **options)
    for module in root.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is globally normalized
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return root


def barrier(distributed: Distributed) -> None:
    if distributed.enabled:
        dist.barrier()


def gather_groups(groups: dict[str, torch.Tensor], distributed: Distributed) -> dict[str, torch.Tensor]:
    """Every rank's [P_r, ...] prompt groups on every rank, in the order of the prompts they came
    from when rank r generated prompts r, r + world, r + 2 world, ... (equal P_r on all ranks)."""
    if not distributed.enabled:
        return groups
    gathered: list = [None] * distributed.world_size
    dist.all_gather_object(gathered, {k: v.cpu() for k, v in groups.items()})
    return {key: torch.stack([g[key] for g in gathered], dim=1).flatten(0, 1) for key in groups}


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank (before sharding: each rank's copy must be the same model)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
