"""Metric gates: pass/fail checks on a finished run's metrics.jsonl, run by `posttrain check RUN_DIR`.

A gate is a small expression over the logged metrics, for example

    median(train/token_mult_prob_error) < 1.05
    train/reward[20] > 0.1
    train/gen_kl_error[20] < 0.001 and (max(train/reward) > 0.45 or last(validation/accuracy) >= 0.6)

Grammar (`and` binds tighter than `or`; no arithmetic):

    gate        := any_of END
    any_of      := all_of ("or" all_of)*
    all_of      := condition ("and" condition)*
    condition   := "(" any_of ")" | operand COMPARISON operand
    operand     := NUMBER | FUNCTION "(" METRIC ")" | METRIC "[" STEP "]"
    COMPARISON  := < | <= | > | >= | == | !=
    FUNCTION    := count | first | last | max | mean | median | min
    METRIC      := a path of letters, digits, '_', '.' and '/', starting with a letter or '_'
    NUMBER      := 0.1, -1.15, 1e-3, ...;  STEP := a whole number >= 0

Gates come from recipes and command lines, so they are parsed by the tokenizer and recursive-descent
parser below, never handed to Python's eval: `__import__('os')` is a syntax error like any other.

This module imports neither torch nor anything heavy: the recipe schema parses gates at load time.
"""

from __future__ import annotations

import json
import math
import operator
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.loader import ConfigError, load_config
from posttrain.config.schema import RecipeConfig
from posttrain.metrics.logger import read_metrics

__all__ = ["FUNCTIONS", "Gate", "GateResult", "GateSyntaxError", "check_run", "evaluate_gate", "parse_gate"]


class GateSyntaxError(ValueError):
    """A gate that does not parse; the message names the gate, the position (1-based) and what was expected."""


# --------------------------------------------------------------------------------------------
# the parsed form


@dataclass(frozen=True)
class Number:
    value: float
    text: str  # as written, so explanations show `1e-3`, not `0.001`

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Aggregate:
    """A function of every logged value of a metric, e.g. `median(train/reward)`."""

    function: str
    metric: str

    def __str__(self) -> str:
        return f"{self.function}({self.metric})"


@dataclass(frozen=True)
class AtStep:
    """The value a metric logged at one step, e.g. `train/reward[20]`."""

    metric: str
    step: int

    def __str__(self) -> str:
        return f"{self.metric}[{self.step}]"


Operand = Number | Aggregate | AtStep


@dataclass(frozen=True)
class Comparison:
    left: Operand
    operator: str
    right: Operand

    def __str__(self) -> str:
        return f"{self.left} {self.operator} {self.right}"


@dataclass(frozen=True)
class AllOf:
    parts: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Condition, ...]


Condition = Comparison | AllOf | AnyOf


@dataclass(frozen=True)
class Gate:
    text: str
    condition: Condition


@dataclass(frozen=True)
class GateResult:
    text: str
    passed: bool
    explanation: str  # the values the gate read, e.g. "median(train/reward) = 0.41 over 20 steps"


# --------------------------------------------------------------------------------------------
# functions and comparisons


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _nan_or(summary: Callable[[list[float]], float]) -> Callable[[list[float]], float]:
    """`summary`, but nan when any value is nan: max, min and sorting give arbitrary answers around a
    nan, and a diverged step must not vanish from a gate's statistic."""

    def wrapped(values: list[float]) -> float:
        return math.nan if any(math.isnan(v) for v in values) else summary(values)

    return wrapped


FUNCTIONS: dict[str, Callable[[list[float]], float]] = {
    "count": lambda values: float(len(values)),
    "first": lambda values: values[0],
    "last": lambda values: values[-1],
    "max": _nan_or(max),
    "mean": lambda values: sum(values) / len(values),  # a nan anywhere makes the sum nan
    "median": _nan_or(_median),
    "min": _nan_or(min),
}
"""Each function of a metric's logged values (in the order logged); `count` also takes none."""

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}


# --------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "name", "comparison", "(", ")", "[", "]", "end"
    text: str
    position: int  # 0-based index into the gate text


