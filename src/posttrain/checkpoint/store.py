"""Atomic checkpoints: written to a temporary directory, verified by a manifest, renamed into place.

A checkpoint directory `step_<n>` holds the policy weights (safetensors), the optimizer and
scheduler state, RNG states, the data position and the dynamic-sampling carry-over. The optimizer
state is positional (the i-th parameter of each group), so the checkpoint also records the names
of the parameters the optimizer holds, and loading refuses an optimizer holding other ones (a
resume with a different `policy.freeze_config`) instead of pairing Adam moments with the wrong
weights. Weights are copied into the model's existing parameters, which keep their dtype (fp32
masters stay fp32) and stay the ones the optimizer holds. Loading uses `torch.load(weights_only=True)`:
no pickled code is ever executed.

A process killed at any moment (SIGKILL, OOM, preemption, power loss) never leaves a checkpoint
that a resume would half-load:
1. Everything is written into `.tmp-step_<n>-<pid>/`, each file fsynced, then `manifest.json`
   (the step, each file's size and sha256) is written and fsynced last: a directory without a
   valid manifest was never finished.
2. The directory is fsynced, renamed to `step_<n>` and the parent directory fsynced, so that on a
   real filesystem a crash cannot leave a renamed directory whose files never reached the disk.
3. Only then are old checkpoints pruned (`keep_top_k`); a pruned one is first renamed back to a
   `.tmp-` name, so it leaves the `step_` namespace in one atomic step.
`latest_checkpoint` skips `.tmp-` directories and any `step_` directory that fails verification
(with a warning) and falls back to the newest complete one. Leftover `.tmp-` directories of a
killed writer are removed by the next save: a checkpoint directory has one writer (one run).
The hashes cost one extra read of each file when saving and one when resuming (only the checkpoint
picked is hashed, and those newer that fail): one to two seconds per GB on one CPU core.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"

logger = logging.getLogger(__name__)


class CheckpointOptimizerMismatchError(ValueError):
    """The checkpoint's optimizer held other parameters than the optimizer it is loaded into."""


def checkpoint_steps(root: str | Path) -> list[int]:
    """Steps of the `step_<n>` directories under `root`, ascending, complete or not."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [
        int(p.name[len(STEP_PREFIX) :])
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit()
    ]
    return sorted(steps)


def checkpoint_problem(path: str | Path, *, check_hashes: bool = True) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is. Sizes catch a truncated file,
    sha256 (`check_hashes`) also a corrupted one; the manifest itself is written last."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        step = int(manifest["step"])
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (the save never finished)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable {MANIFEST} ({type(error).__name__}: {error})"
    if path.name != f"{STEP_PREFIX}{step}":
        return f"{MANIFEST} is for step {step}"
    if set(files) != {MODEL_FILE, STATE_FILE}:
        return f"{MANIFEST} lists {sorted(files)}, not {sorted([MODEL_FILE, STATE_FILE])}"
    for name, (size, sha256) in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST} says {size}"
        if check_hashes and _sha256(file) != sha256:
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`; incomplete or corrupted ones are skipped with a warning."""
    for step in reversed(checkpoint_steps(root)):
        path = Path(root) / f"{STEP_PREFIX}{step}"
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s; falling back to the previous one", path, problem)
    return None


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
    """Write `root/step_<step>` atomically (see the module docstring), then prune to `keep_top_k`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(root)
    tmp = root / f"{TMP_PREFIX}{STEP_PREFIX}{step}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / MODEL_FILE))
    state = {
        "optimizer": optimizer.state_dict(),
        "optimizer_parameter_names": optimizer_parameter_names(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "loop": loop_state,
    }
    torch.save(state, tmp / STATE_FILE)
    _write_manifest(tmp, step)
    final = root / f"{STEP_PREFIX}{step}"
    _publish(tmp, final)
    if keep_top_k is not None:
        _prune(root, keep_top_k=keep_top_k, newest=step)
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
    state = torch.load(path / STATE_FILE, weights_only=True)
    _check_optimizer_parameters(state["optimizer_parameter_names"], optimizer_parameter_names(model, optimizer), path)
    load_model(model, str(path / MODEL_FILE), strict=True)  # copies into the existing parameters
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["loop"]


def _write_manifest(tmp: Path, step: int) -> None:
    """Fsync the payload files, then write the manifest last: its presence vouches for them."""
    files = {}
    for name in (MODEL_FILE, STATE_FILE):
        _fsync(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)  # the directory entries of the files


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary into place. A re-save of the same step (only happens after a
    resume fell back past an unusable `final`) first moves the old copy out of the `step_` namespace:
    a directory cannot be renamed onto a non-empty one."""
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself


def _prune(root: Path, *, keep_top_k: int, newest: int) -> None:
    """Keep `newest` and the `keep_top_k - 1` newest complete checkpoints before it; remove the other
    older ones (incomplete ones never count as kept). Directories of later steps are left alone: they
    are not this run's (a resume never starts before a complete one) and `latest_checkpoint` skips
    them with a warning if they are unusable."""
    older = [s for s in reversed(checkpoint_steps(root)) if s < newest]
    complete = [s for s in older if checkpoint_problem(root / f"{STEP_PREFIX}{s}", check_hashes=False) is None]
    kept = set(complete[: keep_top_k - 1])
    for step in older:
        if step not in kept:
            _discard(root / f"{STEP_PREFIX}{step}")


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed to a temporary name first (atomic), so that a crash
    halfway through the deletion leaves a `.tmp-` directory, never a half-deleted `step_` one."""
    aside = path.with_name(f"{TMP_PREFIX}discard-{path.name}-{os.getpid()}")
    os.replace(path, aside)
    _fsync(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_temporaries(root: Path) -> None:
    """Remove what killed writers left behind (an unfinished save, a half-deleted old checkpoint)."""
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            logger.info("removing %s, left by an interrupted checkpoint save", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
