"""Kill -9 soak test of checkpointing and resume through the real CLI.

Each run trains a shrunken quickstart recipe with `python -m posttrain.cli.main train` in a
subprocess, SIGKILLs it at seeded random moments and re-runs the same command until it finishes.
Three kinds of kill, drawn at random:
- `checkpoint_write`: the harness polls the checkpoint directory and kills the moment the run's
  `.tmp-step_<n>-<pid>` directory appears (the 1st or 2nd save of that attempt); it counts as a kill
  during a checkpoint write when the temporary directory is still there after the process died;
- `training`: after the attempt logged 1 to 3 steps, a random fraction of a step later (inside a
  step's rollout, training, logging or checkpoint save);
- `startup`: a random delay after launch, up to the time the reference run took to log its first
  step (imports, tiny-model build, warm start, checkpoint load).
Each kill costs an attempt at most a few steps of progress, so that a run takes all its kills.
After every kill: every `step_<n>` directory must pass its manifest (sizes, sha256) and load
(weights strictly into the model, trainer state with `weights_only=True`); the work lost (last
logged step - step of the newest checkpoint) must be at most `save_period`; and the next attempt's
first new step must be the one right after that checkpoint. At the end, the final weights and every
step's metrics are compared with an uninterrupted run of the same command (CPU: resume is exact).

    .venv/bin/python benchmarks/soak_kill9.py --runs 5 --kills 10   # -> benchmarks/results/soak_kill9-cpu.json

Every attempt imports posttrain afresh: to soak one version of the code while src/ is being edited,
run it on a copy (`PYTHONPATH=<copy>/src`, which the subprocesses inherit).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model

from posttrain.checkpoint.store import TMP_PREFIX, checkpoint_problem, checkpoint_steps, latest_checkpoint
from posttrain.cli.main import QUICKSTART_RECIPE
from posttrain.models.loading import load_policy

KILL_MODES = ("checkpoint_write", "training", "startup")
KILL_MODE_WEIGHTS = (0.4, 0.35, 0.25)
POLL_S = 0.0005  # a checkpoint of the tiny model is written in tens of milliseconds
ATTEMPT_TIMEOUT_S = 300.0
SUMMARY = (
    "runs",
    "kills",
    "kills_during_checkpoint_write",
    "resumes",
    "checkpoints_verified",
    "max_steps_lost",
    "final_matches_uninterrupted",
)


def train_command(run_dir: Path, *, max_steps: int, save_period: int, keep_top_k: int) -> list[str]:
    """The quickstart recipe shrunk to seconds: a short warm start, 4 prompts x 8 generations a step,
    no validation."""
    overrides = [
        f"logger.log_dir={run_dir}",
        "logger.progress=false",
        "logger.tensorboard_enabled=false",
        "warm_start.num_steps=20",
        f"grpo.max_num_steps={max_steps}",
        "grpo.num_prompts_per_step=4",
        "policy.train_global_batch_size=32",
        "policy.train_micro_batch_size=32",
        "grpo.use_dynamic_sampling=false",  # 20 warm-start steps leave too few informative groups for it
        "grpo.val_period=0",
        "grpo.val_at_start=false",
        "grpo.val_at_end=false",
        f"checkpointing.save_period={save_period}",
        f"checkpointing.keep_top_k={keep_top_k}",
    ]
    return [sys.executable, "-m", "posttrain.cli.main", "train", str(QUICKSTART_RECIPE), *overrides]


def metric_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def last_logged_step(run_dir: Path) -> int:
    return max((json.loads(line)["step"] for line in metric_lines(run_dir)), default=0)


def latest_step(checkpoint_dir: Path) -> int:
    path = latest_checkpoint(checkpoint_dir)
    return int(path.name.removeprefix("step_")) if path is not None else 0


@dataclass
class Attempt:
    """One launch of the command: how it ended."""

    mode: str | None  # the kill planned for it, None: let it finish
    killed: bool = False  # by the harness, as planned
    during_checkpoint_write: bool = False
    returncode: int | None = None
    timed_out: bool = False
    seconds: float = 0.0


class Watch:
    """What the harness sees of one running attempt: the metrics lines it added and the checkpoint
    temporaries it created (named after its pid), refreshed by `poll`."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, before: set[str]):
        self.process, self.run_dir, self.before = process, run_dir, before
        self.start = time.perf_counter()
        self.new_steps, self.first_step_s = 0, None
        self.temporaries: list[str] = []
        self._metrics_size = -1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def poll(self) -> bool:
        """Refresh what is seen; False once the process has exited."""
        if self.process.poll() is not None:
            return False
        checkpoint_dir, metrics = self.run_dir / "checkpoints", self.run_dir / "metrics.jsonl"
        if checkpoint_dir.is_dir():  # first: a kill at a checkpoint write must come fast
            for entry in checkpoint_dir.iterdir():
                name = entry.name
                if name.startswith(f"{TMP_PREFIX}step_") and name.endswith(f"-{self.process.pid}"):
                    self.temporaries += [name] if name not in self.temporaries else []
        size = metrics.stat().st_size if metrics.is_file() else 0
        if size != self._metrics_size:
            self._metrics_size = size
            self.new_steps = sum(line not in self.before for line in metric_lines(self.run_dir))
            if self.new_steps and self.first_step_s is None:
                self.first_step_s = self.elapsed()
        return True


