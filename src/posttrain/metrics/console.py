"""Console output: a rich progress bar per phase and one compact line per RL step."""

from __future__ import annotations

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def step_summary(step: int, metrics: dict[str, float]) -> str:
    """`step 12 | reward 0.41 | acc 0.41 | val 0.55 | mismatch 1.0003 | len 3.1 | 2.3s`; absent metrics are skipped."""
    fields = [
        ("reward", "train/reward", "{:.3f}"),
        ("acc", "train/accuracy", "{:.3f}"),
        ("val acc", "validation/accuracy", "{:.3f}"),
        ("mismatch", "train/token_mult_prob_error", "{:.4f}"),
        ("len", "train/mean_gen_tokens_per_sample", "{:.1f}"),
        ("kept", "train/dynamic_sampling_kept_fraction", "{:.2f}"),
    ]
    parts = [f"step {step:>4}"] + [f"{label} {fmt.format(metrics[key])}" for label, key, fmt in fields if key in metrics]
    if "timing/total_step" in metrics:
        parts.append(f"{metrics['timing/total_step']:.1f}s")
    return " | ".join(parts)


class Console:
    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled
        self.rich = RichConsole(highlight=False)
        self._progress: Progress | None = None
        self._task = None

    def note(self, text: str) -> None:
        if self.enabled:
            self.rich.print(text, markup=False, soft_wrap=True)

    def step_line(self, step: int, metrics: dict[str, float]) -> None:
        self.note(step_summary(step, metrics))

    def start_progress(self, description: str, *, total: int, completed: int = 0) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.rich,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, info: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, info=info)

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
