"""Plots and a one-page summary of a run directory: `posttrain report RUN_DIR` and `posttrain compare RUN_A RUN_B`.

A run directory holds `metrics.jsonl` (one JSON object per logged step) and `config.yaml` (the resolved
recipe). The report picks its panels from the run's algorithm and the metrics it logged: a panel none
of whose metrics were logged is skipped with a note, never an error. Each panel is one PNG; `summary.md`
(or `compare.md`) states the numbers and embeds the PNGs by relative links.

matplotlib is imported only when a figure is drawn, through its object-oriented API (`Figure`, no
pyplot): no global backend switch, no display, and `import posttrain` stays fast.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config.loader import ConfigError, load_config
from posttrain.config.schema import RecipeConfig
from posttrain.metrics.gates import GateResult, GateSyntaxError, evaluate_gate, parse_gate
from posttrain.metrics.logger import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "PANELS",
    "Panel",
    "Plot",
    "ReportError",
    "Run",
    "choose_panels",
    "compare_runs",
    "draw_panel",
    "load_run",
    "phase_seconds",
    "phase_totals",
    "plotted_series",
    "report_run",
    "series",
    "summarize",
    "summarize_comparison",
]

TOKEN_MULT_PROB_ERROR = "train/token_mult_prob_error"
GEN_KL_ERROR = "train/gen_kl_error"
TME_THRESHOLD = 1.05  # NeMo-RL investigates a run above it (docs/algorithms.md)
GEN_KL_THRESHOLD = 1e-3  # "about 1e-3 is called acceptable"


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the file."""


# --------------------------------------------------------------------------------------------
# reading a run directory


@dataclass(frozen=True)
class Run:
    path: Path
    label: str  # the name in legends and tables: the directory's name
    records: list[dict[str, Any]]
    config: RecipeConfig | None  # None: no config.yaml, or one that does not load (config_note says which)
    config_note: str
    algorithm: str


def _infer_algorithm(metrics: set[str]) -> str:
    if "train/reward" in metrics or TOKEN_MULT_PROB_ERROR in metrics:
        return "grpo"
    if "train/rewards/accuracy" in metrics or "validation/rewards/accuracy" in metrics:
        return "dpo"
    return "sft"


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Read RUN_DIR/metrics.jsonl and RUN_DIR/config.yaml; raises `ReportError` naming the file when
    metrics.jsonl is absent, empty or not JSON lines. A config.yaml that is absent or does not load
    is reported in `config_note` (the algorithm is then read off the metrics)."""
    path = Path(run_dir)
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise ReportError(f"{metrics_file} does not exist (is {path} a run directory?)")
    try:
        records = read_metrics(path)
    except json.JSONDecodeError as error:
        raise ReportError(f"{metrics_file} is not JSON lines: {error}") from error
    if not records:
        raise ReportError(f"{metrics_file} is empty: the run logged no step yet")
    config, note = None, ""
    config_file = path / "config.yaml"
    if config_file.is_file():
        try:
            config = load_config(config_file, RecipeConfig)
        except ConfigError as error:
            note = f"{config_file} does not load ({error}); algorithm read off the metrics, no gates checked"
    else:
        note = f"{config_file} does not exist; algorithm read off the metrics, no gates checked"
    algorithm = config.algorithm if config is not None else _infer_algorithm(logged_metrics(records))
    return Run(path, label or path.resolve().name, records, config, note, algorithm)


def logged_metrics(records: Sequence[dict[str, Any]]) -> set[str]:
    return {key for record in records for key in record if key != "step"}


def _number(value: Any) -> float | None:
    # MetricsLogger writes nan and inf as the strings "nan", "inf" and "-inf" (JSON has no such numbers).
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def series(records: Sequence[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record that logged `metric` as a number (nan and inf included), in
    the order logged."""
    steps, values = [], []
    for record in records:
        value = _number(record.get(metric))
        if value is not None:
            steps.append(record["step"])
            values.append(value)
    return steps, values


# --------------------------------------------------------------------------------------------
# panels: which exist, for which algorithm


@dataclass(frozen=True)
class Threshold:
    value: float
    label: str


@dataclass(frozen=True)
class Plot:
    """One subplot: the metrics it draws (those logged), against the step."""

    title: str
    ylabel: str
    metrics: tuple[str, ...]
    thresholds: tuple[Threshold, ...] = ()
    share: bool = False  # a fraction in [0, 1]: the y axis spans all of it
    colors: tuple[tuple[str, str], ...] = ()  # (metric, color) pairs: one quantity's train and validation alike


@dataclass(frozen=True)
class Panel:
    """One PNG: subplots stacked over a shared step axis. `kind` "phases" is the stacked time plot."""

    file: str
    title: str
    plots: tuple[Plot, ...]
    kind: str = "lines"
    notes: tuple[str, ...] = field(default=(), compare=False)  # what of it was not logged