def kill_is_due(mode: str | None, watch: Watch, plan: dict) -> bool:
    """`plan`: the attempt's random draws; `plan["steps_at"]` is filled in when the steps are seen."""
    if mode == "checkpoint_write":
        return len(watch.temporaries) >= plan["nth_save"]
    if mode == "training":
        if "steps_at" not in plan and watch.new_steps >= plan["steps"]:
            plan["steps_at"] = watch.elapsed()
        return "steps_at" in plan and watch.elapsed() >= plan["steps_at"] + plan["step_fraction_s"]
    if mode == "startup":
        return watch.elapsed() >= plan["delay_s"]
    return False


def run_attempt(
    command: list[str], run_dir: Path, log: Path, mode: str | None, rng: random.Random, timing: dict
) -> Attempt:
    """Launch the command once and, unless `mode` is None, SIGKILL it the way `mode` says. Updates
    `timing["startup_s"]` when this attempt reached its first step sooner (the machine got less busy)."""
    plan = {
        "nth_save": rng.randint(1, 2),
        "steps": rng.randint(1, 3),
        "step_fraction_s": rng.uniform(0, timing["step_s"]),
        "delay_s": rng.uniform(0, timing["startup_s"]),
    }
    attempt = Attempt(mode=mode)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        watch = Watch(process, run_dir, set(metric_lines(run_dir)))
        while watch.poll():
            due = kill_is_due(mode, watch, plan)
            if due or watch.elapsed() > ATTEMPT_TIMEOUT_S:
                process.send_signal(signal.SIGKILL)
                attempt.killed, attempt.timed_out = due, not due
                break
            time.sleep(POLL_S)
        process.wait()
    if mode == "checkpoint_write" and attempt.killed:
        attempt.during_checkpoint_write = (run_dir / "checkpoints" / watch.temporaries[plan["nth_save"] - 1]).exists()
    if watch.first_step_s is not None:
        timing["startup_s"] = min(timing["startup_s"], watch.first_step_s)
    attempt.returncode, attempt.seconds = process.returncode, watch.elapsed()
    return attempt


def verify_checkpoints(checkpoint_dir: Path, model: torch.nn.Module) -> tuple[int, list[str]]:
    """Every `step_<n>` directory: manifest (sizes, sha256), weights loaded strictly into `model`,
    trainer state loaded with weights_only=True and holding step n. Returns (verified, problems)."""
    verified, problems = 0, []
    for step in checkpoint_steps(checkpoint_dir):
        path = checkpoint_dir / f"step_{step}"
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                load_model(model, str(path / "model.safetensors"), strict=True)
                state = torch.load(path / "trainer_state.pt", weights_only=True)
                if state["loop"]["step"] != step:
                    problem = f"trainer_state.pt holds step {state['loop']['step']}"
            except Exception as error:  # noqa: BLE001 - any failure to load is what is being counted
                problem = f"{type(error).__name__}: {error}"
        if problem is None:
            verified += 1
        else:
            problems.append(f"{path.name}: {problem}")
    return verified, problems


def scratch_model(run_dir: Path) -> torch.nn.Module | None:
    """The run's tiny model to load checkpoints into; None until the run has written it."""
    if not (run_dir / "init_model" / "model.safetensors").is_file():
        return None
    try:
        return load_policy(run_dir / "init_model")
    except Exception:  # noqa: BLE001 - killed while the tiny model was being written: the resume will tell
        return None


def first_new_step(run_dir: Path, before: set[str]) -> int | None:
    """The step of the first metrics line an attempt added (timings make every line unique)."""
    new = [line for line in metric_lines(run_dir) if line not in before]
    return json.loads(new[0])["step"] if new else None


