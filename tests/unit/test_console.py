"""The console's step lines and warnings (pure functions, hand-made metrics) and its plain output."""

from __future__ import annotations

import io

import pytest

from posttrain.metrics.console import Console, step_line, step_warnings, warnings_through

pytestmark = pytest.mark.unit

GRPO = {
    "train/reward": 0.41234,
    "train/accuracy": 0.40625,
    "train/mean_gen_tokens_per_sample": 3.125,
    "train/truncation_rate": 0.0,
    "train/token_mult_prob_error": 1.00031,
    "train/gen_kl_error": 1.234e-6,
    "train/grad_norm": 0.5321,
    "train/lr": 3e-4,
    "train/dynamic_sampling_kept_fraction": 0.6875,
    "train/num_generated_samples": 256.0,
    "timing/generation": 0.5,  # 256 * 3.125 tokens in 0.5 s: 1,600 tok/s
    "timing/total_step": 2.34,
    "train/skipped_nonfinite_steps": 0.0,
}
GRPO_LINE = (
    "step   3/100  reward  0.412  acc 0.406  len    3.1  trunc 0.00  tme 1.0003  gen-kl  1.2e-06  gnorm  0.532  "
    "lr 3.0e-04  kept 0.69     2.3s    1,600 tok/s"
)


def test_grpo_step_line_has_every_field_in_order():
    assert step_line("grpo", 3, 100, GRPO) == GRPO_LINE


def test_grpo_step_lines_align_and_validation_comes_last():
    later = {
        **GRPO,
        "train/reward": -0.5,
        "train/grad_norm": 12.25,
        "timing/total_step": 31.0,
        "validation/accuracy": 0.55,
    }
    line = step_line("grpo", 42, 100, later)
    assert line == (
        "step  42/100  reward -0.500  acc 0.406  len    3.1  trunc 0.00  tme 1.0003  gen-kl  1.2e-06  gnorm 12.250  "
        "lr 3.0e-04  kept 0.69    31.0s    1,600 tok/s  val acc 0.550"
    )
    assert line.index("tok/s") == GRPO_LINE.index("tok/s")  # the fields line up with step 3's


def test_absent_fields_are_left_out_and_nonfinite_values_keep_their_width():
    # no dynamic sampling, no accuracy; a skipped non-finite step
    metrics = {k: v for k, v in GRPO.items() if k not in ("train/dynamic_sampling_kept_fraction", "train/accuracy")}
    metrics.update({"train/grad_norm": float("nan"), "train/skipped_nonfinite_steps": 1.0})
    assert step_line("grpo", 5, 8, metrics) == (
        "step 5/8  reward  0.412  len    3.1  trunc 0.00  tme 1.0003  gen-kl  1.2e-06  gnorm    nan  lr 3.0e-04     2.3s"
        "    1,600 tok/s  SKIPPED (non-finite)"
    )
    assert (
        step_line("grpo", 0, 100, {"validation/accuracy": 0.0125, "timing/validation": 3.0})
        == "step   0/100  val acc 0.013"
    )


def test_sft_and_dpo_step_lines():
    sft = {
        "train/loss": 1.23456,
        "train/grad_norm": 2.5,
        "train/lr": 1e-5,
        "timing/training": 0.25,
        "train/supervised_tokens": 1000.0,
    }
    assert step_line("sft", 7, 20, sft) == "step  7/20  loss  1.2346  gnorm  2.500  lr 1.0e-05     0.2s    4,000 tok/s"
    assert step_line("sft", 20, 20, {**sft, "validation/loss": 0.9}).endswith("4,000 tok/s  val loss  0.9000")
    dpo = {
        "train/loss": 0.6931,
        "train/rewards/accuracy": 0.5,
        "train/rewards/margin": -0.0123,
        "train/grad_norm": 2.5,
        "train/lr": 1e-5,
        "timing/training": 0.25,
        "train/pairs": 16.0,
        "validation/loss": 0.7,
        "validation/rewards/accuracy": 0.6,
    }
    assert step_line("dpo", 7, 20, dpo) == (
        "step  7/20  loss  0.6931  acc 0.500  margin  -0.012  gnorm  2.500  lr 1.0e-05     0.2s    64.0 pairs/s  "
        "val loss  0.7000  val acc 0.600"
    )


def run_warnings(sequence: list[dict[str, float]], remind_every: int = 3) -> list[str]:
    """Every message of a run whose step s (from 1) has metrics sequence[s - 1]."""
    messages, state = [], {}
    for step, metrics in enumerate(sequence, start=1):
        new, state = step_warnings(step, metrics, state, remind_every=remind_every)
        messages += new
    return messages


