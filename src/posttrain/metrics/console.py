"""Console output: a live display of the run, one compact line per step, and warnings.

Two pure functions decide what is said, and are unit-tested with hand-made dicts:

- `step_line(algorithm, step, total, metrics)`: one line per step, fields in a fixed order and
  padded to fixed widths so that successive lines align;
- `step_warnings(step, metrics, state)`: mismatch metrics over their thresholds (NeMo-RL's, see
  docs/algorithms.md), dynamic sampling discarding most groups, skipped non-finite steps. A
  condition is announced when it starts, reminded at most every `REMIND_EVERY` steps while it
  lasts, and its recovery is said once.

`Console` prints them. On a terminal (and with logger.progress: true) it also shows a live display:
the run's overall bar with an ETA and, under it, the current phase of the step (GRPO: rollout with
responses and tokens finished, scoring, training with the samples done, weight refresh; SFT and
DPO: training with the rows or pairs done; all: validation, checkpoint save, export), or the bar
of a stage before the steps (GRPO's warm start, DPO's reference logprobs). Elsewhere (CI logs, a
file, logger.progress: false) it prints plain lines only, with no ANSI escapes: the step lines,
and for a phase that runs long (a real model's first step compiles for minutes) a line every
`HEARTBEAT_SECONDS` with its progress, then how long it took, so that a log someone follows never
goes quiet for minutes. Only the process that owns the console prints: the loops give ranks other
than 0 a disabled one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console as RichConsole
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

TME_THRESHOLD = 1.05  # train/token_mult_prob_error: NeMo-RL investigates above (docs/algorithms.md)
GEN_KL_THRESHOLD = 1e-3  # train/gen_kl_error: "about 1e-3 is acceptable"
KEPT_FRACTION_THRESHOLD = 0.5  # dynamic sampling kept fewer than half the groups it sampled: most were discarded
REMIND_EVERY = 10  # steps between reminders while a warning's condition lasts
DESCRIPTION_WIDTH = 18  # the live display's label column: "  checkpoint save", "warm start (SFT)"
HEARTBEAT_SECONDS = 30.0  # without a live display: the longest a running phase stays silent


# ------------------------------------------------------------------------------- the step line


@dataclass(frozen=True)
class Field:
    """One field of the step line: `label value unit`, the value right-aligned in `width`
    characters (nan and inf too). `value` returns None when the metrics do not have it: the
    field is left out."""

    label: str
    value: Callable[[dict[str, float]], float | None]
    spec: str
    width: int
    unit: str = ""

    def render(self, metrics: dict[str, float]) -> str | None:
        value = self.value(metrics)
        if value is None:
            return None
        text = format(value, self.spec) if math.isfinite(value) else str(value)
        return f"{self.label} {text:>{self.width}}{self.unit}" if self.label else f"{text:>{self.width}}{self.unit}"


def metric(key: str) -> Callable[[dict[str, float]], float | None]:
    return lambda metrics: metrics.get(key)


def per_second(
    amount: Callable[[dict[str, float]], float | None], seconds_key: str
) -> Callable[[dict[str, float]], float | None]:
    def value(metrics: dict[str, float]) -> float | None:
        numerator, seconds = amount(metrics), metrics.get(seconds_key)
        return None if numerator is None or not seconds else numerator / seconds

    return value


def generated_tokens(metrics: dict[str, float]) -> float | None:
    if "train/num_generated_samples" not in metrics or "train/mean_gen_tokens_per_sample" not in metrics:
        return None
    return metrics["train/num_generated_samples"] * metrics["train/mean_gen_tokens_per_sample"]


GRAD_NORM = Field("gnorm", metric("train/grad_norm"), ".3f", 6)
LR = Field("lr", metric("train/lr"), ".1e", 7)

# Per algorithm: the fields of every step, then the validation fields (on validation steps only,
# last so that they never shift the others).
STEP_FIELDS: dict[str, tuple[list[Field], list[Field]]] = {
    "grpo": (
        [
            Field("reward", metric("train/reward"), ".3f", 6),
            Field("acc", metric("train/accuracy"), ".3f", 5),
            Field("len", metric("train/mean_gen_tokens_per_sample"), ".1f", 6),
            Field("trunc", metric("train/truncation_rate"), ".2f", 4),
            Field("tme", metric("train/token_mult_prob_error"), ".4f", 6),
            Field("gen-kl", metric("train/gen_kl_error"), ".1e", 8),
            GRAD_NORM,
            LR,
            Field("kept", metric("train/dynamic_sampling_kept_fraction"), ".2f", 4),
            Field("", metric("timing/total_step"), ".1f", 6, "s"),
            Field("", per_second(generated_tokens, "timing/generation"), ",.0f", 7, " tok/s"),
        ],
        [Field("val acc", metric("validation/accuracy"), ".3f", 5)],
    ),
    "sft": (
        [
            Field("loss", metric("train/loss"), ".4f", 7),
            GRAD_NORM,
            LR,
            Field("", metric("timing/training"), ".1f", 6, "s"),
            Field("", per_second(metric("train/supervised_tokens"), "timing/training"), ",.0f", 7, " tok/s"),
        ],
        [Field("val loss", metric("validation/loss"), ".4f", 7)],
    ),
    "dpo": (
        [
            Field("loss", metric("train/loss"), ".4f", 7),
            Field("acc", metric("train/rewards/accuracy"), ".3f", 5),
            Field("margin", metric("train/rewards/margin"), ".3f", 7),
            GRAD_NORM,
            LR,
            Field("", metric("timing/training"), ".1f", 6, "s"),
            Field("", per_second(metric("train/pairs"), "timing/training"), ",.1f", 6, " pairs/s"),
        ],
        [
            Field("val loss", metric("validation/loss"), ".4f", 7),
            Field("val acc", metric("validation/rewards/accuracy"), ".3f", 5),
        ],
    ),
}


def step_line(algorithm: str, step: int, total: int, metrics: dict[str, float]) -> str:
    """`step   3/100  reward  0.412  acc 0.412  ...`: the algorithm's fields (STEP_FIELDS) in a
    fixed order, two spaces apart; fields whose metrics are absent are left out, and a step whose
    optimizer update was skipped says so at the end."""
    every_step, validation = STEP_FIELDS[algorithm]
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    parts += [text for field in (*every_step, *validation) if (text := field.render(metrics)) is not None]
    if metrics.get("train/skipped_nonfinite_steps", 0.0) > 0:
        parts.append("SKIPPED (non-finite)")
    return "  ".join(parts)


# ---------------------------------------------------------------------------------- warnings


@dataclass(frozen=True)
class Check:
    """A condition worth a warning. `over(metrics)`: True while it holds, None when this step did
    not measure it (the state carries over unchanged); `warning` and `recovery` describe it."""

    name: str
    over: Callable[[dict[str, float]], bool | None]
    warning: Callable[[dict[str, float]], str]
    recovery: Callable[[dict[str, float]], str]


def above(key: str, threshold: float) -> Callable[[dict[str, float]], bool | None]:
    """Over the threshold, or not finite (a nan counts as a crossing, as in `posttrain report`)."""
    return lambda metrics: None if key not in metrics else not metrics[key] <= threshold


CHECKS = [
    Check(
        "token_mult_prob_error",
        above("train/token_mult_prob_error", TME_THRESHOLD),
        lambda m: (
            f"train/token_mult_prob_error {m['train/token_mult_prob_error']:.4f} > {TME_THRESHOLD}: the generator's "
            "logprobs disagree with the trainer's (generation dtype, sampling settings, weight refresh; docs/algorithms.md)"
        ),
        lambda m: f"train/token_mult_prob_error {m['train/token_mult_prob_error']:.4f} is back under {TME_THRESHOLD}",
    ),
    Check(
        "gen_kl_error",
        above("train/gen_kl_error", GEN_KL_THRESHOLD),
        lambda m: (
            f"train/gen_kl_error {m['train/gen_kl_error']:.1e} > {GEN_KL_THRESHOLD:.0e}: the generator samples from "
            "another distribution than the trainer scores (docs/algorithms.md)"
        ),
        lambda m: f"train/gen_kl_error {m['train/gen_kl_error']:.1e} is back under {GEN_KL_THRESHOLD:.0e}",
    ),
    Check(
        "dynamic_sampling",
        lambda m: (
            None
            if "train/dynamic_sampling_kept_fraction" not in m
            else m["train/dynamic_sampling_kept_fraction"] < KEPT_FRACTION_THRESHOLD
        ),
        lambda m: (
            f"dynamic sampling kept {m['train/dynamic_sampling_kept_fraction']:.0%} of the groups it sampled "
            f"({m.get('train/dynamic_sampling_gen_batches', 1):.0f} generation batches): most groups' rewards all agree "
            "(every response right, or every one wrong), so steps generate more; the run stops when "
            "grpo.dynamic_sampling_max_gen_batches cannot fill a batch"
        ),
        lambda m: (
            f"dynamic sampling keeps {m['train/dynamic_sampling_kept_fraction']:.0%} of the groups it samples again"
        ),
    ),
    Check(
        "nonfinite",
        lambda m: None if "train/skipped_nonfinite_steps" not in m else m["train/skipped_nonfinite_steps"] > 0,
        lambda m: (
            f"optimizer step skipped: non-finite loss or gradient norm "
            f"({m.get('train/consecutive_nonfinite_steps', 1):.0f} in a row; the weights are unchanged)"
        ),
        lambda m: "optimizer steps are finite again",
    ),
]

# check name -> (the step its condition started, the step last warned about it)
WarningState = dict[str, tuple[int, int]]


def step_warnings(
    step: int, metrics: dict[str, float], state: WarningState, *, remind_every: int = REMIND_EVERY
) -> tuple[list[str], WarningState]:
    """The messages `step`'s metrics call for, and the new state (`state` is not changed).

    `warning (step s): ...` when a condition starts, `warning (step s, since step f): still ...`
    at most every `remind_every` steps while it lasts, `recovered (step s): ...` when it ends."""
    messages, state = [], dict(state)
    for check in CHECKS:
        over = check.over(metrics)
        if over is None:
            continue
        if over and check.name not in state:
            messages.append(f"warning (step {step}): {check.warning(metrics)}")
            state[check.name] = (step, step)
        elif over and step - state[check.name][1] >= remind_every:
            first = state[check.name][0]
            messages.append(f"warning (step {step}, since step {first}): still {check.warning(metrics)}")
            state[check.name] = (first, step)
        elif not over and check.name in state:
            first, _ = state.pop(check.name)
            messages.append(f"recovered (step {step}): {check.recovery(metrics)} (since step {first})")
    return messages, state


WARNING_STEP = re.compile(r"^(?:warning|recovered) \(step (\d+)")  # the step a step_warnings message is about


def warnings_through(log_text: str, step: int) -> list[str]:
    """The lines of a warnings.log about steps up to `step` (-1: none), in order. A last line
    without its newline (a process killed mid-write) is dropped, and lines naming no step are kept."""
    lines = log_text.split("\n")[:-1]  # text after the last newline is empty, or the torn line
    return [line for line in lines if (found := WARNING_STEP.match(line)) is None or int(found[1]) <= step]


# ----------------------------------------------------------------------------------- console


class CountColumn(ProgressColumn):
    """`37/256`, or nothing for a task without a total (a phase that reports no progress)."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{task.completed:.0f}/{task.total:.0f}")