@dataclass
class RunFigures:
    seed: int
    attempts: int = 0
    kills: int = 0
    kills_by_mode: dict[str, int] = field(default_factory=dict)
    kills_during_checkpoint_write: int = 0
    resumes: int = 0
    resumes_from_a_checkpoint: int = 0
    resumes_checked: int = 0  # resumed attempts whose first new step was checked
    resume_failures: list[str] = field(default_factory=list)
    checkpoints_verified: int = 0
    checkpoint_problems: list[str] = field(default_factory=list)
    steps_lost: list[int] = field(default_factory=list)
    completed: bool = False
    seconds: float = 0.0


def soak_run(
    command: list[str], run_dir: Path, *, kills: int, seed: int, timing: dict, modes: list[str] | None = None
) -> RunFigures:
    """Run `command` to completion, SIGKILLing it `kills` times (modes drawn by `seed` unless given)."""
    rng, figures, start = random.Random(seed), RunFigures(seed=seed), time.perf_counter()
    model, expected_resume = None, None  # expected_resume: the checkpoint step the next logged step must follow
    plan = modes or rng.choices(KILL_MODES, weights=KILL_MODE_WEIGHTS, k=kills)
    while True:  # ends: every attempt either takes one of the planned kills or is the last one
        mode = plan[figures.kills] if figures.kills < len(plan) else None
        if figures.attempts:
            figures.resumes += 1
            figures.resumes_from_a_checkpoint += latest_step(run_dir / "checkpoints") > 0
        before = set(metric_lines(run_dir))
        attempt = run_attempt(
            command, run_dir, run_dir.parent / f"{run_dir.name}-attempt{figures.attempts}.log", mode, rng, timing
        )
        figures.attempts += 1
        if expected_resume is not None and (step := first_new_step(run_dir, before)) is not None:
            figures.resumes_checked += 1
            if step != expected_resume + 1:
                figures.resume_failures.append(
                    f"attempt {figures.attempts}: first new step {step}, expected {expected_resume + 1}"
                )
            expected_resume = None
        if not attempt.killed:
            if attempt.returncode != 0:
                tail = (run_dir.parent / f"{run_dir.name}-attempt{figures.attempts - 1}.log").read_text()[-2000:]
                ended = "timed out" if attempt.timed_out else f"exit code {attempt.returncode}"
                figures.resume_failures.append(f"attempt {figures.attempts}: {ended}: {tail}")
            figures.completed = attempt.returncode == 0
            break
        figures.kills += 1
        figures.kills_by_mode[mode] = figures.kills_by_mode.get(mode, 0) + 1
        figures.kills_during_checkpoint_write += attempt.during_checkpoint_write
        if model is None:
            model = scratch_model(run_dir)
        if model is not None:
            verified, problems = verify_checkpoints(run_dir / "checkpoints", model)
            figures.checkpoints_verified += verified
            figures.checkpoint_problems += [f"after kill {figures.kills}: {p}" for p in problems]
        expected_resume = latest_step(run_dir / "checkpoints")
        figures.steps_lost.append(last_logged_step(run_dir) - expected_resume)
    figures.seconds = time.perf_counter() - start
    return figures


def compare_runs(run_dir: Path, reference_dir: Path, max_steps: int) -> dict:
    """Final weights and every step's metrics (timings and data/* counts aside) against the reference."""
    final, reference = (
        load_file(d / "checkpoints" / f"step_{max_steps}" / "model.safetensors") for d in (run_dir, reference_dir)
    )
    weight_diff = max((float((final[k] - reference[k]).abs().max()) for k in reference), default=math.inf)
    records, reference_records = ([json.loads(line) for line in metric_lines(d)] for d in (run_dir, reference_dir))
    logged_steps = [r["step"] for r in records]
    by_step = {r["step"]: r for r in records}
    compared = lambda record: {k: v for k, v in record.items() if not k.startswith(("timing/", "data/"))}  # noqa: E731
    differing, metric_diff = set(), 0.0
    for expected in map(compared, reference_records):
        record = compared(by_step.get(expected["step"], {}))
        differing |= record.keys() ^ expected.keys()
        for key in record.keys() & expected.keys() - {"step"}:
            if isinstance(expected[key], str) or isinstance(record[key], str):  # "nan"/"inf", logged as text
                differing |= {key} if record[key] != expected[key] else set()
                continue
            diff = abs(record[key] - expected[key]) / max(abs(expected[key]), 1e-7)
            metric_diff = max(metric_diff, diff)
            differing |= {key} if diff > 1e-5 else set()
    steps_ok = logged_steps == [r["step"] for r in reference_records] == list(range(1, max_steps + 1))
    return {
        "final_weights_identical": final.keys() == reference.keys() and weight_diff == 0.0,
        "max_abs_weight_diff": weight_diff,
        "logged_steps": "1..n once each" if steps_ok else logged_steps,
        "max_rel_metric_diff": metric_diff,
        "differing_metrics": sorted(differing),
        "matches": steps_ok and final.keys() == reference.keys() and weight_diff <= 1e-6 and not differing,
    }