def test_mismatch_warns_once_reminds_then_recovers():
    tme = [1.001, 1.08, 1.09, 1.07, 1.06, 1.2, 1.01, 1.02]
    messages = run_warnings([{"train/token_mult_prob_error": v} for v in tme], remind_every=3)
    advice = (
        ": the generator's logprobs disagree with the trainer's (generation dtype, sampling settings, weight refresh; "
        "docs/algorithms.md)"
    )
    assert messages == [
        "warning (step 2): train/token_mult_prob_error 1.0800 > 1.05" + advice,
        "warning (step 5, since step 2): still train/token_mult_prob_error 1.0600 > 1.05" + advice,
        "recovered (step 7): train/token_mult_prob_error 1.0100 is back under 1.05 (since step 2)",
    ]


def test_gen_kl_nan_counts_as_over_and_absent_steps_change_nothing():
    sequence = [
        {"train/gen_kl_error": 1e-6},
        {"train/gen_kl_error": float("nan")},
        {},
        {},
        {"train/gen_kl_error": 5e-4},
    ]
    assert run_warnings(sequence, remind_every=10) == [
        "warning (step 2): train/gen_kl_error nan > 1e-03: the generator samples from another distribution than the "
        "trainer scores (docs/algorithms.md)",
        "recovered (step 5): train/gen_kl_error 5.0e-04 is back under 1e-03 (since step 2)",
    ]


def test_dynamic_sampling_and_nonfinite_warnings():
    sequence = [
        {"train/dynamic_sampling_kept_fraction": 0.5, "train/skipped_nonfinite_steps": 0.0},  # half: not "most"
        {
            "train/dynamic_sampling_kept_fraction": 0.171875,
            "train/dynamic_sampling_gen_batches": 4.0,
            "train/skipped_nonfinite_steps": 1.0,
            "train/consecutive_nonfinite_steps": 1.0,
        },
        {"train/dynamic_sampling_kept_fraction": 0.75, "train/skipped_nonfinite_steps": 0.0},
    ]
    assert run_warnings(sequence) == [
        "warning (step 2): dynamic sampling kept 17% of the groups it sampled (4 generation batches): most groups' "
        "rewards all agree (every response right, or every one wrong), so steps generate more; the run stops when "
        "grpo.dynamic_sampling_max_gen_batches cannot fill a batch",
        "warning (step 2): optimizer step skipped: non-finite loss or gradient norm (1 in a row; the weights are unchanged)",
        "recovered (step 3): dynamic sampling keeps 75% of the groups it samples again (since step 2)",
        "recovered (step 3): optimizer steps are finite again (since step 2)",
    ]


def test_step_warnings_leaves_the_given_state_alone():
    state = {}
    _, new = step_warnings(1, {"train/token_mult_prob_error": 2.0}, state)
    assert state == {} and new == {"token_mult_prob_error": (1, 1)}


def test_console_off_a_terminal_prints_plain_lines_without_escapes(tmp_path):
    out = io.StringIO()  # not a terminal: no live display, no ANSI
    console = Console(file=out)
    console.record_warnings(tmp_path / "warnings.log", resumed_step=-1)
    console.start_progress("RL", total=100, plain_lines=False)
    console.phase("rollout", total=256)  # phases show on the live display only
    console.phase_advance(tokens=3)
    console.report_step("grpo", 3, 100, GRPO)
    console.advance()
    console.report_step("grpo", 4, 100, {**GRPO, "train/token_mult_prob_error": 1.5})
    console.stop_progress()
    warning = (
        "warning (step 4): train/token_mult_prob_error 1.5000 > 1.05: the generator's logprobs disagree with the "
        "trainer's (generation dtype, sampling settings, weight refresh; docs/algorithms.md)"
    )
    assert (
        out.getvalue()
        == "\n".join([GRPO_LINE, GRPO_LINE.replace("3/100", "4/100").replace("1.0003", "1.5000"), warning]) + "\n"
    )
    assert "\x1b" not in out.getvalue()
    assert (tmp_path / "warnings.log").read_text() == warning + "\n"
    assert console.warnings == [warning]


def test_plain_progress_lines_every_tenth_and_a_disabled_console_is_silent():
    out = io.StringIO()
    console = Console(file=out)
    console.start_progress("warm start (SFT)", total=20)
    for step in range(20):
        console.advance(f"loss {1.0 / (step + 1):.3f}")
    console.stop_progress()
    assert out.getvalue().splitlines()[:2] == ["warm start (SFT) 2/20  loss 0.500", "warm start (SFT) 4/20  loss 0.250"]
    assert len(out.getvalue().splitlines()) == 10

    silent = io.StringIO()
    console = Console(enabled=False, file=silent)
    console.start_progress("RL", total=3)
    console.report_step("grpo", 1, 3, {**GRPO, "train/token_mult_prob_error": 2.0})
    console.note("hello")
    console.stop_progress()
    assert silent.getvalue() == "" and console.warnings == []


def test_plain_progress_counts_items_advanced_several_at_a_time():
    """DPO's reference pass advances by chunks of pairs: a line whenever a tenth of the way is crossed."""
    out = io.StringIO()
    console = Console(file=out)
    console.start_progress("reference logprobs", total=1000)
    for pairs in (256, 256, 256, 232):
        console.advance(amount=pairs)
    console.stop_progress()
    assert out.getvalue().splitlines() == [f"reference logprobs {n}/1000" for n in (256, 512, 768, 1000)]