_REWARD_ACCURACY = Panel(
    "reward_accuracy.png",
    "Reward and accuracy",
    (
        Plot("Mean reward (raw, before scaling and shaping)", "reward", ("train/reward", "validation/mean_reward")),
        Plot(
            "Accuracy (share of responses with reward >= 1)",
            "accuracy",
            ("train/accuracy", "validation/accuracy"),
            share=True,
        ),
    ),
)
_RESPONSE_LENGTH = Panel(
    "response_length.png",
    "Response length and truncation",
    (
        Plot(
            "Response length",
            "tokens",
            ("train/mean_gen_tokens_per_sample", "train/max_gen_tokens", "validation/mean_gen_tokens"),
        ),
        Plot("Truncated responses (hit max_new_tokens)", "share of responses", ("train/truncation_rate",), share=True),
    ),
)
_MISMATCH = Panel(
    "mismatch.png",
    "Train/generate mismatch",
    (
        Plot(
            "Token multiplicative probability error (1 = generator and trainer agree)",
            "mean exp(|lp_gen - lp_old|)",
            (TOKEN_MULT_PROB_ERROR,),
            (Threshold(TME_THRESHOLD, f"{TME_THRESHOLD} (investigate above)"),),
        ),
        Plot(
            "Generation KL error (k3 of lp_old vs lp_gen)",
            "nats per token",
            (GEN_KL_ERROR,),
            (Threshold(GEN_KL_THRESHOLD, "1e-3 (acceptable up to about here)"),),
        ),
    ),
)
_DYNAMIC_SAMPLING = Panel(
    "dynamic_sampling.png",
    "Dynamic sampling",
    (
        Plot(
            "Informative prompt groups (rewards not all equal)",
            "share of groups",
            ("train/dynamic_sampling_kept_fraction",),
            share=True,
        ),
        Plot("Generation batches per step", "batches", ("train/dynamic_sampling_gen_batches",)),
    ),
)
_SFT_LOSS = Panel(
    "loss.png",
    "Loss",
    (Plot("Cross-entropy on the supervised (assistant) tokens", "nats per token", ("train/loss", "validation/loss")),),
)
_DPO_LOSS = Panel(
    "loss.png",
    "Loss",
    (
        Plot(
            "DPO loss: -log sigmoid(margin) + sft_weight x SFT NLL", "nats per pair", ("train/loss", "validation/loss")
        ),
    ),
)
_PREFERENCES = Panel(
    "preference_accuracy.png",
    "Preference accuracy and margins",
    (
        Plot(
            "Preference accuracy (chosen reward > rejected; a tie counts 1/2)",
            "share of pairs",
            ("train/rewards/accuracy", "validation/rewards/accuracy"),
            share=True,
        ),
        Plot(
            "Reward margin (chosen - rejected)",
            "beta x log-ratio difference",
            ("train/rewards/margin", "validation/rewards/margin"),
        ),
    ),
)
_DPO_REWARDS = Panel(
    "chosen_rejected.png",
    "Implicit rewards of chosen and rejected responses",
    (
        Plot(
            "Implicit reward (beta x log(pi / pi_ref))",
            "reward",
            (
                "train/rewards/chosen",
                "train/rewards/rejected",
                "validation/rewards/chosen",
                "validation/rewards/rejected",
            ),
            colors=(
                ("train/rewards/chosen", "tab:blue"),
                ("train/rewards/rejected", "tab:red"),
                ("validation/rewards/chosen", "tab:blue"),
                ("validation/rewards/rejected", "tab:red"),
            ),
        ),
    ),
)
_GRAD_NORM = Panel(
    "grad_norm.png",
    "Gradient norm and learning rate",
    (
        Plot("Gradient norm (before clipping)", "global L2 norm", ("train/grad_norm",)),
        Plot("Learning rate", "lr", ("train/lr",)),
    ),
)
_TIME = Panel("time_per_phase.png", "Time per phase", (Plot("Time per step, by phase", "seconds", ()),), kind="phases")
_MEMORY = Panel("memory.png", "GPU memory", (Plot("Peak allocated memory, by phase", "GiB", ()),))

PANELS: dict[str, tuple[Panel, ...]] = {
    "grpo": (_REWARD_ACCURACY, _RESPONSE_LENGTH, _MISMATCH, _DYNAMIC_SAMPLING, _GRAD_NORM, _TIME, _MEMORY),
    "sft": (_SFT_LOSS, _GRAD_NORM, _TIME, _MEMORY),
    "dpo": (_DPO_LOSS, _PREFERENCES, _DPO_REWARDS, _GRAD_NORM, _TIME, _MEMORY),
}
"""The panels of each algorithm, in report order; each is drawn when at least one of its metrics was logged."""

