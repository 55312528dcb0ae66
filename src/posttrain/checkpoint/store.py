"""Atomic checkpoints: written to a temporary directory, then renamed into place.

A checkpoint directory `step_<n>` holds the policy weights (safetensors), the optimizer and
scheduler state, RNG states, the data position and the dynamic-sampling carry-over. The optimizer
state is positional (the i-th parameter of each group), so the checkpoint also records the names
of the parameters the optimizer holds, and loading refuses an optimizer holding other ones (a
resume with a different `policy.freeze_config`) instead of pairing Adam moments with the wrong
weights. Weights are copied into the model's existing parameters, which keep their dtype (fp32
masters stay fp32) and stay the ones the optimizer holds. Loading uses `torch.load(weights_only=True)`:
no pickled code is ever executed. Old checkpoints are pruned only after the new one is complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

STEP_PREFIX = "step_"


class CheckpointOptimizerMismatchError(ValueError):
    """The checkpoint's optimizer held other parameters than the optimizer it is loaded into."""


def checkpoint_steps(root: str | Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [
        int(p.name[len(STEP_PREFIX) :])
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(steps)


def latest_checkpoint(root: str | Path) -> Path | None:
    steps = checkpoint_steps(root)
    return Path(root) / f"{STEP_PREFIX}{steps[-1]}" if steps else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The model's name of each parameter the optimizer holds, per parameter group, in optimizer order."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names.get(id(p), "<not a model parameter>") for p in group["params"]] for group in optimizer.param_groups]


def _check_optimizer_parameters(saved: list[list[str]], current: list[list[str]], path: Path) -> None:
    if saved == current:
        return
    saved_flat, current_flat = [n for g in saved for n in g], [n for g in current for n in g]
    only_saved = [n for n in saved_flat if n not in set(current_flat)]
    only_current = [n for n in current_flat if n not in set(saved_flat)]
    raise CheckpointOptimizerMismatchError(
        f"{path}: the checkpoint's optimizer holds {len(saved_flat)} parameters, this run's {len(current_flat)} "
        f"(only in the checkpoint: {only_saved[:5]}; only in this run: {only_current[:5]}); resume with the "
        "policy.freeze_config of the run that saved it"
    )


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loop_state: dict[str, Any],
    keep_top_k: int | None,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step}"
    tmp = root / f".tmp-{STEP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "optimizer_parameter_names": optimizer_parameter_names(model, optimizer),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "loop": loop_state,
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "meta.json").write_text(json.dumps({"step": step}))
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same step replaces the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_top_k is not None:
        for old in checkpoint_steps(root)[:-keep_top_k]:
            shutil.rmtree(root / f"{STEP_PREFIX}{old}", ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG in place; return the loop state."""
    path = Path(path)
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    _check_optimizer_parameters(state["optimizer_parameter_names"], optimizer_parameter_names(model, optimizer), path)
    load_model(model, str(path / "model.safetensors"), strict=True)  # copies into the existing parameters
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["loop"]


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir() if path.is_dir() else []:
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
