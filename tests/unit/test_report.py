"""`posttrain report` and `posttrain compare`: panels chosen from the metrics logged, hand-computed
numbers in summary.md, valid PNGs, both runs overlaid, missing metrics skipped with a note, and the
CLI's exit codes."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli.main import main
from posttrain.config.loader import dump_config, load_config
from posttrain.config.schema import RecipeConfig
from posttrain.metrics.report import (
    PANELS,
    ReportError,
    choose_panels,
    draw_panel,
    load_run,
    phase_seconds,
    plotted_series,
)

pytestmark = pytest.mark.unit

TINY_RECIPE = Path(__file__).resolve().parents[2] / "src" / "posttrain" / "recipes" / "tiny" / "grpo-gemma4-tiny.yaml"

# A GRPO run of 4 steps plus the step-0 validation; values are multiples of 1/16 so that medians
# and sums are exact. Hand-computed:
#   train/reward 0.25, 0.75, nan, 0.5 -> first 0.25 (step 1), last 0.5 (step 4), best 0.75 (step 2)
#   train/token_mult_prob_error 1.0, 1.0625, 1.125, 1.0 -> sorted 1.0, 1.0, 1.0625, 1.125:
#     median (1.0 + 1.0625) / 2 = 1.03125 (shown 1.031), max 1.125, 2 of 4 above 1.05
#   train/gen_kl_error 0.0005, 0.002, 0.0005, nan -> 2 of 4 above 0.001 (0.002 and the nan), median nan
#   timing per training step: generation 1, scoring 0.5, training 2, weight_refresh 0.25, total_step 4
#     -> other 4 - 3.75 = 0.25; validation 2 at steps 0 and 4 (outside total_step)
#     totals: generation 4, scoring 2, training 8, weight_refresh 1, validation 4, other 1 = 20 s
#     shares 20%, 10%, 40%, 5%, 20%, 5%; per step that ran it: validation 4 / 2 steps = 2 s, other 1 / 4 = 0.25 s;
#     5 steps logged a timing -> 4 s per step overall
TIMES = {
    "timing/generation": 1.0,
    "timing/scoring": 0.5,
    "timing/scoring_busy": 0.75,  # overlaps generation: no phase of its own
    "timing/training": 2.0,
    "timing/weight_refresh": 0.25,
    "timing/total_step": 4.0,
}
GRPO_RECORDS = [
    {"step": 0, "validation/accuracy": 0.25, "validation/mean_reward": 0.25, "timing/validation": 2.0},
    {"step": 1, "train/reward": 0.25, "train/accuracy": 0.25, "train/token_mult_prob_error": 1.0,
     "train/gen_kl_error": 0.0005, "train/grad_norm": 0.5, "train/lr": 0.001, "train/mean_gen_tokens_per_sample": 6.0,
     "train/truncation_rate": 0.125, **TIMES},
    {"step": 2, "train/reward": 0.75, "train/accuracy": 0.5, "train/token_mult_prob_error": 1.0625,
     "train/gen_kl_error": 0.002, "train/grad_norm": 1.5, "train/lr": 0.001, "train/mean_gen_tokens_per_sample": 5.0,
     "train/truncation_rate": 0.0, **TIMES},
    {"step": 3, "train/reward": "nan", "train/accuracy": 0.5, "train/token_mult_prob_error": 1.125,
     "train/gen_kl_error": 0.0005, "train/grad_norm": 0.75, "train/lr": 0.001, "train/mean_gen_tokens_per_sample": 4.0,
     "train/truncation_rate": 0.0, **TIMES},
    {"step": 4, "train/reward": 0.5, "train/accuracy": 0.75, "train/token_mult_prob_error": 1.0,
     "train/gen_kl_error": "nan", "train/grad_norm": 0.5, "train/lr": 0.001, "train/mean_gen_tokens_per_sample": 4.0,
     "train/truncation_rate": 0.0, **TIMES, "validation/accuracy": 0.5, "validation/mean_reward": 0.5,
     "timing/validation": 2.0},
]  # fmt: skip

# DPO: loss 0.75, 0.5, 0.625 -> best (min) 0.5 at step 2
DPO_RECORDS = [
    {"step": 0, "validation/loss": 0.75, "validation/rewards/accuracy": 0.5, "timing/validation": 1.0},
    *({"step": step, "train/loss": loss, "train/rewards/accuracy": 0.5 + step / 8, "train/rewards/margin": step / 4,
       "train/rewards/chosen": step / 8, "train/rewards/rejected": -step / 8, "train/grad_norm": 1.0,
       "timing/training": 0.5} for step, loss in ((1, 0.75), (2, 0.5), (3, 0.625))),
]  # fmt: skip

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, records: list[dict], gates: list[str] | None = None) -> Path:
    """A run directory as a run leaves it: metrics.jsonl, and config.yaml when `gates` is given."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if gates is not None:
        recipe = run_dir.parent / f"{run_dir.name}-recipe.yaml"
        recipe.write_text(f"defaults: {TINY_RECIPE}\ngates: {json.dumps(gates)}\n")
        (run_dir / "config.yaml").write_text(dump_config(load_config(recipe, RecipeConfig)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; asserts the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- numbers --------------------------------------------------------------------------------------


def test_phase_seconds_splits_total_step_and_keeps_validation_outside():
    steps, seconds = phase_seconds(GRPO_RECORDS)
    assert steps == [0, 1, 2, 3, 4]
    assert list(seconds) == ["generation", "scoring", "training", "weight_refresh", "validation", "other"]
    assert seconds["generation"] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert seconds["validation"] == [2.0, 0.0, 0.0, 0.0, 2.0]
    assert seconds["other"] == [0.0, 0.25, 0.25, 0.25, 0.25]


def test_summary_states_hand_computed_numbers(tmp_path):
    run = write_run(tmp_path / "grpo-run", GRPO_RECORDS, gates=["max(train/reward) > 0.7", "median(train/token_mult_prob_error) < 1.03"])
    assert main(["report", str(run)]) == 0
    summary = (run / "report" / "summary.md").read_text()
    assert "# Run report: grpo-run" in summary
    assert "| algorithm | grpo (no dynamic sampling, clip 0.2/0.2, token-level loss, leave-one-out baseline) |" in summary
    assert "| steps | 4 (records for steps 0-4, 5 lines) |" in summary
    assert "| wall time | 20.0 s (sum of the logged phase times" in summary
    assert "| train/reward | 0.25 (step 1) | 0.5 (step 4) | 0.75 (step 2), max | 4 steps |" in summary
    assert "| train/accuracy | 0.25 (step 1) | 0.75 (step 4) | 0.75 (step 4), max | 4 steps |" in summary
    assert "| validation/accuracy | 0.25 (step 0) | 0.5 (step 4) | 0.5 (step 4), max | 2 steps |" in summary
    assert "| train/token_mult_prob_error | 1.031 | 1.125 | 2 of 4 above 1.05 |" in summary
    assert "| train/gen_kl_error | nan | nan | 2 of 4 above 0.001 |" in summary
    assert "| generation | 4.0 | 20.0% | 4 | 1 s |" in summary
    assert "| training | 8.0 | 40.0% | 4 | 2 s |" in summary
    assert "| validation | 4.0 | 20.0% | 2 | 2 s |" in summary
    assert "| other | 1.0 | 5.0% | 4 | 0.25 s |" in summary
    assert "| total | 20.0 | 100% | 5 | 4 s |" in summary
    assert "scoring_busy" not in summary
    assert "- FAIL `max(train/reward) > 0.7` (max(train/reward) = nan over 4 steps (nan fails every comparison))" in summary
    assert "- FAIL `median(train/token_mult_prob_error) < 1.03` (median(train/token_mult_prob_error) = 1.03125 over 4 steps)" in summary
    assert "![Train/generate mismatch](mismatch.png)" in summary
    assert "*not logged: train/max_gen_tokens, validation/mean_gen_tokens*" in summary
    assert "- dynamic_sampling.png skipped: dynamic sampling off" in summary
    assert "- memory.png skipped: memory/* is logged on CUDA only" in summary


def test_report_writes_valid_pngs(tmp_path):
    run = write_run(tmp_path / "run", GRPO_RECORDS)
    out = tmp_path / "elsewhere"
    assert main(["report", str(run), "--out", str(out)]) == 0
    expected = {"reward_accuracy.png", "response_length.png", "mismatch.png", "grad_norm.png", "time_per_phase.png"}
    assert {p.name for p in out.glob("*.png")} == expected
    for name in expected:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 300
        assert (out / name).stat().st_size > 10_000  # drawn, not blank
    assert not (run / "report").exists()
    # no config.yaml: the algorithm is read off the metrics, and the summary says so
    assert "config.yaml does not exist; algorithm read off the metrics" in (out / "summary.md").read_text()


def test_mismatch_panel_draws_the_threshold_lines():
    run_records = GRPO_RECORDS
    panels, _ = choose_panels([_run_of(run_records)])
    mismatch = next(p for p in panels if p.file == "mismatch.png")
    figure = draw_panel(mismatch, [_run_of(run_records)])
    tme_axes, kl_axes = figure.axes
    # the metric, then the threshold (axhline: y constant)
    assert [line.get_label() for line in tme_axes.get_lines()] == ["train/token_mult_prob_error", "1.05 (investigate above)"]
    assert list(tme_axes.get_lines()[1].get_ydata()) == [1.05, 1.05]
    kl, nan_marker, kl_threshold = kl_axes.get_lines()  # gen_kl_error is nan at step 4: a dotted line marks it
    assert nan_marker.get_label() == "train/gen_kl_error not finite" and list(nan_marker.get_xdata()) == [4, 4]
    assert list(kl_threshold.get_ydata()) == [0.001, 0.001]
    assert tme_axes.get_xlabel() == "" and kl_axes.get_xlabel() == "step"


def _run_of(records: list[dict], name: str = "run"):
    from posttrain.metrics.report import Run

    return Run(Path(name), name, records, None, "", "grpo")


# --- missing metrics --------------------------------------------------------------------------------


def test_missing_metrics_skip_panels_with_a_note(tmp_path):
    records = [{"step": 1, "train/reward": 0.5}, {"step": 2, "train/reward": 0.25, "train/grad_norm": 1.0}]
    run = write_run(tmp_path / "partial", records)
    assert main(["report", str(run)]) == 0
    report = run / "report"
    assert {p.name for p in report.glob("*.png")} == {"reward_accuracy.png", "grad_norm.png"}
    summary = (report / "summary.md").read_text()
    assert "- mismatch.png skipped: none of train/token_mult_prob_error, train/gen_kl_error logged" in summary
    assert "- time_per_phase.png skipped: no timing/* metric logged" in summary
    assert "| validation/accuracy | not logged | | | |" in summary
    assert "## Train/generate mismatch\n\nNot logged." in summary
    assert "| wall time | not logged (no timing/* metric) |" in summary
    panels, _ = choose_panels([load_run(run)])
    reward = next(p for p in panels if p.file == "reward_accuracy.png")
    assert [plot.metrics for plot in reward.plots] == [("train/reward",)]  # the accuracy subplot is dropped


def test_dpo_panels_are_chosen_from_the_algorithm(tmp_path):
    run = load_run(write_run(tmp_path / "dpo", DPO_RECORDS))
    assert run.algorithm == "dpo"
    panels, skipped = choose_panels([run])
    assert [p.file for p in panels] == ["loss.png", "preference_accuracy.png", "chosen_rejected.png", "grad_norm.png", "time_per_phase.png"]
    assert {p.file for p in PANELS["dpo"]} - {p.file for p in panels} == {"memory.png"}
    assert main(["report", str(tmp_path / "dpo")]) == 0
    summary = (tmp_path / "dpo" / "report" / "summary.md").read_text()
    assert "| train/loss | 0.75 (step 1) | 0.625 (step 3) | 0.5 (step 2), min | 3 steps |" in summary
    assert "mismatch" not in summary


# --- compare ----------------------------------------------------------------------------------------


def test_compare_overlays_both_runs(tmp_path, capsys):
    a = write_run(tmp_path / "a" / "run", GRPO_RECORDS)
    b_records = [{**record, "train/reward": 1.0} if "train/reward" in record else record for record in GRPO_RECORDS]
    b = write_run(tmp_path / "b" / "run", b_records)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    runs = [load_run(a, "a/run"), load_run(b, "b/run")]
    panels, _ = choose_panels(runs)
    reward = next(p for p in panels if p.file == "reward_accuracy.png")
    reward_lines, accuracy_lines = plotted_series(reward, runs)
    assert [line.label for line in reward_lines] == [
        "a/run: train/reward", "a/run: validation/mean_reward", "b/run: train/reward", "b/run: validation/mean_reward",
    ]  # fmt: skip
    assert reward_lines[2].values == [1.0, 1.0, 1.0, 1.0]
    figure = draw_panel(reward, runs)
    # 4 series per subplot, plus the dotted marker of a's nan train/reward at step 3
    assert [len(ax.get_lines()) for ax in figure.axes] == [5, 4]
    assert {png.name for png in out.glob("*.png")} == {p.file for p in panels}
    compare = (out / "compare.md").read_text()
    assert "# Compare: a/run vs b/run" in compare  # same directory names: parent/name
    assert "| train/reward | last | 0.5 (step 4) | 1 (step 4) | +0.5 |" in compare
    assert "| train/token_mult_prob_error | steps above 1.05 | 2 of 4 | 2 of 4 | |" in compare
    assert "| timing/training | seconds per step that ran it | 2 s | 2 s | +0 |" in compare
    assert "![Reward and accuracy](reward_accuracy.png)" in compare


def test_compare_time_panel_has_a_bar_per_phase_and_run(tmp_path):
    runs = [load_run(write_run(tmp_path / "x", GRPO_RECORDS)), load_run(write_run(tmp_path / "y", GRPO_RECORDS))]
    time_panel = next(p for p in choose_panels(runs)[0] if p.kind == "phases")
    (ax,) = draw_panel(time_panel, runs).axes
    assert [label.get_text() for label in ax.get_yticklabels()] == [
        "generation", "scoring", "training", "weight_refresh", "validation", "other",
    ]  # fmt: skip
    assert len(ax.patches) == 12
    assert [c.get_label() for c in ax.containers] == ["x", "y"]


# --- errors -------------------------------------------------------------------------------------------


def test_absent_or_empty_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "none").mkdir()
    assert main(["report", str(tmp_path / "none")]) == 2
    assert f"posttrain report: {tmp_path / 'none' / 'metrics.jsonl'} does not exist" in capsys.readouterr().err
    empty = write_run(tmp_path / "empty", [])
    assert main(["report", str(empty)]) == 2
    assert f"{empty / 'metrics.jsonl'} is empty" in capsys.readouterr().err
    good = write_run(tmp_path / "good", GRPO_RECORDS)
    assert main(["compare", str(good), str(empty), "--out", str(tmp_path / "cmp")]) == 2
    assert f"posttrain compare: {empty / 'metrics.jsonl'} is empty" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "tra')
    with pytest.raises(ReportError, match="metrics.jsonl is not JSON lines"):
        load_run(tmp_path / "torn")


def test_one_slow_step_does_not_flatten_the_time_plot(tmp_path):
    # step 0: a 20 s reference pass; steps 1-10: 1 s each. The 90th percentile of the step totals is
    # 1 s and 20 > 4 x 1, so the axis stops at 3 x 1 = 3 s and the cut bar carries its total.
    records = [{"step": 0, "timing/reference_logprobs": 20.0}]
    records += [{"step": step, "timing/training": 1.0} for step in range(1, 11)]
    run = load_run(write_run(tmp_path / "slow", records))
    time_panel = next(p for p in choose_panels([run])[0] if p.kind == "phases")
    (ax,) = draw_panel(time_panel, [run]).axes
    assert ax.get_ylim() == (0.0, 3.0)
    assert [text.get_text() for text in ax.texts] == ["20 s"]
    assert ax.get_title().endswith("1 tall bar cut, total written on it")


def test_report_imports_neither_torch_nor_matplotlib_until_it_draws(tmp_path):
    run = write_run(tmp_path / "run", GRPO_RECORDS)
    code = (
        "import sys; from posttrain.cli.main import main; import posttrain.metrics.report; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
        f"rc = main(['report', {str(run)!r}]); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
