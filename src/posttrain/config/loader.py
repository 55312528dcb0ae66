"""Recipe loading: YAML with `defaults:` inheritance, dotted overrides, readable errors.

A recipe is a YAML mapping. `load_recipe` turns a file, its bases and any `key.path=value`
overrides into one plain dict; `validate_config` turns that dict into the pydantic config and,
when it does not fit, raises a `ConfigError` listing every problem as `key.path: what is wrong`,
with a "did you mean" for misspelt keys. `dump_config` writes the resolved config back out (the
copy kept next to a run).

This module is generic over any pydantic model and imports neither torch nor the schema, so a
recipe is checked before anything heavy loads.

Merge rules (`defaults:` and overrides alike): mappings merge key by key, recursively, unless the
new mapping names another thing (a different `type` or `name`: another data source or dataset,
another environment), which replaces the base's; lists and scalars replace; an explicit `null`
replaces too.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, Discriminator, Tag, ValidationError
from pydantic.fields import FieldInfo

__all__ = [
    "ROOT_LOCATION",
    "ConfigError",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_recipe",
    "repeated_inherited_values",
    "validate_config",
]

ModelT = TypeVar("ModelT", bound=BaseModel)

ROOT_LOCATION = "<recipe>"
"""How errors name the recipe as a whole (for example a cross-field rule on the top model)."""

_DEFAULTS_KEY = "defaults"
_OVERRIDE_EXAMPLE = "grpo.num_prompts_per_step=64"
_NULL_SPELLINGS = frozenset({"null", "Null", "NULL", "~"})
_MAX_VALUE_CHARS = 60
_KEY_MARKER = "[key]"  # pydantic's last location item when a mapping's key (not its value) is invalid


class ConfigError(ValueError):
    """A recipe that cannot be loaded or does not fit the schema.

    The message is the whole report (possibly several lines): the recipe file when known, then
    each problem with its key path.
    """


# --------------------------------------------------------------------------------------------
# YAML reading


class _RecipeYamlLoader(yaml.SafeLoader):
    """SafeLoader with two fixes for recipes.

    Duplicate keys are errors (PyYAML silently keeps the last one, hiding a typo'd edit), and
    `1e-6` is a float: YAML 1.1, which PyYAML follows, only reads `1.0e-6` as one, so a learning
    rate written the usual way would otherwise arrive as a string.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    f"in the mapping starting at line {node.start_mark.line + 1}",
                    node.start_mark,
                    f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class _RecipeYamlDumper(yaml.SafeDumper):
    """SafeDumper whose output reads back as it was: it knows `1e-6` reads as a float (and quotes
    a string spelt like one), and writes the Unicode line breaks NEL, LS and PS escaped, which
    PyYAML would otherwise write raw into a quoted string where they read back as a space."""

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = '"' if any(ch in data for ch in "\x85\u2028\u2029") else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_RecipeYamlDumper.add_representer(str, _RecipeYamlDumper.represent_str)


for _yaml_class in (_RecipeYamlLoader, _RecipeYamlDumper):
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        context_mark = getattr(exc, "context_mark", None)
        if context and context_mark and "line" not in context:
            context = f"{context} started at line {context_mark.line + 1}"
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{source}: invalid YAML{where}: {detail}") from exc


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at line {line}); save the recipe as UTF-8") from None
    data = _parse_yaml(text, str(path))
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of keys to values, got {got}")
    return data


