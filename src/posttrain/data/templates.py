"""Prompt templates: the text around each problem before the model's chat template.

A template is plain text with one placeholder, `{prompt}`, which is replaced by the sample's
prompt; every other character is literal (no format-string escaping: `\\boxed{}` is written as
is). Templates come inline (`data.prompt_template`) or from a file (`data.prompt_template_file`):
a built-in name, i.e. a file shipped in `posttrain/recipes/prompts/`, or a path to a UTF-8 text
file. One trailing newline of a file, which editors add, is not part of the template.

This module imports no heavy library: the recipe schema uses it at load time.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from posttrain.data.sources import DataError

PLACEHOLDER = "{prompt}"


class TemplateError(DataError):
    """A prompt template that cannot be found or has no {prompt} placeholder."""


def builtin_templates() -> dict[str, str]:
    """Built-in template name -> text, from the .txt files in posttrain/recipes/prompts/."""
    folder = resources.files("posttrain") / "recipes" / "prompts"
    return {
        entry.name.removesuffix(".txt"): _strip_final_newline(entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".txt")
    }


def is_template_path(value: str) -> bool:
    """A `prompt_template_file` value names a file when it has a "/" or ends in .txt; otherwise it
    is a built-in name."""
    return "/" in value or value.endswith(".txt")


def check_builtin_name(value: str) -> None:
    """Raise TemplateError (with a did-you-mean) when `value` is neither a path nor a built-in name."""
    if is_template_path(value):
        return
    names = sorted(builtin_templates())
    if value not in names:
        close = difflib.get_close_matches(value, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TemplateError(
            f"unknown built-in prompt template {value!r}; {hint}built-ins: {names} (a file path must contain "
            "'/' or end in .txt)"
        )


def load_template(value: str) -> str:
    """The template a `prompt_template_file` value names: a built-in, or a file (relative paths are
    resolved against the current working directory)."""
    if is_template_path(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise TemplateError(
                f"prompt template file not found: {value!r} (looked for {path.resolve()}; relative paths are "
                f"resolved against the current working directory {Path.cwd()})"
            )
        text, source = _strip_final_newline(path.read_text(encoding="utf-8")), str(path)
    else:
        check_builtin_name(value)
        text, source = builtin_templates()[value], f"built-in template {value!r}"
    if PLACEHOLDER not in text:
        raise TemplateError(f"{source} has no {PLACEHOLDER} placeholder")
    return text


def resolve_template(prompt_template: str, prompt_template_file: str | None) -> str:
    """The template a run uses: the file's when `prompt_template_file` is set, else the inline one."""
    return load_template(prompt_template_file) if prompt_template_file is not None else prompt_template


def render(template: str, prompt: str) -> str:
    """The template with every {prompt} replaced by `prompt` (the user message, before the chat template)."""
    return template.replace(PLACEHOLDER, prompt)


def _strip_final_newline(text: str) -> str:
    return text.removesuffix("\n").removesuffix("\r")
