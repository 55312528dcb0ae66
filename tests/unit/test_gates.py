"""Metric gates: the expression parser, each function on hand-computed values, failures that explain
themselves, `check_run` on a run directory, and recipes rejecting a malformed gate at load time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.config.loader import ConfigError, dump_config, load_config
from posttrain.config.schema import RecipeConfig
from posttrain.metrics.gates import (
    FUNCTIONS,
    Aggregate,
    AllOf,
    AnyOf,
    AtStep,
    Comparison,
    GateSyntaxError,
    Number,
    check_run,
    evaluate_gate,
    parse_gate,
)
from posttrain.metrics.logger import MetricsLogger

pytestmark = pytest.mark.unit

TINY_RECIPE = Path(__file__).resolve().parents[2] / "src" / "posttrain" / "recipes" / "tiny" / "grpo-gemma4-tiny.yaml"

# Rewards are multiples of 1/8, so sums and means are exact in binary floating point:
#   train/reward, in logged order: 0.25, 1.0, 0.5, 0.125 (steps 1-4)
#     count 4, first 0.25, last 0.125, max 1.0, min 0.125,
#     mean 1.875 / 4 = 0.46875, median of sorted [0.125, 0.25, 0.5, 1.0] = (0.25 + 0.5) / 2 = 0.375
#   train/token_mult_prob_error: 1.0, 1.2, 1.1 (steps 1-3); median of [1.0, 1.1, 1.2] = 1.1
#   validation/accuracy: 0.5 at step 2, 0.75 at step 4
RECORDS = [
    {"step": 1, "train/reward": 0.25, "train/token_mult_prob_error": 1.0},
    {"step": 2, "train/reward": 1.0, "train/token_mult_prob_error": 1.2, "validation/accuracy": 0.5},
    {"step": 3, "train/reward": 0.5, "train/token_mult_prob_error": 1.1},
    {"step": 4, "train/reward": 0.125, "validation/accuracy": 0.75},
]


def evaluate(text: str, records: list[dict] = RECORDS) -> tuple[bool, str]:
    result = evaluate_gate(parse_gate(text), records)
    assert result.text == text
    return result.passed, result.explanation


def syntax_error(text: str) -> str:
    with pytest.raises(GateSyntaxError) as info:
        parse_gate(text)
    return str(info.value)


# --- parser -----------------------------------------------------------------------------------


def above(metric: str) -> Comparison:
    return Comparison(AtStep(metric, 1), ">", Number(0.0, "0"))


def test_and_binds_tighter_than_or():
    gate = parse_gate("a[1] > 0 or b[1] > 0 and c[1] > 0")
    assert gate.condition == AnyOf((above("a"), AllOf((above("b"), above("c")))))


def test_parentheses_group_first():
    gate = parse_gate("(a[1] > 0 or b[1] > 0) and c[1] > 0")
    assert gate.condition == AllOf((AnyOf((above("a"), above("b"))), above("c")))


def test_chains_of_one_operator_are_flat_and_redundant_parentheses_vanish():
    assert parse_gate("a[1] > 0 and b[1] > 0 and c[1] > 0").condition == AllOf((above("a"), above("b"), above("c")))
    assert parse_gate("((a[1] > 0))").condition == above("a")


def test_precedence_decides_the_outcome():
    # a holds, b and c fail: a or (b and c) holds; (a or b) and c fails.
    records = [{"step": 1, "a": 1.0, "b": 0.0, "c": 0.0}]
    assert evaluate("a[1] > 0 or b[1] > 0 and c[1] > 0", records)[0] is True
    assert evaluate("(a[1] > 0 or b[1] > 0) and c[1] > 0", records)[0] is False


@pytest.mark.parametrize(
    "number, value",
    [("0.1", 0.1), ("-1.15", -1.15), ("1e-3", 0.001), ("2.5E+2", 250.0), ("+2", 2.0), (".5", 0.5), ("7", 7.0)],
)
def test_numbers(number, value):
    comparison = parse_gate(f"max(train/reward) < {number}").condition
    assert comparison == Comparison(Aggregate("max", "train/reward"), "<", Number(value, number))


@pytest.mark.parametrize("operator", ["<", "<=", ">", ">=", "==", "!="])
def test_every_comparison_operator_parses_without_spaces(operator):
    assert parse_gate(f"train/reward[20]{operator}-1").condition == Comparison(
        AtStep("train/reward", 20), operator, Number(-1.0, "-1")
    )


@pytest.mark.parametrize("metric", ["env/verifier_errors", "timing/total_step", "a.b/c_d.e2", "_x", "step"])
def test_metric_names(metric):
    assert parse_gate(f"last({metric}) >= 0").condition.left == Aggregate("last", metric)


def test_two_metric_operands_may_be_compared():
    assert evaluate("last(validation/accuracy) > first(validation/accuracy)") == (
        True,
        "last(validation/accuracy) = 0.75 at step 4, first(validation/accuracy) = 0.5 at step 2",
    )


# --- syntax errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("median(train/x < 1", "gate 'median(train/x < 1': expected ')' at position 16, got '<'"),
        (
            "last(train/reward) > ",
            "gate 'last(train/reward) > ': expected a number, function(metric) or metric[step] at position 22, got the end of the gate",
        ),
        (
            "a[1] > 1 b[2] > 1",
            "gate 'a[1] > 1 b[2] > 1': expected 'and', 'or' or the end of the gate at position 10, got 'b'",
        ),
        ("(a[1] > 1", "gate '(a[1] > 1': expected 'and', 'or' or ')' at position 10, got the end of the gate"),
        ("a[1] >> 0", "gate 'a[1] >> 0': expected a number, function(metric) or metric[step] at position 7, got '>'"),
        ("a[-1] > 0", "gate 'a[-1] > 0': expected a step number (a whole number >= 0) at position 3, got '-1'"),
        ("a[2.0] > 0", "gate 'a[2.0] > 0': expected a step number (a whole number >= 0) at position 3, got '2.0'"),
        ("max(and) > 0", "gate 'max(and) > 0': expected a metric name, e.g. train/reward at position 5, got 'and'"),
        ("a[1] = 1", "gate 'a[1] = 1': unexpected character '=' at position 6 (equality is '==')"),
        ("a[1] > 1 && b[1] > 1", "gate 'a[1] > 1 && b[1] > 1': unexpected character '&' at position 10"),
        ("", "gate '': expected a number, function(metric) or metric[step] at position 1, got the end of the gate"),
    ],
)
def test_syntax_errors_name_the_gate_the_position_and_what_was_expected(text, message):
    assert syntax_error(text) == message


def test_a_bare_metric_asks_for_a_function_or_a_step():
    assert syntax_error("train/reward > 0.1") == (
        "gate 'train/reward > 0.1': expected '(' or '[' after 'train/reward' (a metric is read through a "
        "function, e.g. last(train/reward), or at a step, e.g. train/reward[20]) at position 14, got '>'"
    )


def test_unknown_function_lists_the_known_ones():
    assert syntax_error("average(train/reward) > 0") == (
        "gate 'average(train/reward) > 0': unknown function 'average' at position 1; "
        "known functions: count, first, last, max, mean, median, min"
    )


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "__import__('os').system('true') == 0",
        "__import__(os) > 0",
        "eval(x) > 0",
        "last(train/reward) > 0 or open('/etc/passwd')",
        "last(train/reward).real > 0",
        "1 if 1 else 0",
    ],
)
def test_python_is_never_evaluated(text):
    syntax_error(text)


def test_syntax_error_is_a_value_error():
    assert issubclass(GateSyntaxError, ValueError)


GATE_PIECES = ["median(", "max(", "count(", "avg(", "train/reward", "[20]", "[", "]", "(", ")", " < ", "<=", "==", "=",
               "!=", " and ", " or ", "1e-3", "-1.15", ".", "'", "\n", "\x00", "é"]  # fmt: skip


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(GATE_PIECES) | st.text(max_size=3), max_size=8).map("".join))
def test_any_text_parses_or_raises_a_one_line_syntax_error(text):
    # One line, so that a recipe's error report (one problem per line) stays readable.
    try:
        parse_gate(text)
    except GateSyntaxError as error:
        assert str(error).startswith(f"gate {text!r}: ") and "\n" not in str(error)


# --- functions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "operand, value, explanation",
    [
        ("count(train/reward)", 4, "count(train/reward) = 4"),
        ("first(train/reward)", 0.25, "first(train/reward) = 0.25 at step 1"),
        ("last(train/reward)", 0.125, "last(train/reward) = 0.125 at step 4"),
        ("max(train/reward)", 1.0, "max(train/reward) = 1 over 4 steps"),
        ("min(train/reward)", 0.125, "min(train/reward) = 0.125 over 4 steps"),
        ("mean(train/reward)", 0.46875, "mean(train/reward) = 0.46875 over 4 steps"),
        ("median(train/reward)", 0.375, "median(train/reward) = 0.375 over 4 steps"),
        ("median(train/token_mult_prob_error)", 1.1, "median(train/token_mult_prob_error) = 1.1 over 3 steps"),
        ("train/reward[2]", 1.0, "train/reward[2] = 1"),
        ("validation/accuracy[4]", 0.75, "validation/accuracy[4] = 0.75"),
        ("count(validation/accuracy)", 2, "count(validation/accuracy) = 2"),
        ("last(step)", 4, "last(step) = 4 at step 4"),
    ],
)
def test_each_operand_reads_the_hand_computed_value(operand, value, explanation):
    assert evaluate(f"{operand} == {value}") == (True, explanation)
    assert evaluate(f"{operand} != {value}") == (False, explanation)


def test_median_of_odd_and_even_counts():
    assert FUNCTIONS["median"]([1.0, 1.2, 1.1]) == 1.1
    assert FUNCTIONS["median"]([4.0, 1.0, 3.0, 2.0]) == 2.5  # mean of the middle two, 2 and 3


def test_a_single_value_is_one_step():
    assert evaluate("mean(x) < 1", [{"step": 7, "x": 0.5}]) == (True, "mean(x) = 0.5 over 1 step")


@pytest.mark.parametrize(
    "gate, passed",
    [("x[1] < 2", True), ("x[1] <= 1", True), ("x[1] > 1", False), ("x[1] >= 1", True), ("x[1] == 1", True),
     ("x[1] != 1", False), ("x[1] < 1", False)],
)  # fmt: skip
def test_comparison_operators(gate, passed):
    assert evaluate(gate, [{"step": 1, "x": 1.0}])[0] is passed


def test_failing_gate_explains_the_value():
    assert evaluate("median(train/token_mult_prob_error) < 1.05") == (
        False,
        "median(train/token_mult_prob_error) = 1.1 over 3 steps",
    )


def test_compound_gate_marks_its_failing_comparisons():
    assert evaluate("train/reward[1] > 0.5 and median(train/token_mult_prob_error) < 1.15") == (
        False,
        "train/reward[1] = 0.25 [fails]; median(train/token_mult_prob_error) = 1.1 over 3 steps",
    )
    # `or` evaluates every part too, so the report shows every value the gate depends on.
    assert evaluate("train/reward[1] > 0.5 or max(train/reward) > 0.9") == (
        True,
        "train/reward[1] = 0.25 [fails]; max(train/reward) = 1 over 4 steps",
    )


# --- missing data, nan, inf -------------------------------------------------------------------


def test_a_metric_never_logged_fails_the_gate():
    assert evaluate("mean(train/nope) < 1") == (False, "train/nope was never logged (4 records)")
    assert evaluate("train/nope[1] < 1") == (False, "train/nope has no value at step 1 (never logged)")


def test_count_of_a_metric_never_logged_is_zero():
    assert evaluate("count(env/verifier_errors) == 0") == (True, "count(env/verifier_errors) = 0")


def test_a_step_without_the_metric_fails_the_gate():
    assert evaluate("train/reward[20] > 0.1") == (False, "train/reward has no value at step 20 (logged at 4 steps)")
    assert evaluate("validation/accuracy[3] > 0.1") == (
        False,
        "validation/accuracy has no value at step 3 (logged at 2 steps)",
    )


def test_no_records_fail_every_gate_but_count():
    assert evaluate("max(train/reward) > 0", []) == (False, "train/reward was never logged (0 records)")
    assert evaluate("count(train/reward) < 1", []) == (True, "count(train/reward) = 0")


def test_a_step_logged_twice_is_ambiguous():
    records = [{"step": 3, "x": 1.0}, {"step": 3, "x": 2.0}]
    assert evaluate("x[3] > 0", records) == (False, "x was logged 2 times at step 3")


@pytest.mark.parametrize("gate", ["x[2] < 10", "x[2] != 0", "x[2] == x[2]", "max(x) < 10", "min(x) > -10",
                                  "mean(x) < 10", "median(x) < 10", "last(x) != 0"])  # fmt: skip
def test_nan_fails_every_comparison(gate):
    # MetricsLogger writes nan as the string "nan"; a float nan (read by another tool) is the same.
    for nan in ("nan", math.nan):
        records = [{"step": 1, "x": 1.0}, {"step": 2, "x": nan}]
        passed, explanation = evaluate(gate, records)
        assert passed is False
        assert explanation.endswith("(nan fails every comparison)")


def test_nan_explanation_shows_the_value():
    records = [{"step": 1, "x": 1.0}, {"step": 2, "x": "nan"}]
    assert evaluate("max(x) < 10", records) == (False, "max(x) = nan over 2 steps (nan fails every comparison)")


def test_count_is_not_nan_when_values_are():
    records = [{"step": 1, "x": "nan"}, {"step": 2, "x": "nan"}]
    assert evaluate("count(x) == 2", records) == (True, "count(x) = 2")


def test_infinities_compare_as_numbers():
    records = [{"step": 1, "x": 1.0}, {"step": 2, "x": "inf"}, {"step": 3, "x": "-inf"}]
    assert evaluate("max(x) > 1e300", records) == (True, "max(x) = inf over 3 steps")
    assert evaluate("min(x) < -1e300", records) == (True, "min(x) = -inf over 3 steps")
    assert evaluate("mean(x) < 0", records)[0] is False  # inf + -inf is nan


@pytest.mark.parametrize("value", ["abc", None, True, [1.0]])
def test_a_value_that_is_not_a_number_fails_the_gate(value):
    records = [{"step": 5, "x": value}]
    assert evaluate("max(x) > 0", records) == (False, f"x at step 5 is {value!r}, not a number")


# --- check_run --------------------------------------------------------------------------------


def write_run(run_dir: Path, gates: list[str] | None, records: list[dict] = RECORDS) -> Path:
    """A run directory as a run leaves it: config.yaml (None: none) and metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if gates is not None:
        recipe = run_dir.parent / "recipe.yaml"
        recipe.write_text(f"defaults: {TINY_RECIPE}\ngates: {json.dumps(gates)}\n")
        (run_dir / "config.yaml").write_text(dump_config(load_config(recipe, RecipeConfig)))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return run_dir