# --------------------------------------------------------------------------------------------
# defaults: inheritance


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over `base`: mappings merge recursively, anything else (lists, null) replaces.

    A mapping naming another thing than the base's (a different `type`: another member of a
    discriminated union, e.g. another kind of data source; or a different `name`: another
    dataset, another environment) replaces the base mapping instead of merging into it.
    """
    merged = {key: copy.deepcopy(value) for key, value in base.items()}
    for key, value in top.items():
        old = merged.get(key)
        if _merges(value, old):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merges(top: Any, base: Any) -> bool:
    """`top` merges into `base` (both mappings, naming the same thing) rather than replacing it."""
    if not (isinstance(top, Mapping) and isinstance(base, Mapping)):
        return False
    return all(top.get(key, base.get(key)) == base.get(key) for key in ("type", "name"))


def _base_paths(entry: Any, path: Path) -> list[Path]:
    """The files named by a recipe's `defaults:` value, relative to the recipe's directory."""
    if entry is None:
        return []
    entries = [entry] if isinstance(entry, str) else entry
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigError(
            f"{path}: `defaults` must be a file name or a list of file names "
            f"(e.g. `defaults: base.yaml`), got {_short(entry)}"
        )
    bases = []
    for name in entries:
        try:
            base = path.parent / Path(name).expanduser()  # an absolute name wins over the parent
        except RuntimeError as exc:  # `~user/...` for a user without a home directory
            raise ConfigError(f"{path}: `defaults` entry {name!r}: {exc}") from None
        if not base.is_file():
            raise ConfigError(f"{path}: `defaults` entry {name!r} not found (looked for {base})")
        bases.append(base)
    return bases


def _load_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """One recipe merged over its bases; `chain` holds the files that led here."""
    resolved = path.resolve()
    seen = [p.resolve() for p in chain]
    if resolved in seen:
        loop = " -> ".join(str(p) for p in (*chain[seen.index(resolved) :], path))
        raise ConfigError(f"{chain[-1]}: `defaults` form a cycle: {loop}")
    data = _read_mapping(path)
    merged: dict[str, Any] = {}
    for base in _base_paths(data.pop(_DEFAULTS_KEY, None), path):
        merged = _deep_merge(merged, _load_tree(base, (*chain, path)))
    return _deep_merge(merged, data)


def repeated_inherited_values(path: str | Path) -> list[str]:
    """Settings a recipe states although its `defaults:` already give them the same value (a
    recipe that inherits states only what differs), as `key.path: value (inherited)` lines.
    A mapping that replaces its base's (another `type` or `name`) counts as repeated only when equal."""
    path = Path(path)
    data = _read_mapping(path)
    inherited: dict[str, Any] = {}
    for base in _base_paths(data.pop(_DEFAULTS_KEY, None), path):
        inherited = _deep_merge(inherited, _load_tree(base, (path,)))
    return _repeated(data, inherited, prefix="")


def _repeated(mine: Mapping[str, Any], inherited: Mapping[str, Any], *, prefix: str) -> list[str]:
    found = []
    for key, value in mine.items():
        if key not in inherited:
            continue
        old, dotted = inherited[key], f"{prefix}{key}"
        if _merges(value, old):
            found += _repeated(value, old, prefix=f"{dotted}.")
        elif value == old:
            found.append(f"{dotted}: {_short(value)} (inherited)")
    return found


# --------------------------------------------------------------------------------------------
# overrides


def _parse_override(text: str, prefix: str) -> tuple[list[str], Any]:
    key, sep, value_text = text.partition("=")
    key = key.strip()
    form = f"expected key.path=value, e.g. {_OVERRIDE_EXAMPLE}"
    if not sep:
        raise ConfigError(f"{prefix}override {text!r} has no '=': {form}")
    if not key:
        raise ConfigError(f"{prefix}override {text!r} has an empty key: {form}")
    parts = [part.strip() for part in key.split(".")]
    if not all(parts):
        raise ConfigError(f"{prefix}override {text!r} has an empty segment in {key!r}: {form}")
    value_text = value_text.strip()
    if not value_text:
        return parts, ""
    quote_hint = f"quote it to pass a string, e.g. {key}='{value_text}'"
    try:
        value = yaml.load(value_text, Loader=_RecipeYamlLoader)  # noqa: S506 - SafeLoader
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{prefix}override {text!r}: value is not valid YAML ({problem}); {quote_hint}"
        ) from exc
    if value is None and value_text not in _NULL_SPELLINGS:
        # e.g. `key=#abc` reads as a YAML comment: an accidental null, not an intended one.
        raise ConfigError(f"{prefix}override {text!r}: value reads as YAML null; {quote_hint}")
    return parts, value