# Panels whose absence needs no note: GRPO without dynamic sampling, a run off CUDA.
_QUIET_WHEN_ABSENT = {"dynamic_sampling.png": "dynamic sampling off", "memory.png": "memory/* is logged on CUDA only"}


def _shared_setting(runs: Sequence[Run], setting: Callable[[RecipeConfig], float | None]) -> float | None:
    """A recipe setting every run has (None when a run has no config or the runs differ)."""
    values = {setting(run.config) if run.config is not None else None for run in runs}
    return values.pop() if len(values) == 1 else None


def _with_run_specifics(panel: Panel, metrics: set[str], runs: Sequence[Run]) -> Panel:
    """Panels completed from the runs: memory peaks found by name, and lines at the recipe's limits
    (the grad-norm clip, max_new_tokens)."""
    if panel is _MEMORY:
        peaks = tuple(sorted(m for m in metrics if m.startswith("memory/") and m.endswith("_peak_gib")))
        return replace(panel, plots=(replace(panel.plots[0], metrics=peaks),))
    limits = {
        _GRAD_NORM.file: (lambda c: c.policy.max_grad_norm, "clip at {:g} (policy.max_grad_norm)"),
        _RESPONSE_LENGTH.file: (lambda c: c.policy.generation.max_new_tokens, "max_new_tokens ({:g})"),
    }
    if panel.file not in limits:
        return panel
    setting, label = limits[panel.file]
    value = _shared_setting(runs, setting)
    if value is None:
        return panel
    first = replace(panel.plots[0], thresholds=(Threshold(value, label.format(value)),))
    return replace(panel, plots=(first, *panel.plots[1:]))


def choose_panels(runs: Sequence[Run]) -> tuple[list[Panel], list[str]]:
    """The panels to draw for these runs (the union over their algorithms), each keeping the metrics
    some run logged, and a note for each panel skipped (none of its metrics logged)."""
    metrics = set().union(*(logged_metrics(run.records) for run in runs))
    algorithms = list(dict.fromkeys(run.algorithm for run in runs))
    candidates: dict[str, Panel] = {}  # by file: an SFT run against a DPO run gets the first loss.png
    for panel in (panel for algorithm in algorithms for panel in PANELS[algorithm]):
        candidates.setdefault(panel.file, panel)
    last = (_GRAD_NORM.file, _TIME.file, _MEMORY.file)  # every algorithm's: after the algorithms' own
    chosen, skipped = [], []
    for panel in sorted(candidates.values(), key=lambda panel: panel.file in last):
        if panel.kind == "phases":
            phases = phase_names(metrics)
            if phases:
                chosen.append(panel)
            else:
                skipped.append(f"{panel.file} skipped: no timing/* metric logged")
            continue
        panel = _with_run_specifics(panel, metrics, runs)
        plots = [replace(p, metrics=tuple(m for m in p.metrics if m in metrics)) for p in panel.plots]
        missing = tuple(m for p in panel.plots for m in p.metrics if m not in metrics)
        plots = [plot for plot in plots if plot.metrics]
        if not plots:
            if panel.file in _QUIET_WHEN_ABSENT:
                skipped.append(f"{panel.file} skipped: {_QUIET_WHEN_ABSENT[panel.file]}")
            else:
                expected = ", ".join(m for p in panel.plots for m in p.metrics)
                skipped.append(f"{panel.file} skipped: none of {expected} logged")
            continue
        notes = (f"not logged: {', '.join(missing)}",) if missing else ()
        chosen.append(replace(panel, plots=tuple(plots), notes=notes))
    return chosen, skipped


# --------------------------------------------------------------------------------------------
# time per phase

# timing/total_step spans generation, scoring, training and the weight refresh (GRPO); validation
# runs after it. timing/scoring_busy overlaps generation, so it is no phase of its own.
_NOT_PHASES = {"timing/total_step", "timing/scoring_busy"}
_OUTSIDE_STEP = {"timing/validation"}
OTHER = "other"


def phase_names(metrics: set[str]) -> list[str]:
    """The timing/* phases, in a fixed order (known phases first), plus "other" when
    timing/total_step was logged (its time not in any in-step phase)."""
    order = ["generation", "scoring", "training", "weight_refresh", "reference_logprobs", "validation"]
    phases = sorted(
        (m.removeprefix("timing/") for m in metrics if m.startswith("timing/") and m not in _NOT_PHASES),
        key=lambda name: (order.index(name) if name in order else len(order), name),
    )
    return [*phases, OTHER] if "timing/total_step" in metrics and phases else phases


