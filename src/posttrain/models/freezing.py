"""Freezing parts of the policy: its family's towers and fnmatch-style module-path patterns.

`apply_freeze_config` sets `requires_grad=False` on the parameters the config selects and returns
what it did. The towers come from the model's family (`ModelFamily.towers`: name -> parameter-name
prefixes of the multimodal model). A text-only model (a text-only load of a multimodal checkpoint,
or any generic causal LM) has no vision or audio tower: those flags are no-ops, reported in the
summary; its language model is the whole model, so freezing it leaves nothing to train. A config
that leaves no trainable parameter, or a pattern that matches nothing, is an error.

Tied weights are one parameter under two names (Gemma's `lm_head.weight` is the embedding
table): a pattern matching either name freezes both.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

import torch

from posttrain.config.schema import FreezeConfig
from posttrain.models.registry import family_for

# freeze flag -> the tower it freezes (keys of ModelFamily.towers)
TOWER_FLAGS = {
    "freeze_vision_tower": "vision_tower",
    "freeze_audio_tower": "audio_tower",
    "freeze_language_model": "language_model",
}


class FreezeConfigError(ValueError):
    """policy.freeze_config does not fit the model (a pattern matching nothing, nothing left to train)."""


@dataclass(frozen=True)
class FrozenSummary:
    frozen_parameters: int  # elements
    trainable_parameters: int  # elements
    frozen_groups: tuple[str, ...]  # "vision_tower", "pattern 'model.language_model.layers.0.*'", ...
    no_op_flags: tuple[str, ...]  # "freeze_audio_tower (Gemma4ForCausalLM has no audio_tower)", ...

    def describe(self) -> str:
        total = self.frozen_parameters + self.trainable_parameters
        line = f"parameters: {self.trainable_parameters:,} trainable, {self.frozen_parameters:,} frozen of {total:,}"
        if self.frozen_groups:
            line += f" (frozen: {', '.join(self.frozen_groups)})"
        if self.no_op_flags:
            line += f"; no-op: {', '.join(self.no_op_flags)}"
        return line


def _module_paths(name: str) -> list[str]:
    """'a.b.c.weight' -> ['a', 'a.b', 'a.b.c', 'a.b.c.weight']: the parameter and the modules holding it."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _tower_names(model: torch.nn.Module, tower: str, names: list[str]) -> list[str]:
    family = family_for(model.config)
    if not family.is_multimodal(model.config):
        # A text-only model is its language model; it has no other tower.
        return list(names) if tower == "language_model" else []
    prefixes = family.towers.get(tower, ())
    return [name for name in names if name.startswith(prefixes)] if prefixes else []


def _pattern_names(pattern: str, names: list[str]) -> list[str]:
    return [name for name in names if any(fnmatch.fnmatchcase(path, pattern) for path in _module_paths(name))]


def _no_match_error(pattern: str, model: torch.nn.Module, names: list[str]) -> FreezeConfigError:
    paths = sorted({path for name in names for path in _module_paths(name)})
    close = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.5)
    hint = f"closest module paths: {', '.join(close)}" if close else f"module paths look like {paths[-1]!r}"
    return FreezeConfigError(
        f"policy.freeze_config.patterns: {pattern!r} matches no parameter or module path of "
        f"{type(model).__name__}; {hint}"
    )


def apply_freeze_config(model: torch.nn.Module, cfg: FreezeConfig) -> FrozenSummary:
    """Set requires_grad=False on the parameters `cfg` selects; raise if nothing is left to train."""
    named = list(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    names = [name for name, _ in named]
    selected: set[str] = set()
    frozen_groups, no_op_flags = [], []
    for flag, tower in TOWER_FLAGS.items():
        if not getattr(cfg, flag):
            continue
        matched = _tower_names(model, tower, names)
        if matched:
            selected.update(matched)
            frozen_groups.append(tower)
        else:
            no_op_flags.append(f"{flag} ({type(model).__name__} has no {tower})")
    for pattern in cfg.patterns:
        matched = _pattern_names(pattern, names)
        if not matched:
            raise _no_match_error(pattern, model, names)
        selected.update(matched)
        frozen_groups.append(f"pattern {pattern!r}")

    frozen_ids = {id(param) for name, param in named if name in selected}
    unique = {id(param): param for _, param in named}
    if all(id(param) in frozen_ids or not param.requires_grad for param in unique.values()):
        raise FreezeConfigError(
            f"policy.freeze_config leaves no trainable parameter in {type(model).__name__} "
            f"(frozen: {', '.join(frozen_groups) or 'nothing'}); unfreeze something to train"
        )
    for param_id in frozen_ids:
        unique[param_id].requires_grad_(False)
    frozen = sum(p.numel() for p in unique.values() if not p.requires_grad)
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    return FrozenSummary(frozen, trainable, tuple(frozen_groups), tuple(no_op_flags))