def test_check_run_passes(tmp_path, capsys):
    run = write_run(tmp_path / "run", ["max(train/reward) > 0.45", "train/reward[2] >= 1"])
    assert check_run(run) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "PASS  max(train/reward) > 0.45   (max(train/reward) = 1 over 4 steps)",
        "PASS  train/reward[2] >= 1   (train/reward[2] = 1)",
    ]
    assert captured.err == ""


def test_check_run_fails_when_one_gate_fails_and_adds_extra_gates(tmp_path, capsys):
    run = write_run(tmp_path / "run", ["median(train/token_mult_prob_error) < 1.05"])
    assert check_run(str(run), ["count(train/reward) == 4", "train/reward[20] > 0.1"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "FAIL  median(train/token_mult_prob_error) < 1.05   (median(train/token_mult_prob_error) = 1.1 over 3 steps)",
        "PASS  count(train/reward) == 4   (count(train/reward) = 4)",
        "FAIL  train/reward[20] > 0.1   (train/reward has no value at step 20 (logged at 4 steps))",
    ]


def test_check_run_reads_nan_as_the_logger_writes_it(tmp_path, capsys):
    run = tmp_path / "run"
    logger = MetricsLogger(run, tensorboard=False)
    logger.log(1, {"train/gen_kl_error": 0.001})
    logger.log(2, {"train/gen_kl_error": math.nan})
    logger.close()
    assert check_run(run, ["mean(train/gen_kl_error) < 0.002"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "FAIL  mean(train/gen_kl_error) < 0.002   "
        "(mean(train/gen_kl_error) = nan over 2 steps (nan fails every comparison))"
    ]


def test_check_run_without_config_uses_the_given_gates(tmp_path, capsys):
    run = write_run(tmp_path / "run", None)
    assert check_run(run, ["last(train/reward) < 0.2"]) == 0
    assert capsys.readouterr().out == "PASS  last(train/reward) < 0.2   (last(train/reward) = 0.125 at step 4)\n"


def test_check_run_without_metrics_is_an_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert check_run(tmp_path / "run", ["count(x) == 0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{tmp_path / 'run'} has no metrics.jsonl" in captured.err


def test_check_run_without_gates_is_an_error(tmp_path, capsys):
    run = write_run(tmp_path / "run", [])
    assert check_run(run) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no gates to check" in captured.err and "--gate" in captured.err


def test_check_run_with_a_malformed_extra_gate_is_an_error(tmp_path, capsys):
    run = write_run(tmp_path / "run", ["count(x) == 0"])
    assert check_run(run, ["median(train/x < 1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "gate 'median(train/x < 1': expected ')' at position 16, got '<'" in captured.err


# --- recipes ----------------------------------------------------------------------------------


def test_recipe_gates_load_and_survive_the_run_directory_copy(tmp_path):
    gates = ["median(train/token_mult_prob_error) < 1.05", "train/gen_kl_error[20] < 1e-3 and max(train/reward) > 0.45"]
    run = write_run(tmp_path / "run", gates)
    assert load_config(run / "config.yaml", RecipeConfig).gates == gates


def test_a_recipe_without_gates_has_none(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"defaults: {TINY_RECIPE}\ngates: []\n")
    assert load_config(recipe, RecipeConfig).gates == []
    assert load_config(TINY_RECIPE, RecipeConfig).gates  # the shipped recipes state theirs


def test_recipe_with_a_malformed_gate_fails_to_load_naming_the_gate(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"defaults: {TINY_RECIPE}\ngates:\n  - count(train/reward) > 0\n  - median(train/x < 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, RecipeConfig)
    message = str(info.value)
    assert message.startswith(f"{recipe}: invalid recipe (1 problem):\n  gates: ")
    assert "gate 'median(train/x < 1': expected ')' at position 16, got '<'" in message


def test_recipe_with_an_unknown_gate_function_fails_to_load(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"defaults: {TINY_RECIPE}\ngates: ['avg(train/reward) > 0']\n")
    with pytest.raises(ConfigError, match=r"gates: gate 'avg\(train/reward\) > 0': unknown function 'avg'"):
        load_config(recipe, RecipeConfig)


def test_gates_module_imports_without_torch():
    code = "import sys, posttrain.metrics.gates; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
