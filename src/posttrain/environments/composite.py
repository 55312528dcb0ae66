"""Rewards made of pieces: a regex format check, math-verify inside answer tags, weighted sums.

format: 1.0 if the whole response matches `pattern` (re.fullmatch, DOTALL: "." crosses
newlines), else 0.0; match="search" accepts a match anywhere instead. The default pattern,
THINK_ANSWER_PATTERN, is geometry3k's output format: one <think>...</think> block, then one
<answer>...</answer> block, nothing else but whitespace around them, and no think/answer tag
inside either block. Peers are more lenient: verl's geo3k format reward fullmatches
`<think>.*</think>.*\\boxed\\{.*\\}.*` (any text between and after); NeMo-RL's VLM `format_reward`
gives 0.25 for a <think>...</think> and 0.75 for an <answer>...</answer> found anywhere. A policy
whose generation prompt already opens <think> (some thinking chat templates do) never writes it
itself: give such a model its own pattern.

answer_math: math-verify (`posttrain.environments.math`, verifier "math_verify") of the content
of the LAST <answer>...</answer> (non-greedy, as reasoning-gym's `extract_answer`), stripped and
wrapped in \\boxed{...} unless it contains \\boxed: math-verify's default extraction reads bare
text only for numbers ("3\\sqrt{3}" unboxed is read as 3), boxed it parses LaTeX. No tags, or
an empty answer: 0.0 (a wrong answer, not a verifier error).

weighted: sum_c weight_c x reward_c over components built with `posttrain.environments.build`,
weights used as given (not renormalized; negative weights are penalties). Metrics: each
component's keys under env/<label>/..., env/scored = responses scored, and every other
top-level counter (env/verifier_errors, ...) summed over the components.

geometry3k: weighted 0.1 x format (THINK_ANSWER_PATTERN) + 0.9 x answer_math, as NeMo-RL's
geometry3k VLM recipe weights format and math_expr and verl's geo3k `format_score=0.1`: 1.0 for
a right answer in the right format, 0.9 right answer / bad format, 0.1 wrong answer / good format.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.environments.base import Environment, ScoringStats, score_each
from posttrain.environments.math import MathEnvironment

_BLOCK = r"(?:(?!</?(?:think|answer)>).)*"  # any text without a think/answer tag
THINK_ANSWER_PATTERN = rf"\s*<think>{_BLOCK}</think>\s*<answer>{_BLOCK}</answer>\s*"

MatchMode = Literal["fullmatch", "search"]


class FormatEnvironment:
    """Reward 1.0 if the response matches `pattern` (DOTALL), else 0.0."""

    overlaps_generation = True  # a regular expression (see Environment)

    def __init__(self, pattern: str = THINK_ANSWER_PATTERN, *, match: MatchMode = "fullmatch") -> None:
        if match not in ("fullmatch", "search"):
            raise ValueError(f"match must be 'fullmatch' or 'search', got {match!r}")
        try:
            regex = re.compile(pattern, re.DOTALL)
        except re.error as error:
            raise ValueError(f"format pattern {pattern!r} is not a valid regular expression: {error}") from None
        self.pattern = pattern
        self._matches = regex.fullmatch if match == "fullmatch" else regex.search
        self._stats = ScoringStats()

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        return score_each(self._score_one, prompts, responses, metadata, self._stats)

    def pop_metrics(self) -> dict[str, float]:
        return self._stats.pop()

    def _score_one(self, prompt: str, response: str, metadata: dict[str, Any]) -> float:
        return 1.0 if self._matches(response) else 0.0


def last_tagged(text: str, tag: str) -> str | None:
    """The stripped content of the last <tag>...</tag> in `text`, or None when there is none."""
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


class AnswerMathEnvironment:
    """Reward 1.0 if the last <tag>...</tag> holds an answer math-verify finds equal to the ground truth."""

    @property
    def overlaps_generation(self) -> bool:
        return self.math.overlaps_generation

    def __init__(
        self,
        tag: str = "answer",
        *,
        timeout_s: int | None = 5,
        num_workers: int = 0,
        call_timeout_s: float | None = None,
    ) -> None:
        """timeout_s, num_workers, call_timeout_s: as for `MathEnvironment`, which does the scoring."""
        if not re.fullmatch(r"[A-Za-z_][\w-]*", tag):
            raise ValueError(f"tag must be a tag name such as 'answer', got {tag!r}")
        self.tag = tag
        self.math = MathEnvironment(
            "math_verify", timeout_s=timeout_s, num_workers=num_workers, call_timeout_s=call_timeout_s
        )

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        answers = []
        for response in responses:
            answer = last_tagged(response, self.tag)
            if not answer:
                answers.append("")  # math-verify finds nothing in "": reward 0.0, no error
            else:
                answers.append(answer if "\\boxed" in answer else f"\\boxed{{{answer}}}")
        return self.math.score(prompts, answers, metadata)

    def pop_metrics(self) -> dict[str, float]:
        return self.math.pop_metrics()


@dataclass(frozen=True)
class ComponentSpec:
    """One checked entry of `weighted`'s components (nothing built yet)."""

    name: str
    weight: float
    options: dict[str, Any]
    label: str  # metrics go under env/<label>/