_TOKEN_PATTERN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<number>[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_./]*)
    | (?P<comparison><=|>=|==|!=|<|>)
    | (?P<bracket>[()\[\]])
    """,
    re.VERBOSE | re.ASCII,
)
_KEYWORDS = ("and", "or")


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN_PATTERN.match(text, position)
        if match is None:
            hint = " (equality is '==')" if text[position] == "=" else ""
            raise GateSyntaxError(
                f"gate {text!r}: unexpected character {text[position]!r} at position {position + 1}{hint}"
            )
        kind = match.lastgroup
        if kind != "space":
            tokens.append(_Token(match.group() if kind == "bracket" else kind, match.group(), position))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


# --------------------------------------------------------------------------------------------
# recursive-descent parser, one method per grammar rule


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.index += 1
        return token

    def is_keyword(self, word: str) -> bool:
        token = self.peek()
        return token.kind == "name" and token.text == word

    def error(self, expected: str, token: _Token | None = None) -> GateSyntaxError:
        token = token or self.peek()
        got = "the end of the gate" if token.kind == "end" else repr(token.text)
        return GateSyntaxError(f"gate {self.text!r}: expected {expected} at position {token.position + 1}, got {got}")

    def expect(self, kind: str, expected: str) -> _Token:
        if self.peek().kind != kind:
            raise self.error(expected)
        return self.take()

    def gate(self) -> Condition:
        condition = self.any_of()
        self.expect("end", "'and', 'or' or the end of the gate")
        return condition

    def any_of(self) -> Condition:
        parts = [self.all_of()]
        while self.is_keyword("or"):
            self.take()
            parts.append(self.all_of())
        return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))

    def all_of(self) -> Condition:
        parts = [self.condition()]
        while self.is_keyword("and"):
            self.take()
            parts.append(self.condition())
        return parts[0] if len(parts) == 1 else AllOf(tuple(parts))

    def condition(self) -> Condition:
        if self.peek().kind == "(":  # no operand starts with '(', so this is always a group
            self.take()
            inner = self.any_of()
            self.expect(")", "'and', 'or' or ')'")
            return inner
        left = self.operand()
        comparison = self.expect("comparison", "a comparison (<, <=, >, >=, ==, !=)").text
        return Comparison(left, comparison, self.operand())

    def operand(self) -> Operand:
        token = self.peek()
        if token.kind == "number":
            return Number(float(self.take().text), token.text)
        if token.kind != "name" or token.text in _KEYWORDS:
            raise self.error("a number, function(metric) or metric[step]")
        name = self.take().text
        if self.peek().kind == "(":
            return self.aggregate(name, token)
        if self.peek().kind == "[":
            return self.at_step(name)
        raise self.error(
            f"'(' or '[' after {name!r} (a metric is read through a function, e.g. last({name}), "
            f"or at a step, e.g. {name}[20])"
        )

    def aggregate(self, function: str, function_token: _Token) -> Aggregate:
        if function not in FUNCTIONS:
            raise GateSyntaxError(
                f"gate {self.text!r}: unknown function {function!r} at position {function_token.position + 1}; "
                f"known functions: {', '.join(sorted(FUNCTIONS))}"
            )
        self.take()  # '('
        metric = self.metric_name()
        self.expect(")", "')'")
        return Aggregate(function, metric)

    def at_step(self, metric: str) -> AtStep:
        self.take()  # '['
        token = self.peek()
        if token.kind != "number" or not token.text.isdigit():
            raise self.error("a step number (a whole number >= 0)")
        self.take()
        self.expect("]", "']'")
        return AtStep(metric, int(token.text))

    def metric_name(self) -> str:
        token = self.peek()
        if token.kind != "name" or token.text in _KEYWORDS:
            raise self.error("a metric name, e.g. train/reward")
        return self.take().text


def parse_gate(text: str) -> Gate:
    """The gate's parsed form; raises `GateSyntaxError` naming the gate, the position and what was expected."""
    return Gate(text, _Parser(text).gate())


# --------------------------------------------------------------------------------------------
# evaluation


class _NoValue(Exception):
    """An operand with nothing to read (a metric never logged, no record at a step); fails its comparison."""


def _as_number(value: Any, metric: str, step: Any) -> float:
    # MetricsLogger writes nan and inf as the strings "nan", "inf" and "-inf" (JSON has no such numbers).
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _NoValue(f"{metric} at step {step} is {value!r}, not a number")


def _series(records: Sequence[Mapping[str, Any]], metric: str) -> list[tuple[Any, float]]:
    """(step, value) of every record that has `metric`, in the order logged."""
    return [
        (record.get("step"), _as_number(record[metric], metric, record.get("step")))
        for record in records
        if metric in record
    ]


def _format(value: float) -> str:
    return f"{value:.6g}"


def _steps(count: int) -> str:
    return f"{count} step{'s' if count != 1 else ''}"


