"""GPU-hours of the test suites: each launcher's runs x nodes x GPUs x minutes, summed per suite.

    python tests/suites/budget.py          # a table per suite; exit 1 when nightly is over its cap

A launcher (tests/suites/*/*.sh) declares NUM_NODES, GPUS_PER_NODE and NUM_MINUTES (its wall-clock
budget; common.sh stops the run there) as plain `NAME=value` lines; a suite file (nightly.txt,
release.txt) lists launchers, one per line (a launcher listed twice runs twice), `#` comments.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parent
SUITES = ("nightly", "release")
NIGHTLY_GPU_HOURS_CAP = 24.0
_SETTING = re.compile(r"^(NUM_NODES|GPUS_PER_NODE|NUM_MINUTES)=(\d+)\s*$", re.MULTILINE)


def launchers() -> list[Path]:
    return sorted(SUITES_DIR.glob("*/*.sh"))


def launcher_settings(path: Path) -> dict[str, int]:
    settings = {name: int(value) for name, value in _SETTING.findall(path.read_text())}
    missing = {"NUM_NODES", "GPUS_PER_NODE", "NUM_MINUTES"} - settings.keys()
    if missing:
        raise ValueError(f"{path}: no {', '.join(sorted(missing))} line")
    return settings


def gpu_hours(path: Path) -> float:
    s = launcher_settings(path)
    return s["NUM_NODES"] * s["GPUS_PER_NODE"] * s["NUM_MINUTES"] / 60


def suite_entries(name: str) -> list[Path]:
    """The launchers suite `name` runs, in order (relative paths resolved under tests/suites)."""
    lines = (SUITES_DIR / f"{name}.txt").read_text().splitlines()
    entries = [SUITES_DIR / line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    for entry in entries:
        if not entry.is_file():
            raise ValueError(f"{name}.txt lists {entry.relative_to(SUITES_DIR)}, which does not exist")
    return entries


def suite_gpu_hours(name: str) -> float:
    return sum(gpu_hours(path) for path in suite_entries(name))


def main() -> int:
    for name in SUITES:
        print(f"{name}: {suite_gpu_hours(name):.1f} GPU-hours")
        for path in suite_entries(name):
            s = launcher_settings(path)
            print(f"  {path.relative_to(SUITES_DIR)}: {s['NUM_NODES']} x {s['GPUS_PER_NODE']} GPUs x {s['NUM_MINUTES']} min = {gpu_hours(path):.1f}")
    nightly = suite_gpu_hours("nightly")
    if nightly > NIGHTLY_GPU_HOURS_CAP:
        print(f"nightly is {nightly:.1f} GPU-hours, over its cap of {NIGHTLY_GPU_HOURS_CAP:.0f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