@dataclass(frozen=True)
class Component:
    label: str
    weight: float
    environment: Environment


_COMPONENT_KEYS = {"name", "weight", "options", "label"}


class WeightedEnvironment:
    """Reward = sum of weight x reward over component environments.

    components: a list of {name: <environment name>, weight: <finite number>, options: {...}
    (optional, the component's constructor options), label: <metrics prefix> (optional, default
    the name; labels must be unique)}.
    """

    def __init__(self, components: list[dict[str, Any]]) -> None:
        from posttrain.environments import build  # the registry imports this module

        self.components = []
        for index, spec in enumerate(check_components(components)):
            try:
                environment = build(spec.name, **spec.options)
            except Exception as error:  # keep its type (the CLI reports checkpoint errors without a traceback)
                error.add_note(f"while building weighted component {index} ({spec.name!r})")
                raise
            self.components.append(Component(spec.label, spec.weight, environment))
        self._scored = 0

    @property
    def overlaps_generation(self) -> bool:
        return all(getattr(c.environment, "overlaps_generation", False) for c in self.components)

    @staticmethod
    def check_options(components: list[dict[str, Any]]) -> None:
        """The constructor's checks, without building any component (cheap: no model loads)."""
        check_components(components)

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float]:
        totals = [0.0] * len(responses)
        for component in self.components:
            rewards = component.environment.score(prompts, responses, metadata)
            if len(rewards) != len(responses) or not all(math.isfinite(r) for r in rewards):
                raise ValueError(
                    f"component {component.label!r} must return one finite reward per response, got {rewards}"
                )
            totals = [total + component.weight * reward for total, reward in zip(totals, rewards, strict=True)]
        self._scored += len(responses)
        return totals

    def pop_metrics(self) -> dict[str, float]:
        metrics = {"env/scored": float(self._scored)}
        self._scored = 0
        for component in self.components:
            for key, value in component.environment.pop_metrics().items():
                name = key.removeprefix("env/")
                metrics[f"env/{component.label}/{name}"] = value
                if name != "scored" and "/" not in name:  # a component's own counter, not a nested one
                    metrics[f"env/{name}"] = metrics.get(f"env/{name}", 0.0) + value
        return metrics


def check_components(components: Any) -> list[ComponentSpec]:
    """`weighted`'s component specs, checked: every problem names the component.

    Checks keys, finite weights, unique labels, known names (did-you-mean) and, for built-ins,
    that the options fit the constructor's signature. What only the constructor can check (a
    regex, a checkpoint path, a custom import path, nested components) waits for `build`.
    """
    from posttrain.environments import builtin_environment  # the registry imports this module

    if not isinstance(components, list) or not components:
        raise ValueError(f"components must be a non-empty list of {{name, weight, options}}, got {components!r}")
    specs = []
    for index, spec in enumerate(components):
        where = f"weighted component {index}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a mapping {{name, weight, options}}, got {spec!r}")
        unknown, missing = spec.keys() - _COMPONENT_KEYS, {"name", "weight"} - spec.keys()
        if unknown or missing:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown, key=str)}, missing keys {sorted(missing)}; "
                f"keys are {sorted(_COMPONENT_KEYS)}"
            )
        name, weight = spec["name"], spec["weight"]
        if not isinstance(name, str):
            raise ValueError(f"{where}: name must be an environment name (a string), got {name!r}")
        where = f"{where} ({name!r})"
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"{where}: weight must be a finite number, got {weight!r}")
        options = spec["options"] if "options" in spec else {}
        if not isinstance(options, dict):
            raise ValueError(f"{where}: options must be a mapping, got {options!r}")
        label = spec["label"] if "label" in spec else name
        if not isinstance(label, str) or not re.fullmatch(r"[\w.-]+", label):
            raise ValueError(f"{where}: label must be a non-empty name without '/' or spaces, got {label!r}")
        if name == "custom":
            if "import_path" not in options:
                raise ValueError(f"{where}: a custom component needs options.import_path: 'package.module:ClassName'")
        else:
            try:
                signature = inspect.signature(builtin_environment(name))
            except ValueError as error:  # an unknown name, with a did-you-mean
                raise ValueError(f"{where}: {error}") from None
            try:
                signature.bind(**options)
            except TypeError as error:
                raise ValueError(f"{where}: options do not fit {signature}: {error}") from None
        specs.append(ComponentSpec(name, float(weight), options, label))
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"component labels must be unique, {duplicates} repeat: give them distinct `label`s")
    return specs


class Geometry3kEnvironment(WeightedEnvironment):
    """geometry3k: 0.1 x format (THINK_ANSWER_PATTERN) + 0.9 x answer_math."""

    def __init__(self, *, timeout_s: int | None = 5, num_workers: int = 0, call_timeout_s: float | None = None) -> None:
        """Options: answer_math's (math-verify's bounds and worker processes)."""
        math_options = {"timeout_s": timeout_s, "num_workers": num_workers, "call_timeout_s": call_timeout_s}
        super().__init__(
            [
                {"name": "format", "weight": 0.1},
                {"name": "answer_math", "weight": 0.9, "options": math_options},
            ]
        )