def reference_run(command: list[str], run_dir: Path, max_steps: int) -> dict:
    """The uninterrupted run; also times start-up (launch to first logged step) and steps, for drawing kill times."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = Watch(process, run_dir, set())
    while watch.poll() and watch.first_step_s is None:
        time.sleep(0.005)
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    step_s = sum(json.loads(line)["timing/total_step"] for line in metric_lines(run_dir)) / max_steps
    return {"startup_s": watch.first_step_s, "step_s": step_s, "seconds": watch.elapsed()}


def shown_command(command: list[str]) -> str:
    """`command` as run from a checkout's root, free of this machine's paths."""
    recipe = Path("src") / QUICKSTART_RECIPE.relative_to(QUICKSTART_RECIPE.parents[2])
    return " ".join(["python", *command[1:]]).replace(str(QUICKSTART_RECIPE), str(recipe))


def soak(
    work_dir: Path,
    *,
    runs: int,
    kills: int,
    seed: int,
    max_steps: int = 24,
    save_period: int = 2,
    keep_top_k: int = 2,
    modes: list[str] | None = None,
) -> dict:
    """The whole soak: an uninterrupted reference run, then `runs` killed-and-resumed runs; the figures."""
    start = time.perf_counter()
    settings = {"max_steps": max_steps, "save_period": save_period, "keep_top_k": keep_top_k}
    reference = reference_run(train_command(work_dir / "reference", **settings), work_dir / "reference", max_steps)
    timing = dict(reference)  # run_attempt lowers its startup_s when attempts reach their first step sooner
    per_run = []
    for index in range(runs):
        run_dir = work_dir / f"run{index}"
        figures = soak_run(
            train_command(run_dir, **settings), run_dir, kills=kills, seed=seed + index, timing=timing, modes=modes
        )
        comparison = (
            compare_runs(run_dir, work_dir / "reference", max_steps) if figures.completed else {"matches": False}
        )
        per_run.append({**asdict(figures), "comparison": comparison})
    steps_lost = [lost for run in per_run for lost in run["steps_lost"]]
    return {
        "command": shown_command(train_command(Path("<run_dir>"), **settings)),
        **settings,
        "seed": seed,
        "runs": runs,
        "kills": sum(r["kills"] for r in per_run),
        "kills_by_mode": {m: sum(r["kills_by_mode"].get(m, 0) for r in per_run) for m in KILL_MODES},
        "kills_during_checkpoint_write": sum(r["kills_during_checkpoint_write"] for r in per_run),
        "resumes": sum(r["resumes"] for r in per_run),
        "resumes_from_a_checkpoint": sum(r["resumes_from_a_checkpoint"] for r in per_run),
        "resumes_first_step_checked": sum(r["resumes_checked"] for r in per_run),
        "resume_failures": [f for r in per_run for f in r["resume_failures"]],
        "runs_completed": sum(r["completed"] for r in per_run),
        "checkpoints_verified": sum(r["checkpoints_verified"] for r in per_run),
        "checkpoint_problems": [p for r in per_run for p in r["checkpoint_problems"]],
        "max_steps_lost": max(steps_lost, default=0),
        "final_matches_uninterrupted": all(r["comparison"]["matches"] for r in per_run),
        "reference": reference,
        "startup_s_at_end": timing["startup_s"],
        "per_run": per_run,
        "wall_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--runs", type=int, default=3)
    args.add_argument("--kills", type=int, default=8, help="SIGKILLs per run")
    args.add_argument("--seed", type=int, default=0)
    args.add_argument("--max-steps", type=int, default=24)
    args.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak_kill9-cpu.json")
    args.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    opts = args.parse_args(argv)
    work_dir = Path(tempfile.mkdtemp(prefix="soak_kill9-"))
    try:
        result = soak(work_dir, runs=opts.runs, kills=opts.kills, seed=opts.seed, max_steps=opts.max_steps)
    finally:
        if opts.keep:
            print(f"run directories: {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    invocation = " ".join(["python benchmarks/soak_kill9.py", *(sys.argv[1:] if argv is None else argv)])
    opts.out.write_text(json.dumps({"benchmark_command": invocation, **result}, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in SUMMARY}))
    ok = (
        not result["resume_failures"]
        and not result["checkpoint_problems"]
        and result["runs_completed"] == opts.runs
        and result["max_steps_lost"] <= result["save_period"]
    )
    return 0 if ok and result["final_matches_uninterrupted"] else 1


if __name__ == "__main__":
    sys.exit(main())
