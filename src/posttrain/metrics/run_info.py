"""What a run ran on: `<log_dir>/environment.json`, written by rank 0 at every (re)start next to
the resolved config.yaml.

It holds the start time, the command line, the world size, Python and the platform, the versions
of the packages that decide the numbers (torch, transformers, ...), the CUDA build and GPUs, and the
git commit (with a dirty flag) of the working directory's repository and of posttrain's own source
when either is a git checkout. Nothing here may fail a run: a missing git, a package that is not
installed or a repository without commits leave that entry null.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ENVIRONMENT_FILE = "environment.json"

# Distribution names (as pip knows them) whose versions are recorded; null when not installed.
PACKAGES = (
    "posttrain",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "datasets",
    "pydantic",
    "numpy",
    "math-verify",
    "reasoning-gym",
    "tensorboard",
    "wandb",
    "mlflow-skinny",
    "mlflow",
)

# Settings that change what a run does or where it runs; never secrets (no tokens, keys or URLs).
ENVIRONMENT_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NCCL_NVLS_ENABLE",
    "OMP_NUM_THREADS",
    "WANDB_MODE",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: Path) -> dict[str, str | bool] | None:
    """The commit checked out in the git repository holding `directory`, and whether tracked files
    differ from it; None outside a repository, without git, or before the first commit."""

    def git(*args: str) -> str:
        return subprocess.run(
            # --no-optional-locks: `status` must not take the index lock a concurrent git command holds
            ["git", "--no-optional-locks", *args], cwd=directory, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {
            "root": git("rev-parse", "--show-toplevel"),
            "commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, no commit yet, a hung git
        return None


def accelerator_info() -> dict:
    import torch

    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "cuda": torch.version.cuda,  # the CUDA torch was built with; null for a CPU build
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "devices": devices,  # the GPUs this process sees (CUDA_VISIBLE_DEVICES applies)
    }


def run_info(world_size: int) -> dict:
    package_dir = Path(__file__).resolve().parents[1]  # src/posttrain of a checkout, or site-packages/posttrain
    git_cwd = git_state(Path.cwd())
    git_package = git_state(package_dir)
    return {
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "cwd": str(Path.cwd()),
        "world_size": world_size,
        "hostname": platform.node(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "accelerator": accelerator_info(),
        "git": git_cwd,  # the working directory's repository
        # posttrain's own source, when it runs from a checkout other than the working directory's
        "posttrain_git": git_package if git_package != git_cwd else None,
        "environment_variables": {name: os.environ[name] for name in ENVIRONMENT_VARIABLES if name in os.environ},
    }


def write_run_info(log_dir: str | Path, world_size: int) -> Path:
    """Write `<log_dir>/environment.json` for this (re)start; a resume replaces the earlier one."""
    path = Path(log_dir) / ENVIRONMENT_FILE
    path.write_text(json.dumps(run_info(world_size), indent=2) + "\n")
    return path
