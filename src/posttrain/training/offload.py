"""AdamW with its moments in host memory (`policy.optimizer_offload`), for models whose optimizer
state does not fit beside the weights: AdamW's two fp32 moments are 8 of the 16 bytes per
trainable parameter that training keeps on the GPU (31B: 230 GiB of moments).

The parameters and their gradients stay on the GPU. Each step streams every parameter's moments
through the GPU in chunks: a chunk is copied in, torch's AdamW updates it with the matching chunk of
the parameter and gradient (the fused kernel on CUDA, the kernel the on-device optimizer uses), and
it is copied back. AdamW is elementwise, so the update equals the on-device optimizer's bit for bit.
The step moves 16 bytes per trainable parameter over PCIe and needs two chunks of GPU memory.

Host memory is the moments alone, 8 bytes per trainable scalar (this rank's shards under FSDP2),
in one buffer that is page-locked in place for asynchronous copies. Pinning through torch's
allocator instead would round each tensor up to a power of two: E4B's per-layer embedding table
(2.8B scalars) would take 16 GiB per moment instead of 11.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.optim.adamw import adamw

CHUNK_SCALARS = 1 << 26  # 256 MiB of each fp32 moment on the GPU at a time


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or gradient, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _chunks(tensor: torch.Tensor) -> list[torch.Tensor]:
    flat = tensor.view(-1)
    return [flat[start : start + CHUNK_SCALARS] for start in range(0, flat.numel(), CHUNK_SCALARS)]


def _page_lock(buffer: torch.Tensor, owner: object) -> bool:
    """Pin `buffer` where it lies (cudaHostRegister) until `owner`, which holds it, is collected
    (its finalizers run before its attributes are freed). Returns False when the driver refuses:
    copies still work, synchronously and slower."""
    cudart = torch.cuda.cudart()
    pointer = buffer.data_ptr()
    if int(cudart.cudaHostRegister(pointer, buffer.numel() * buffer.element_size(), 0)) != 0:
        return False
    weakref.finalize(owner, cudart.cudaHostUnregister, pointer)
    return True


class HostAdamW(torch.optim.AdamW):
    """torch's AdamW over the model's parameters, its moments in host memory (see the module docstring)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **adamw_kwargs):
        super().__init__(params, foreach=False, **adamw_kwargs)
        params = [param for group in self.param_groups for param in group["params"]]
        if any(param.dtype != torch.float32 for param in params):
            raise TypeError("optimizer_offload keeps fp32 moments: the trainable parameters must be fp32 masters")
        sizes = [_local(param).numel() for param in params]
        self._buffer = torch.zeros(2 * sum(sizes), dtype=torch.float32)
        self.pinned = torch.cuda.is_available() and _page_lock(self._buffer, self)
        self._moments: dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}
        first, second = self._buffer.split([sum(sizes), sum(sizes)])
        for param, exp_avg, exp_avg_sq in zip(params, first.split(sizes), second.split(sizes), strict=True):
            shape = _local(param).shape
            self._moments[param] = (exp_avg.view(shape), exp_avg_sq.view(shape))
            self.state[param] = self._fresh_state(param)

    def _fresh_state(self, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        exp_avg, exp_avg_sq = self._moments[param]
        return {"step": torch.tensor(0.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("HostAdamW takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the moments are back in host memory before anything reads them

    def _update(self, param: torch.nn.Parameter, group: dict) -> None:
        state = self.state[param]
        value, grad = _local(param), _local(param.grad)
        device = value.device
        pieces = zip(_chunks(value), _chunks(grad), _chunks(state["exp_avg"]), _chunks(state["exp_avg_sq"]), strict=True)
        for value_chunk, grad_chunk, host_avg, host_avg_sq in pieces:
            exp_avg = host_avg.to(device, non_blocking=True)  # the chunk itself when the model is on the CPU
            exp_avg_sq = host_avg_sq.to(device, non_blocking=True)
            adamw(
                [value_chunk],
                [grad_chunk],
                [exp_avg],
                [exp_avg_sq],
                [],
                [state["step"].to(device, copy=True)],  # every chunk counts from this step (adamw increments it)
                foreach=False,
                fused=device.type == "cuda",
                amsgrad=False,
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
            )
            if exp_avg is not host_avg:
                host_avg.copy_(exp_avg, non_blocking=True)
                host_avg_sq.copy_(exp_avg_sq, non_blocking=True)
        state["step"] += 1

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Hyperparameters, step counts and moments from a checkpoint of this optimizer or of torch's
        AdamW; the moments are copied into the host buffer (torch's loader would move them to the
        parameters' device)."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            state = self._fresh_state(param)
            saved = state_dict["state"].get(saved_id)
            if saved is not None:
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key].copy_(_local(saved[key]).reshape(state[key].shape))
                state["step"] = torch.tensor(float(saved["step"]))
            self.state[param] = state
