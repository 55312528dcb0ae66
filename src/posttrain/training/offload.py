"""AdamW with its state in host memory (`policy.optimizer_offload`), for models whose optimizer
state does not fit beside the weights: 8 of the 16 bytes per parameter that fp32 masters, their
gradients and AdamW's two moments take on the GPU (31B: 230 GiB of moments).

The optimizer runs on host copies of the parameters (fp32, pinned when a GPU is used): each step
copies the gradients to the host, takes torch's AdamW step there, and copies the updated values
back into the device parameters. The arithmetic is torch's AdamW on the same fp32 values, so the
update equals the on-device optimizer's. Under FSDP2 each rank offloads its own shards. The step
is bound by host memory bandwidth (about 16 bytes read and written per parameter).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or gradient, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class HostAdamW(torch.optim.AdamW):
    """torch's AdamW over host copies of `params`; `step` moves gradients in and values out."""

    def __init__(self, params: Iterable[torch.nn.Parameter], **adamw_kwargs):
        self.device_params = list(params)
        pin = torch.cuda.is_available()
        host_params = []
        for param in self.device_params:
            local = _local(param.detach())
            host = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=pin)
            host_params.append(torch.nn.Parameter(host.copy_(local), requires_grad=True))
        super().__init__(host_params, **adamw_kwargs)
        self._host_params = host_params

    @property
    def device_param_groups(self) -> list[list[torch.nn.Parameter]]:
        """The model's parameters, in the order of `param_groups` (for checkpoint name checks)."""
        return [self.device_params]

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Moments and step counts from a checkpoint; the values to update are the device
        parameters', which a resume has just loaded (the checkpoint loads the model first)."""
        super().load_state_dict(state_dict)
        for device_param, host_param in zip(self.device_params, self._host_params, strict=True):
            host_param.copy_(_local(device_param.detach()))

    def host_param(self, device_param: torch.nn.Parameter) -> torch.nn.Parameter:
        """The host copy the optimizer state of `device_param` is keyed by."""
        return self._host_params[next(i for i, p in enumerate(self.device_params) if p is device_param)]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise NotImplementedError("HostAdamW takes no closure")
        for device_param, host_param in zip(self.device_params, self._host_params, strict=True):
            if device_param.grad is None:
                host_param.grad = None
                continue
            if host_param.grad is None:
                host_param.grad = torch.empty_like(host_param)
            host_param.grad.copy_(_local(device_param.grad), non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the gradients have reached the host
        super().step()
        for device_param, host_param in zip(self.device_params, self._host_params, strict=True):
            if host_param.grad is not None:
                _local(device_param).copy_(host_param, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.device_params:
            param.grad = None if set_to_none else (param.grad.zero_() if param.grad is not None else None)
        super().zero_grad(set_to_none=False)  # keep the host gradient buffers (pinned) for the next step