def phase_seconds(records: Sequence[dict[str, Any]]) -> tuple[list[int], dict[str, list[float]]]:
    """Steps that logged a timing, and each phase's seconds at each (0 when a step did not log it).
    "other" = timing/total_step minus the in-step phases (never below 0)."""
    names = phase_names(logged_metrics(records))
    steps, seconds = [], {name: [] for name in names}
    for record in records:
        times = {name: _number(record.get(f"timing/{name}")) for name in names if name != OTHER}
        times = {name: value for name, value in times.items() if value is not None and math.isfinite(value)}
        total = _number(record.get("timing/total_step"))
        if not times and total is None:
            continue
        steps.append(record["step"])
        for name in names:
            seconds[name].append(times.get(name, 0.0))
        if OTHER in seconds:
            inside = sum(value for name, value in times.items() if f"timing/{name}" not in _OUTSIDE_STEP)
            seconds[OTHER][-1] = max(0.0, total - inside) if total is not None and math.isfinite(total) else 0.0
    return steps, seconds


# --------------------------------------------------------------------------------------------
# drawing

_METRIC_COLORS = ("tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:cyan", "tab:olive")
_RUN_COLORS = ("tab:blue", "tab:orange")
_LINESTYLES = ("-", "--", ":", "-.")
_PHASE_COLORS = {
    "generation": "tab:blue",
    "scoring": "tab:orange",
    "training": "tab:green",
    "weight_refresh": "tab:purple",
    "reference_logprobs": "tab:brown",
    "validation": "tab:olive",
    OTHER: "tab:gray",
}


@dataclass(frozen=True)
class Line:
    """One series a line panel draws."""

    label: str  # the legend entry: the metric, prefixed by the run's label when several runs
    run_index: int
    metric_index: int
    steps: list[int]
    values: list[float]


def plotted_series(panel: Panel, runs: Sequence[Run]) -> list[list[Line]]:
    """Per subplot of a line panel: each series it draws, runs outer, metrics inner."""
    out = []
    for plot in panel.plots:
        lines = []
        for run_index, run in enumerate(runs):
            for metric_index, metric in enumerate(plot.metrics):
                steps, values = series(run.records, metric)
                if steps:
                    label = metric if len(runs) == 1 else f"{run.label}: {metric}"
                    lines.append(Line(label, run_index, metric_index, steps, values))
        out.append(lines)
    return out


def _new_figure(rows: int) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(11, 1.0 + 2.9 * rows), dpi=100, layout="constrained")


def _draw_line(ax: Any, line: Line, color: str, style: str) -> None:
    """The series, with its points when sparse (validation every few steps), and a dotted vertical
    line at each step whose value is nan or inf (a gap in the line otherwise)."""
    values = [v if math.isfinite(v) else math.nan for v in line.values]
    marker = "o" if len(line.steps) <= 30 else None
    ax.plot(
        line.steps, values, color=color, linestyle=style, marker=marker, markersize=3.5, linewidth=1.4, label=line.label
    )
    diverged = [step for step, value in zip(line.steps, line.values, strict=True) if not math.isfinite(value)]
    for index, step in enumerate(diverged):
        label = f"{line.label} not finite" if index == 0 else None
        ax.axvline(step, color=color, linestyle=":", linewidth=1, label=label)


def _draw_lines(panel: Panel, runs: Sequence[Run]) -> Figure:
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(len(panel.plots))
    axes = figure.subplots(len(panel.plots), 1, sharex=True, squeeze=False)[:, 0]
    for ax, plot, lines in zip(axes, panel.plots, plotted_series(panel, runs), strict=True):
        colors = dict(plot.colors)
        for line in lines:
            metric = plot.metrics[line.metric_index]
            if len(runs) > 1:  # compare: a color per run, a line style per metric
                color, style = _RUN_COLORS[line.run_index % 2], _LINESTYLES[line.metric_index % len(_LINESTYLES)]
            elif metric in colors:  # paired colors: validation dashed
                color, style = colors[metric], "--" if metric.startswith("validation/") else "-"
            else:
                color, style = _METRIC_COLORS[line.metric_index % len(_METRIC_COLORS)], "-"
            _draw_line(ax, line, color, style)
        for threshold in plot.thresholds:
            ax.axhline(threshold.value, color="tab:red", linestyle="--", linewidth=1, label=threshold.label)
        if plot.share:
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(plot.title, fontsize=10)
        ax.set_ylabel(plot.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never over the data
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)  # lr 3e-4: "x1e-4"
    axes[-1].set_xlabel("step")
    return figure


def _phase_axis_top(step_totals: list[float]) -> float:
    """The y limit: 8% above the tallest step, or 3x the 90th percentile when a few steps are more
    than 4x that (their bars are then cut)."""
    if not step_totals or max(step_totals) <= 0:
        return 1.0
    typical = sorted(step_totals)[int(0.9 * (len(step_totals) - 1))]
    if typical > 0 and max(step_totals) > 4 * typical:
        return 3 * typical
    return 1.08 * max(step_totals)