def apply_overrides(
    raw: dict[str, Any], overrides: Sequence[str], *, source: str | Path | None = None
) -> dict[str, Any]:
    """Set each `a.b.c=value` in a copy of `raw`; values are parsed as YAML.

    An override may create keys (the schema then rejects unknown ones); descending into a section
    that is `null` turns it into a mapping, descending into any other non-mapping is an error.
    `a.b=` sets the empty string; `a.b=null` sets null.
    """
    prefix = f"{source}: " if source is not None else ""
    result = copy.deepcopy(raw)
    for text in overrides:
        parts, value = _parse_override(text, prefix)
        node = result
        for depth, part in enumerate(parts[:-1], start=1):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"{prefix}override {text!r}: cannot set {'.'.join(parts)} because "
                    f"{'.'.join(parts[:depth])} is {_short(child)}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return result


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe, merge it over its `defaults:` bases, then apply dotted overrides.

    Bases are loaded recursively, in the order listed, each merged over the previous one, and
    the file itself merged last. The `defaults` key does not appear in the result.
    """
    path = Path(path)
    return apply_overrides(_load_tree(path, ()), overrides, source=path)


# --------------------------------------------------------------------------------------------
# validation and its error messages


def validate_config(
    raw: Mapping[str, Any], model: type[ModelT], *, source: str | Path | None = None
) -> ModelT:
    """`model.model_validate(raw)`, with pydantic's errors rewritten as one `ConfigError`.

    `source` (the recipe file) starts the message when given.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, model, raw, source)) from exc


def load_config(
    path: str | Path, model: type[ModelT], overrides: Sequence[str] = ()
) -> ModelT:
    """`load_recipe` then `validate_config`, errors naming the recipe file."""
    return validate_config(load_recipe(path, overrides), model, source=path)