ADVICE = (
    ": the generator's logprobs disagree with the trainer's (generation dtype, sampling settings, weight refresh; "
    "docs/algorithms.md)"
)
LOG = [
    "warning (step 2): train/token_mult_prob_error 1.0800 > 1.05",
    "warning (step 5, since step 2): still train/token_mult_prob_error 1.0600 > 1.05",
    "recovered (step 7): train/token_mult_prob_error 1.0100 is back under 1.05 (since step 2)",
]


def test_warnings_through_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_line():
    text = "\n".join(LOG) + "\nwarning (step 9): optimizer st"  # killed mid-write
    assert warnings_through(text, 5) == LOG[:2]
    assert warnings_through(text, 7) == LOG
    assert warnings_through(text, -1) == []  # no checkpoint: the run starts over
    assert warnings_through("", 3) == [] and warnings_through("a line about no step\n", -1) == ["a line about no step"]


def test_a_resumed_console_drops_the_warnings_of_redone_steps(tmp_path):
    """Resumed at step 5: steps 6 and 7 are redone, so their warnings are dropped and said anew
    (as metrics.jsonl drops and relogs their records); a disabled console (another rank) leaves the file."""
    path = tmp_path / "warnings.log"
    path.write_text("\n".join(LOG) + "\n")
    Console(enabled=False).record_warnings(path, resumed_step=-1)
    assert path.read_text() == "\n".join(LOG) + "\n"
    console = Console(file=io.StringIO())
    console.record_warnings(path, resumed_step=5)
    assert path.read_text() == "\n".join(LOG[:2]) + "\n"
    console.report_step("grpo", 6, 10, {"train/token_mult_prob_error": 1.5})
    assert path.read_text().splitlines()[2:] == ["warning (step 6): train/token_mult_prob_error 1.5000 > 1.05" + ADVICE]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_display_on_a_terminal_draws_the_phase():
    out = Terminal()
    console = Console(file=out)
    assert console.live
    assert not Console(file=Terminal(), live=False).live  # logger.progress: false
    console.start_progress("RL", total=10)
    console.phase("rollout", total=4)
    console.phase_advance(tokens=7)
    console._progress.refresh()  # what the display's refresh thread draws 10 times a second
    console.report_step("grpo", 1, 10, GRPO)
    console.stop_progress()
    text = out.getvalue()
    assert "  rollout" in text and "1/4" in text and "7 tokens" in text and step_line("grpo", 1, 10, GRPO) in text


def test_eta_counts_this_sessions_steps_down():
    from rich.progress import Progress

    from posttrain.metrics.console import EtaColumn

    now = [100.0]
    progress = Progress(get_time=lambda: now[0], auto_refresh=False, console=Console(file=io.StringIO()).rich)
    bar = progress.add_task("RL", total=10, completed=2, eta_from=2)  # resumed at step 2
    assert EtaColumn().render(progress.tasks[0]).plain == ""  # no step done yet this session
    now[0] = 120.0
    progress.update(bar, advance=2, done_elapsed=20.0)  # 2 steps in 20 s: 6 left, 60 s
    assert EtaColumn().render(progress.tasks[0]).plain == "ETA 0:01:00"
    now[0] = 135.0  # 15 s into step 5
    assert EtaColumn().render(progress.tasks[0]).plain == "ETA 0:00:45"
    progress.update(bar, advance=6, done_elapsed=95.0)
    assert EtaColumn().render(progress.tasks[0]).plain == ""  # done: no ETA left to show


def test_plain_phases_say_nothing_when_quick_and_beat_while_long():
    """Off a terminal a phase is silent unless it runs past HEARTBEAT_SECONDS: then a progress
    line at most every HEARTBEAT_SECONDS, and how long it took once it ends."""
    now = [0.0]
    out = io.StringIO()
    console = Console(file=out, clock=lambda: now[0])
    console.phase("scoring", total=4)
    console.phase_advance(4)
    now[0] = 5.0
    console.phase("rollout", total=64)  # scoring took 5 s: nothing said
    for second in range(1, 80):
        now[0] = 5.0 + second
        console.phase_advance(tokens=100) if second % 2 else None
    console.phase("training", total=8)  # rollout ran 79 s
    console.report_step("sft", 1, 2, {"train/loss": 1.0})  # ends training (0 s): nothing said
    assert out.getvalue().splitlines()[:3] == [
        "  rollout 16/64, 1,600 tokens  31 s",  # an advance every odd second: the 16th is the first 30 s in
        "  rollout 31/64, 3,100 tokens  61 s",
        "  rollout done in 79 s (40/64, 4,000 tokens)",
    ]
    assert out.getvalue().splitlines()[3].startswith("step 1/2")
    assert len(out.getvalue().splitlines()) == 4