def _draw_phase_stack(run: Run) -> Figure:
    """Seconds per step, stacked by phase: bars, or stacked areas past 200 steps (bars get too thin)."""
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(1)
    ax = figure.subplots()
    steps, seconds = phase_seconds(run.records)
    colors = [_PHASE_COLORS.get(name) for name in seconds]
    if len(steps) > 200:
        ax.stackplot(steps, *seconds.values(), labels=list(seconds), colors=colors, linewidth=0)
    else:
        bottom = [0.0] * len(steps)
        width = 0.9 * min((b - a for a, b in zip(steps, steps[1:], strict=False) if b > a), default=1)
        for (name, values), color in zip(seconds.items(), colors, strict=True):
            ax.bar(steps, values, width=width, bottom=bottom, color=color, label=name, linewidth=0)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    step_totals = [sum(values) for values in zip(*seconds.values(), strict=True)]
    top = _phase_axis_top(step_totals)
    ax.set_ylim(0, top)
    cut = [(step, total) for step, total in zip(steps, step_totals, strict=True) if total > top]
    for step, total in cut:  # one slow step (a reference pass, step 1's compilation) must not flatten the rest
        ax.annotate(
            f"{total:.3g} s",
            (step, top),
            xytext=(0, -2),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=7,
            rotation=90,
            color="white",
            fontweight="bold",
        )
    cut_note = f"; {len(cut)} tall bar{'s' if len(cut) > 1 else ''} cut, total written on it" if cut else ""
    ax.set_title(f"Wall time per step, stacked by phase{cut_note}", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    handles, labels = ax.get_legend_handles_labels()
    # the stack's order (top first), outside the axes: bars start at the left edge
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def _draw_phase_means(runs: Sequence[Run]) -> Figure:
    """Mean seconds of each phase per step that ran it, a bar per run side by side."""
    figure = _new_figure(1)
    ax = figure.subplots()
    names = list(dict.fromkeys(name for run in runs for name in phase_seconds(run.records)[1]))
    height = 0.8 / len(runs)
    for run_index, run in enumerate(runs):
        totals = phase_totals(run.records)
        means = [totals[name].mean if name in totals else 0.0 for name in names]
        positions = [i + (run_index - (len(runs) - 1) / 2) * height for i in range(len(names))]
        bars = ax.barh(positions, means, height=height, color=_RUN_COLORS[run_index % 2], label=run.label)
        ax.bar_label(bars, fmt="%.3g s", fontsize=7, padding=2)
    ax.margins(x=0.1)  # room for the labels at the bars' ends
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_title("Mean seconds per step that ran the phase (validation: the validation steps)", fontsize=10)
    ax.set_xlabel("seconds")
    ax.set_ylabel("phase")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="best")
    return figure


def draw_panel(panel: Panel, runs: Sequence[Run]) -> Figure:
    """The panel's figure, every run overlaid (legend: run labels when more than one)."""
    if panel.kind == "phases":
        figure = _draw_phase_stack(runs[0]) if len(runs) == 1 else _draw_phase_means(runs)
    else:
        figure = _draw_lines(panel, runs)
    names = " vs ".join(run.label for run in runs)
    figure.suptitle(f"{panel.title}: {names}", fontsize=12, fontweight="bold")
    return figure


def write_panels(panels: Sequence[Panel], runs: Sequence[Run], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels:
        figure = draw_panel(panel, runs)
        figure.savefig(out / panel.file)
        written.append(out / panel.file)
    return written


# --------------------------------------------------------------------------------------------
# numbers for the summaries

# (metric, which way is better) of the headline table, per algorithm
KEY_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "grpo": (
        ("train/reward", "max"),
        ("train/accuracy", "max"),
        ("validation/accuracy", "max"),
        ("validation/mean_reward", "max"),
    ),
    "sft": (("train/loss", "min"), ("validation/loss", "min")),
    "dpo": (
        ("train/loss", "min"),
        ("validation/loss", "min"),
        ("train/rewards/accuracy", "max"),
        ("validation/rewards/accuracy", "max"),
        ("validation/rewards/margin", "max"),
    ),
}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class MetricSummary:
    metric: str
    first: tuple[int, float]  # (step, value)
    last: tuple[int, float]
    best: tuple[int, float] | None  # None: no finite value
    count: int


def metric_summary(records: Sequence[dict[str, Any]], metric: str, better: str) -> MetricSummary | None:
    """First, last and best (the earliest step holding the max or min of the finite values); None if never logged."""
    steps, values = series(records, metric)
    if not steps:
        return None
    finite = [(step, value) for step, value in zip(steps, values, strict=True) if math.isfinite(value)]
    pick = max if better == "max" else min
    best = None
    if finite:
        target = pick(value for _, value in finite)
        best = next(pair for pair in finite if pair[1] == target)
    return MetricSummary(metric, (steps[0], values[0]), (steps[-1], values[-1]), best, len(steps))