def dump_config(cfg: BaseModel) -> str:
    """The config as YAML, keys in field order; loading it back gives the same config."""
    data = cfg.model_dump(mode="json", by_alias=True)
    return yaml.dump(data, Dumper=_RecipeYamlDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _format_validation_error(
    exc: ValidationError, model: type[BaseModel], raw: Any, source: str | Path | None
) -> str:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        line = _describe_error(error, model, raw)
        if line not in lines:  # members of a plain union can report the same problem twice
            lines.append(line)
    head = f"{source}: " if source is not None else ""
    count = f"{len(lines)} problem{'s' if len(lines) != 1 else ''}"
    return f"{head}invalid recipe ({count}):\n" + "\n".join(f"  {line}" for line in lines)


def _describe_error(error: Any, model: type[BaseModel], raw: Any) -> str:
    path, sibling_keys, node = _locate(tuple(error["loc"]), model, raw)
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        if "." in key and key.split(".", 1)[0] in (sibling_keys or ()):
            return f"{path}: unknown key; a dotted path is for command-line overrides, in YAML nest it: {_nested(key)}"
        return f"{path}: unknown key{_key_hint(key, sibling_keys)}"
    if kind == "missing":
        return f"{path}: required key missing"
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"][-1:] == (_KEY_MARKER,):  # a mapping key of the wrong type (e.g. `1:` in a dict[str, ...])
        return f"{path}: invalid key: {message} (got {_short(value)})"
    if kind in ("value_error", "assertion_error") and isinstance(value, Mapping):
        return f"{path}: {message}"  # a model_validator: the input is the whole section
    if kind == "union_tag_invalid" and isinstance(ctx.get("tag"), str):  # pydantic's message holds the tag raw
        hint = _choice_hint(ctx["tag"], ctx.get("expected_tags", ""))
        return f"{path}: unknown {ctx.get('discriminator', 'type')} {_short(ctx['tag'])}; expected one of {ctx.get('expected_tags')}{hint}"
    if kind == "union_tag_not_found":
        tags = sorted(_union_tags(node))
        choices = f": one of {', '.join(map(repr, tags))}" if tags else ""
        return f"{path}: needs a {ctx.get('discriminator', 'type')} key that says which kind of section it is{choices}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: must be a mapping of keys to values (got {_short(value)})"
    hint = ""
    if kind == "literal_error" and isinstance(value, str):
        hint = _choice_hint(value, ctx.get("expected", ""))
    return f"{path}: {message} (got {_short(value)}){hint}"


def _nested(dotted: str) -> str:
    """`a.b.c` as YAML flow mappings: `a: {b: {c: ...}}`."""
    head, *rest = dotted.split(".")
    return f"{head}: " + "".join(f"{{{part}: " for part in rest) + "..." + "}" * len(rest)


def _key_hint(key: str, valid: list[str] | None) -> str:
    if not valid:
        return ""
    same_but_case = [name for name in valid if name.lower() == key.lower()]
    close = same_but_case or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys here: {', '.join(valid)}"


def _choice_hint(given: str, expected: str) -> str:
    """`expected` is pydantic's rendering of the allowed values, e.g. "'token' or 'sequence'"."""
    close = difflib.get_close_matches(given, re.findall(r"'([^']*)'", expected), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _short(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


# --- walking a pydantic error location through the model classes ---------------------------


@dataclass(frozen=True)
class _Node:
    """Where the walk stands: the annotation expected there and the raw data given there."""

    annotation: Any
    raw: Any
    discriminator: str | None = None


def _locate(loc: tuple[Any, ...], model: type[BaseModel], raw: Any) -> tuple[str, list[str] | None, _Node]:
    """Display path of a pydantic error location, the valid keys where it ends, and the node there.

    pydantic puts union member tags (`'math'`, `'MyModel'`, `'list[int]'`) into locations; the
    walk follows the annotations and the raw data to drop them, so paths read as recipe keys.
    """
    parts: list[str] = []
    node = _Node(model, raw)
    keys_here: list[str] | None = None
    index = 0
    while index < len(loc):
        item = loc[index]
        node = _unwrap(node)
        members = _union_members(node.annotation)
        if members:
            member, consumed = _pick_member(members, item, node)
            if member is not None:
                node = _Node(member, node.raw)
                index += consumed
                continue
            # pydantic tags every member of a union in the location, so an unmatched item is a
            # tag too (e.g. 'list[int]'): skip it and go on with the keys of all members.
            node = _Node(tuple(members), node.raw)
            index += 1
            continue
        if item == _KEY_MARKER and index == len(loc) - 1:
            break  # the key itself is the problem: the path ends at it
        keys_here = _keys_of(node.annotation)
        # An int is a list index, or an integer key of a mapping (`0:` in YAML).
        parts.append(f"[{item}]" if isinstance(item, int) and not isinstance(node.raw, Mapping) else f".{_key_text(item)}")
        node = _child(node, item)
        index += 1
    return "".join(parts).lstrip(".") or ROOT_LOCATION, keys_here, node


def _union_tags(node: _Node) -> set[str]:
    """The discriminator values of a discriminated union of models (e.g. a data source's types)."""
    node = _unwrap(node)
    tags: set[str] = set()
    for member in _union_members(node.annotation):
        tags |= {name for name in _member_names(member, node.discriminator) if isinstance(name, str)}
        if isinstance(member, type):
            tags.discard(member.__name__)
    return tags


def _key_text(key: Any) -> str:
    """A key as the path shows it: quoted when it would not read as one key (empty, dots, spaces, control characters)."""
    text = str(key)
    return text if text and text.isprintable() and text.strip() == text and "." not in text else repr(text)


def _unwrap(node: _Node) -> _Node:
    """Strip `Annotated[...]` (keeping a discriminator) and the `None` of `Optional[...]`."""
    annotation, discriminator = node.annotation, node.discriminator
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation, *metadata = typing.get_args(annotation)
            for meta in metadata:
                found = _discriminator_name(meta)
                discriminator = found or discriminator
            continue
        if _is_union(annotation):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return _Node(annotation, node.raw, discriminator)


def _discriminator_name(meta: Any) -> str | None:
    found = meta.discriminator if isinstance(meta, FieldInfo | Discriminator) else None
    if isinstance(found, Discriminator):
        found = found.discriminator
    return found if isinstance(found, str) else None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _union_members(annotation: Any) -> list[Any]:
    if not _is_union(annotation):
        return []
    return [a for a in typing.get_args(annotation) if a is not type(None)]


def _member_names(member: Any, discriminator: str | None) -> set[Any]:
    """What pydantic may call a union member in a location: tag, discriminator value, class."""
    names: set[Any] = set()
    if typing.get_origin(member) is typing.Annotated:
        member, *metadata = typing.get_args(member)
        names |= {meta.tag for meta in metadata if isinstance(meta, Tag)}
    if isinstance(member, type) and issubclass(member, BaseModel):
        names.add(member.__name__)
        field = member.model_fields.get(discriminator) if discriminator else None
        if field is not None and typing.get_origin(field.annotation) is typing.Literal:
            names |= set(typing.get_args(field.annotation))
    return names


def _pick_member(members: list[Any], item: Any, node: _Node) -> tuple[Any, int]:
    """(member, 1) when `item` is a member's tag; (member, 0) when the raw data's
    discriminator value picks it; (None, 0) when neither does."""
    for member in members:
        if isinstance(item, str) and item in _member_names(member, node.discriminator):
            return member, 1
    if node.discriminator and isinstance(node.raw, dict):
        tag = node.raw.get(node.discriminator)
        for member in members:
            if isinstance(tag, str) and tag in _member_names(member, node.discriminator):
                return member, 0
    return None, 0


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    candidates = annotation if isinstance(annotation, tuple) else (annotation,)
    models = []
    for candidate in candidates:
        candidate = _unwrap(_Node(candidate, None)).annotation
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            models.append(candidate)
    return models


def _field_keys(field_name: str, field: FieldInfo) -> list[str]:
    keys = [field_name]
    for alias in (field.alias, field.validation_alias):
        if isinstance(alias, str) and alias not in keys:
            keys.append(alias)
    return keys


def _keys_of(annotation: Any) -> list[str] | None:
    """Valid keys of the model (or union of models) expected here; None when not a model."""
    models = _models_in(annotation)
    if not models:
        return None
    keys: list[str] = []
    for model in models:
        for name, field in model.model_fields.items():
            keys += [key for key in _field_keys(name, field) if key not in keys]
    return keys


def _child(node: _Node, item: Any) -> _Node:
    """The annotation and raw data one step down, at key or index `item`."""
    raw = node.raw
    if isinstance(raw, dict):
        raw_child = raw.get(item)
    elif isinstance(raw, list) and isinstance(item, int) and -len(raw) <= item < len(raw):
        raw_child = raw[item]
    else:
        raw_child = None
    for model in _models_in(node.annotation):
        for name, field in model.model_fields.items():
            if item in _field_keys(name, field):
                return _Node(field.annotation, raw_child, _discriminator_name(field))
    annotation = node.annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (dict, Mapping) and len(args) == 2:
        return _Node(args[1], raw_child)
    if origin in (list, set, frozenset, Sequence) and args:
        return _Node(args[0], raw_child)
    if origin is tuple and args and isinstance(item, int):
        return _Node(args[0] if args[-1] is Ellipsis else args[min(item, len(args) - 1)], raw_child)
    return _Node(None, raw_child)
