"""Environments: score responses to prompts (see `base.Environment`).

Built-ins are listed in `BUILTIN_ENVIRONMENTS`; `build("custom", import_path="pkg.module:Class",
**kwargs)` instantiates a user class that implements the same two methods. Importing this package
is cheap: math-verify and reasoning-gym are imported on first use.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from posttrain.environments.base import Environment, ScoringStats, score_each, scoring_metadata
from posttrain.environments.composite import (
    AnswerMathEnvironment,
    FormatEnvironment,
    Geometry3kEnvironment,
    WeightedEnvironment,
)
from posttrain.environments.math import MathEnvironment
from posttrain.environments.reasoning_gym import ReasoningGymEnvironment
from posttrain.environments.reward_model import RewardModelEnvironment

BUILTIN_ENVIRONMENTS: dict[str, type] = {
    "math": MathEnvironment,
    "reasoning_gym": ReasoningGymEnvironment,
    "reward_model": RewardModelEnvironment,
    "format": FormatEnvironment,
    "answer_math": AnswerMathEnvironment,
    "weighted": WeightedEnvironment,
    "geometry3k": Geometry3kEnvironment,
}

__all__ = [
    "BUILTIN_ENVIRONMENTS",
    "AnswerMathEnvironment",
    "Environment",
    "FormatEnvironment",
    "Geometry3kEnvironment",
    "MathEnvironment",
    "ReasoningGymEnvironment",
    "RewardModelEnvironment",
    "ScoringStats",
    "build",
    "builtin_environment",
    "score_each",
    "scoring_metadata",
    "WeightedEnvironment",
]


def build(name: str, **options: Any) -> Environment:
    """The environment called `name`, constructed with `options`.

    name="custom" needs option import_path="pkg.module:ClassName"; the other options go to
    that class's constructor.
    """
    if name == "custom":
        if "import_path" not in options:
            raise ValueError("environment 'custom' needs option import_path='pkg.module:ClassName'")
        import_path = options.pop("import_path")
        environment = _import_class(import_path)(**options)
        if not isinstance(environment, Environment):
            raise TypeError(
                f"{import_path} must define score(prompts, responses, metadata) and pop_metrics()"
            )
        return environment
    return builtin_environment(name)(**options)


def builtin_environment(name: str) -> type:
    """The built-in environment class called `name`; an unknown name gets a did-you-mean."""
    if name not in BUILTIN_ENVIRONMENTS:
        choices = [*BUILTIN_ENVIRONMENTS, "custom"]
        close = difflib.get_close_matches(name, choices, n=1)
        suggestion = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown environment {name!r}; {suggestion}choose one of {choices}")
    return BUILTIN_ENVIRONMENTS[name]


def _import_class(import_path: str) -> type:
    module_name, _, class_name = import_path.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"import_path must look like 'pkg.module:ClassName', got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"cannot import module {module_name!r} from import_path {import_path!r}: {error}"
        ) from error
    if not hasattr(module, class_name):
        raise ValueError(
            f"module {module_name!r} has no attribute {class_name!r} (import_path {import_path!r})"
        )
    return getattr(module, class_name)