@dataclass(frozen=True)
class Crossings:
    metric: str
    threshold: float
    median: float
    maximum: float
    above: int  # steps above the threshold, a nan counting as above
    count: int


def crossings(records: Sequence[dict[str, Any]], metric: str, threshold: float) -> Crossings | None:
    _, values = series(records, metric)
    if not values:
        return None
    above = sum(1 for v in values if math.isnan(v) or v > threshold)
    nan = any(math.isnan(v) for v in values)
    median = math.nan if nan else statistics.median(values)
    return Crossings(metric, threshold, median, math.nan if nan else max(values), above, len(values))


@dataclass(frozen=True)
class PhaseTotal:
    seconds: float  # over the run
    steps: int  # the steps that ran the phase (validation: every val_period-th; other: those with total_step)

    @property
    def mean(self) -> float:
        """Seconds per step that ran the phase."""
        return self.seconds / self.steps if self.steps else 0.0


def phase_totals(records: Sequence[dict[str, Any]]) -> dict[str, PhaseTotal]:
    names = phase_names(logged_metrics(records))
    _, seconds = phase_seconds(records)
    totals = {}
    for name in names:
        metric = "timing/total_step" if name == OTHER else f"timing/{name}"
        steps = sum(1 for record in records if (v := _number(record.get(metric))) is not None and math.isfinite(v))
        totals[name] = PhaseTotal(sum(seconds[name]), steps)
    return totals