class EtaColumn(ProgressColumn):
    """`ETA 0:38:40`: the mean seconds per step this session (a resumed run's earlier steps
    excluded) times the steps left, less the time the current step has run; nothing for tasks
    that ask for no ETA (the phases), before the first step is done or once the last is."""

    def render(self, task: Task) -> Text:
        first, done_elapsed = task.fields.get("eta_from"), task.fields.get("done_elapsed")
        if first is None or done_elapsed is None or task.total is None or not first < task.completed < task.total:
            return Text("")
        per_step = done_elapsed / (task.completed - first)
        seconds = max(int(per_step * (task.total - task.completed) - ((task.elapsed or 0.0) - done_elapsed)), 0)
        return Text(f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}")


class Console:
    """Where the run talks to its user (module docstring). `enabled=False`: silent (other ranks,
    tests). `live`: allow the live display (logger.progress); it is shown only when `file` (stdout
    by default) is a terminal."""

    def __init__(
        self, *, enabled: bool = True, live: bool = True, file: IO[str] | None = None, clock: Callable[[], float] = time.monotonic
    ):
        self.enabled = enabled
        self.clock = clock
        self.rich = RichConsole(file=file, highlight=False)
        self.live = enabled and live and self.rich.is_terminal
        self.warnings: list[str] = []  # every warning said so far, in order
        self._warning_state: WarningState = {}
        self._warnings_path: Path | None = None
        self._progress: Progress | None = None
        self._bar: TaskID | None = None
        self._phase: TaskID | None = None
        self._phase_tokens = 0
        self._plain: list | None = None  # [description, total, completed, print every] without a live display
        self._plain_phase: PlainPhase | None = None  # the running phase, without a live display

    def note(self, text: str) -> None:
        if self.enabled:
            self._print(text, markup=False)

    def warn(self, text: str) -> None:
        """Print a warning (yellow; `recovered ...` green) and record it: in `warnings` and, once
        `record_warnings` named a file, appended there."""
        if not self.enabled:
            return
        self.warnings.append(text)
        self._print(Text(text, style="green" if text.startswith("recovered") else "bold yellow"))
        if self._warnings_path is not None:
            with self._warnings_path.open("a") as f:
                f.write(text + "\n")

    def _print(self, text: str | Text, **kwargs) -> None:
        """One line, never wrapped, flushed at once: a redirected stdout is block-buffered, and a
        log someone follows (`tail -f`, CI) should show each step as it ends."""
        self.rich.print(text, soft_wrap=True, **kwargs)
        self.rich.file.flush()

    def record_warnings(self, path: Path, *, resumed_step: int) -> None:
        """Also append every warning to `path` (the run directory's warnings.log). What an
        earlier attempt wrote about steps after `resumed_step` (the checkpoint's; -1: none, the
        run starts over) is dropped first: those steps are redone and warn again, as their
        records in metrics.jsonl are dropped and logged again (MetricsLogger.start)."""
        if not self.enabled:  # other ranks: rank 0's console owns the file
            return
        self._warnings_path = path
        if path.exists():
            path.write_text("".join(line + "\n" for line in warnings_through(path.read_text(), resumed_step)))

    def report_step(self, algorithm: str, step: int, total: int, metrics: dict[str, float]) -> None:
        """The step's line (`step_line`), then the warnings its metrics call for (`step_warnings`).
        The step's last phase ends here."""
        if not self.enabled:
            return
        self.end_phase()
        self.note(step_line(algorithm, step, total, metrics))
        messages, self._warning_state = step_warnings(step, metrics, self._warning_state)
        for message in messages:
            self.warn(message)

    # --- the run's overall progress

    def start_progress(self, description: str, *, total: int, completed: int = 0, plain_lines: bool = True) -> None:
        """The overall bar (with an ETA) of a run or a long stage. Without a live display,
        `plain_lines` prints `description n/total info` every tenth of the way instead (False
        where per-step lines say as much)."""
        if not self.enabled:
            return
        if not self.live:
            self._plain = [description, total, completed, max(total // 10, 1)] if plain_lines else None
            return
        self._progress = Progress(
            # a fixed width: the column fits its widest task, and the phase under the bar changes
            TextColumn("[bold]{task.description}", table_column=Column(width=DESCRIPTION_WIDTH, no_wrap=True)),
            BarColumn(),
            CountColumn(),
            TimeElapsedColumn(),
            EtaColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=self.rich,
            transient=False,
        )
        self._progress.start()
        self._bar = self._progress.add_task(description, total=total, completed=completed, info="", eta_from=completed)
        self._phase = None

    def advance(self, info: str = "", *, amount: int = 1) -> None:
        """`amount` more steps (or items: DPO's reference pass counts pairs) done; `info` follows the bar."""
        if self._progress is not None:
            elapsed = self._progress.tasks[0].elapsed  # the bar is the first task
            self._progress.update(self._bar, advance=amount, info=info, done_elapsed=elapsed)
        elif self._plain is not None:
            self._plain[2] += amount
            description, total, completed, every = self._plain
            if completed // every > (completed - amount) // every or completed == total:  # crossed a tenth of the way
                self.note(f"{description} {completed}/{total}" + (f"  {info}" if info else ""))

    def stop_progress(self) -> None:
        self.end_phase()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._plain = None

    # --- the current phase of a step (live: a bar under the run's; plain: a heartbeat when long)

    def phase(self, name: str, *, total: int | None = None) -> None:
        """Show `name` as the step's current phase, with a bar over `total` items (None: no bar)."""
        self.end_phase()
        self._phase_tokens = 0
        if self._progress is not None:
            self._phase = self._progress.add_task(f"  {name}", total=total, info="")
        elif self.enabled:
            now = self.clock()
            self._plain_phase = PlainPhase(name, total, started=now, last_said=now)

    def phase_advance(self, items: int = 1, *, tokens: int = 0) -> None:
        """`items` more of the phase's total done (and `tokens` more generated, if it counts them)."""
        self._phase_tokens += tokens
        if self._progress is not None and self._phase is not None:
            info = f"{self._phase_tokens:,} tokens" if self._phase_tokens else ""
            self._progress.update(self._phase, advance=items, info=info)
        elif self._plain_phase is not None:
            phase, now = self._plain_phase, self.clock()
            phase.completed += items
            if now - phase.last_said >= HEARTBEAT_SECONDS:
                self.note(f"  {phase.name} {phase.progress(self._phase_tokens)}  {now - phase.started:.0f} s")
                phase.last_said = now

    def end_phase(self) -> None:
        if self._progress is not None and self._phase is not None:
            self._progress.remove_task(self._phase)
        self._phase = None
        phase, self._plain_phase = self._plain_phase, None
        if phase is not None and self.clock() - phase.started >= HEARTBEAT_SECONDS:
            self.note(f"  {phase.name} done in {self.clock() - phase.started:.0f} s ({phase.progress(self._phase_tokens)})")


@dataclass
class PlainPhase:
    """A phase running without a live display: what the heartbeat line says."""

    name: str
    total: int | None
    started: float
    last_said: float
    completed: int = 0

    def progress(self, tokens: int) -> str:
        done = f"{self.completed}/{self.total}" if self.total is not None else f"{self.completed}"
        return done + (f", {tokens:,} tokens" if tokens else "")