def _read(operand: Operand, records: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """The operand's value and how it was read ("" for a number); raises `_NoValue`."""
    if isinstance(operand, Number):
        return operand.value, ""
    series = _series(records, operand.metric)
    if isinstance(operand, AtStep):
        values = [value for step, value in series if step == operand.step]
        if not values:
            logged = f"logged at {_steps(len(series))}" if series else "never logged"
            raise _NoValue(f"{operand.metric} has no value at step {operand.step} ({logged})")
        if len(values) > 1:
            raise _NoValue(f"{operand.metric} was logged {len(values)} times at step {operand.step}")
        return values[0], f"{operand} = {_format(values[0])}"
    if not series and operand.function != "count":
        raise _NoValue(f"{operand.metric} was never logged ({len(records)} records)")
    value = FUNCTIONS[operand.function]([v for _, v in series])
    if operand.function == "count":
        return value, f"{operand} = {len(series)}"
    if operand.function in ("first", "last"):
        step = series[0][0] if operand.function == "first" else series[-1][0]
        return value, f"{operand} = {_format(value)} at step {step}"
    return value, f"{operand} = {_format(value)} over {_steps(len(series))}"


def _compare(comparison: Comparison, records: Sequence[Mapping[str, Any]]) -> tuple[bool, str]:
    try:
        left, left_read = _read(comparison.left, records)
        right, right_read = _read(comparison.right, records)
    except _NoValue as missing:
        return False, str(missing)
    read = ", ".join(text for text in (left_read, right_read) if text) or "no metric read"
    # Python's `nan != x` is True; a nan statistic means a diverged run and passes no gate.
    if math.isnan(left) or math.isnan(right):
        return False, f"{read} (nan fails every comparison)"
    return _COMPARISONS[comparison.operator](left, right), read


def _evaluate(condition: Condition, records: Sequence[Mapping[str, Any]]) -> tuple[bool, list[tuple[bool, str]]]:
    """Whether the condition holds, and each comparison's (passed, values read), all of them evaluated
    (no short-circuit) so that a report shows every value the gate depends on."""
    if isinstance(condition, Comparison):
        passed, read = _compare(condition, records)
        return passed, [(passed, read)]
    outcomes = [_evaluate(part, records) for part in condition.parts]
    combine = all if isinstance(condition, AllOf) else any
    return combine(passed for passed, _ in outcomes), [reading for _, readings in outcomes for reading in readings]


def evaluate_gate(gate: Gate, records: Sequence[Mapping[str, Any]]) -> GateResult:
    """Evaluate a gate over metrics records (dicts with a "step" key, as `read_metrics` returns them).

    A metric never logged, a step without a record, or a nan makes the comparison that reads it fail.
    """
    passed, readings = _evaluate(gate.condition, records)
    if len(readings) == 1:
        explanation = readings[0][1]
    else:  # a compound gate: say which comparisons failed
        explanation = "; ".join(read if ok else f"{read} [fails]" for ok, read in readings)
    return GateResult(gate.text, passed, explanation)


# --------------------------------------------------------------------------------------------
# posttrain check RUN_DIR


def _cannot_check(message: str) -> int:
    print(f"posttrain check: {message}", file=sys.stderr)
    return 2


def check_run(run_dir: str | Path, extra_gates: Sequence[str] = ()) -> int:
    """Evaluate the gates of RUN_DIR/config.yaml plus `extra_gates` on RUN_DIR/metrics.jsonl.

    Prints `PASS  <gate>   (<values>)` or `FAIL  ...` per gate to stdout. Returns 0 when every gate
    passes, 1 when one fails, 2 (with a message on stderr) when there is nothing to check: no
    metrics.jsonl, no gate at all, or a config or gate that does not load.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        return _cannot_check(f"{run_dir} has no metrics.jsonl (is it a run directory?)")
    config_path = run_dir / "config.yaml"
    try:
        config_gates = load_config(config_path, RecipeConfig).gates if config_path.is_file() else []
        gates = [parse_gate(text) for text in [*config_gates, *extra_gates]]
    except (ConfigError, GateSyntaxError) as error:
        return _cannot_check(str(error))
    if not gates:
        source = "sets no `gates:`" if config_path.is_file() else "does not exist"
        return _cannot_check(f"no gates to check: {config_path} {source} and none was given with --gate")
    try:
        records = read_metrics(run_dir)
    except json.JSONDecodeError as error:
        return _cannot_check(f"{run_dir / 'metrics.jsonl'} is not JSON lines: {error}")
    results = [evaluate_gate(gate, records) for gate in gates]
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.text}   ({result.explanation})")
    return 0 if all(result.passed for result in results) else 1