def peak_memory(records: Sequence[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """(phase, peak GiB, step) per memory/<phase>_peak_gib metric."""
    rows = []
    for metric in sorted(m for m in logged_metrics(records) if m.startswith("memory/") and m.endswith("_peak_gib")):
        steps, values = series(records, metric)
        finite = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
        if finite:
            value, step = max(finite, key=lambda pair: pair[0])
            rows.append((metric.removeprefix("memory/").removesuffix("_peak_gib"), value, step))
    return rows


def gate_results(run: Run) -> list[GateResult]:
    if run.config is None:
        return []
    results = []
    for text in run.config.gates:
        try:
            results.append(evaluate_gate(parse_gate(text), run.records))
        except GateSyntaxError as error:
            results.append(GateResult(text, False, str(error)))
    return results


def describe_model(config: RecipeConfig | None) -> str:
    if config is None:
        return "unknown (no config.yaml)"
    if config.policy.model_name is not None:
        return config.policy.model_name
    tiny = config.tiny_model
    if tiny.preset is not None:
        layers = f", first {tiny.preset_layers} layers" if tiny.preset_layers else ""
        return f"random-init Gemma 4 at the {tiny.preset} shape{layers} (tiny_model.preset)"
    return f"tiny random-init Gemma 4 ({tiny.num_hidden_layers} layers, hidden {tiny.hidden_size}; tiny_model)"


def describe_algorithm(run: Run) -> str:
    if run.config is None or run.algorithm != "grpo":
        return run.algorithm
    grpo, loss = run.config.grpo, run.config.loss_fn
    parts = [
        "dynamic sampling" if grpo.use_dynamic_sampling else "no dynamic sampling",
        f"clip {loss.ratio_clip_min:g}/{loss.ratio_clip_max:g}",
        "token-level loss" if loss.token_level_loss else "sequence-level loss",
    ]
    if grpo.use_leave_one_out_baseline:
        parts.append("leave-one-out baseline")
    return f"grpo ({', '.join(parts)})"


def _steps_line(records: Sequence[dict[str, Any]]) -> str:
    steps = [record["step"] for record in records]
    return f"{max(steps)} (records for steps {min(steps)}-{max(steps)}, {len(records)} lines)"


def _wall_time(records: Sequence[dict[str, Any]]) -> str:
    total = sum(t.seconds for t in phase_totals(records).values())
    if total == 0:
        return "not logged (no timing/* metric)"
    return f"{total:.1f} s (sum of the logged phase times: setup and warm start not included)"


# --------------------------------------------------------------------------------------------
# summary.md (one run) and compare.md (two)


def _at(pair: tuple[int, float] | None) -> str:
    return "-" if pair is None else f"{_fmt(pair[1])} (step {pair[0]})"


def _key_metrics_table(run: Run) -> list[str]:
    rows = ["| metric | first | last | best | logged |", "|---|---|---|---|---|"]
    for metric, better in KEY_METRICS[run.algorithm]:
        summary = metric_summary(run.records, metric, better)
        if summary is None:
            rows.append(f"| {metric} | not logged | | | |")
            continue
        best = f"{_at(summary.best)}, {better}" if summary.best else "no finite value"
        rows.append(f"| {metric} | {_at(summary.first)} | {_at(summary.last)} | {best} | {summary.count} steps |")
    return rows


def _mismatch_table(run: Run) -> list[str]:
    found = [
        c
        for c in (
            crossings(run.records, TOKEN_MULT_PROB_ERROR, TME_THRESHOLD),
            crossings(run.records, GEN_KL_ERROR, GEN_KL_THRESHOLD),
        )
        if c is not None
    ]
    if not found:
        return ["Not logged."]
    rows = ["| metric | median | max | steps above the threshold (a nan counts) |", "|---|---|---|---|"]
    for c in found:
        rows.append(
            f"| {c.metric} | {_fmt(c.median)} | {_fmt(c.maximum)} | {c.above} of {c.count} above {c.threshold:g} |"
        )
    return rows


def _time_table(records: Sequence[dict[str, Any]]) -> list[str]:
    steps, _ = phase_seconds(records)
    totals = phase_totals(records)
    total = sum(t.seconds for t in totals.values())
    if total == 0:
        return ["Not logged (no timing/* metric)."]
    rows = ["| phase | seconds | share | steps that ran it | mean per such step |", "|---|---|---|---|---|"]
    for name, t in totals.items():
        rows.append(f"| {name} | {t.seconds:.1f} | {100 * t.seconds / total:.1f}% | {t.steps} | {t.mean:.3g} s |")
    rows.append(f"| total | {total:.1f} | 100% | {len(steps)} | {total / len(steps):.3g} s |")
    if OTHER in totals:
        rows.append("")
        rows.append("`other`: timing/total_step minus the phases inside it (batching, dynamic-sampling bookkeeping).")
    return rows


def _gate_lines(run: Run) -> list[str]:
    if run.config is None:
        return [f"Not checked: {run.config_note}."]
    results = gate_results(run)
    if not results:
        return ["The recipe sets no `gates:`."]
    return [f"- {'PASS' if r.passed else 'FAIL'} `{r.text}` ({r.explanation})" for r in results]


def _image_lines(panels: Sequence[Panel]) -> list[str]:
    lines = []
    for panel in panels:
        lines += [f"### {panel.title}", "", f"![{panel.title}]({panel.file})", ""]
        lines += [f"*{note}*" for note in panel.notes] + ([""] if panel.notes else [])
    return lines


def summarize(run: Run, panels: Sequence[Panel], skipped: Sequence[str]) -> str:
    """summary.md: the run on one page, the panels' PNGs linked relative to it."""
    lines = [
        f"# Run report: {run.label}",
        "",
        "| | |",
        "|---|---|",
        f"| run directory | `{run.path}` |",
        f"| algorithm | {describe_algorithm(run)} |",
        f"| model | {describe_model(run.config)} |",
        f"| steps | {_steps_line(run.records)} |",
        f"| wall time | {_wall_time(run.records)} |",
        "",
        "## Key metrics",
        "",
        *_key_metrics_table(run),
        "",
    ]
    if run.algorithm == "grpo":
        lines += ["## Train/generate mismatch", "", *_mismatch_table(run), ""]
    lines += ["## Time per phase", "", *_time_table(run.records), ""]
    memory = peak_memory(run.records)
    if memory:
        lines += ["## Peak memory", "", "| phase | peak GiB | step |", "|---|---|---|"]
        lines += [f"| {phase} | {value:.2f} | {step} |" for phase, value, step in memory] + [""]
    lines += ["## Gates", "", *_gate_lines(run), "", "## Plots", "", *_image_lines(panels)]
    notes = [*skipped, *([run.config_note] if run.config_note else [])]
    if notes:
        lines += ["## Not plotted", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines).rstrip() + "\n"


def _difference(a: float | None, b: float | None) -> str:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return ""
    return f"{b - a:+.4g}"


def _comparison_rows(runs: Sequence[Run]) -> list[str]:
    a, b = runs
    rows = []
    algorithms = list(dict.fromkeys([a.algorithm, b.algorithm]))
    for metric, better in dict.fromkeys(pair for algorithm in algorithms for pair in KEY_METRICS[algorithm]):
        sa, sb = (metric_summary(run.records, metric, better) for run in runs)
        if sa is None and sb is None:
            continue
        for statistic in ("first", "last", "best"):
            pa, pb = (getattr(s, statistic) if s is not None else None for s in (sa, sb))
            name = f"best ({better})" if statistic == "best" else statistic
            diff = _difference(pa[1] if pa else None, pb[1] if pb else None)
            rows.append(f"| {metric} | {name} | {_at(pa)} | {_at(pb)} | {diff} |")
    for metric, threshold in ((TOKEN_MULT_PROB_ERROR, TME_THRESHOLD), (GEN_KL_ERROR, GEN_KL_THRESHOLD)):
        ca, cb = (crossings(run.records, metric, threshold) for run in runs)
        if ca is None and cb is None:
            continue
        medians = [_fmt(c.median) if c else "-" for c in (ca, cb)]
        rows.append(
            f"| {metric} | median | {medians[0]} | {medians[1]} | "
            f"{_difference(ca.median if ca else None, cb.median if cb else None)} |"
        )
        above = [f"{c.above} of {c.count}" if c else "-" for c in (ca, cb)]
        rows.append(f"| {metric} | steps above {threshold:g} | {above[0]} | {above[1]} | |")
    totals = [phase_totals(run.records) for run in runs]
    for name in dict.fromkeys([*totals[0], *totals[1]]):
        means = [totals[i][name].mean if name in totals[i] else None for i in (0, 1)]
        shown = [f"{m:.3g} s" if m is not None else "-" for m in means]
        rows.append(
            f"| timing/{name} | seconds per step that ran it | {shown[0]} | {shown[1]} | {_difference(*means)} |"
        )
    return rows


def summarize_comparison(runs: Sequence[Run], panels: Sequence[Panel], skipped: Sequence[str]) -> str:
    """compare.md: both runs side by side, then the overlaid panels."""
    a, b = runs
    gates = []
    for run in runs:
        results = gate_results(run)
        gates.append(f"{sum(r.passed for r in results)} of {len(results)} pass" if results else "none checked")
    lines = [
        f"# Compare: {a.label} vs {b.label}",
        "",
        f"| | {a.label} | {b.label} |",
        "|---|---|---|",
        f"| run directory | `{a.path}` | `{b.path}` |",
        f"| algorithm | {describe_algorithm(a)} | {describe_algorithm(b)} |",
        f"| model | {describe_model(a.config)} | {describe_model(b.config)} |",
        f"| steps | {_steps_line(a.records)} | {_steps_line(b.records)} |",
        f"| wall time (sum of logged phases) | {_wall_time(a.records).split(' (')[0]} | {_wall_time(b.records).split(' (')[0]} |",
        f"| gates (own recipe) | {gates[0]} | {gates[1]} |",
        "",
        "## Metrics",
        "",
        f"| metric | statistic | {a.label} | {b.label} | {b.label} - {a.label} |",
        "|---|---|---|---|---|",
        *_comparison_rows(runs),
        "",
        "## Plots",
        "",
        *_image_lines(panels),
    ]
    notes = [*skipped, *(f"{run.label}: {run.config_note}" for run in runs if run.config_note)]
    if notes:
        lines += ["## Not plotted", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# the commands


def _cannot_report(command: str, message: str) -> int:
    print(f"posttrain {command}: {message}", file=sys.stderr)
    return 2


def _print_written(markdown: Path, pngs: Sequence[Path], skipped: Sequence[str]) -> None:
    print(f"wrote {markdown} and {len(pngs)} plots: {', '.join(p.name for p in pngs)}")
    for note in skipped:
        print(f"  {note}")


def report_run(run_dir: str | Path, out: str | Path | None = None) -> int:
    """`posttrain report RUN_DIR`: PNGs and summary.md into `out` (default RUN_DIR/report). Returns 0,
    or 2 with a message on stderr when the run directory has no readable metrics."""
    try:
        run = load_run(run_dir)
    except ReportError as error:
        return _cannot_report("report", str(error))
    out = Path(out) if out is not None else run.path / "report"
    panels, skipped = choose_panels([run])
    pngs = write_panels(panels, [run], out)
    (out / "summary.md").write_text(summarize(run, panels, skipped))
    _print_written(out / "summary.md", pngs, skipped)
    return 0


def _labels(a: Path, b: Path) -> tuple[str, str]:
    """The runs' directory names; parent/name when both are called the same."""
    a, b = a.resolve(), b.resolve()
    if a.name != b.name:
        return a.name, b.name
    return f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"


def compare_runs(run_a: str | Path, run_b: str | Path, out: str | Path | None = None) -> int:
    """`posttrain compare RUN_A RUN_B`: overlaid PNGs and compare.md into `out` (default
    ./compare-<A>-vs-<B>). Returns 0, or 2 with a message on stderr."""
    label_a, label_b = _labels(Path(run_a), Path(run_b))
    try:
        runs = [load_run(run_a, label_a), load_run(run_b, label_b)]
    except ReportError as error:
        return _cannot_report("compare", str(error))
    out = Path(out) if out is not None else Path(f"compare-{label_a}-vs-{label_b}".replace("/", "_"))
    panels, skipped = choose_panels(runs)
    pngs = write_panels(panels, runs, out)
    (out / "compare.md").write_text(summarize_comparison(runs, panels, skipped))
    _print_written(out / "compare.md", pngs, skipped)
    return 0
