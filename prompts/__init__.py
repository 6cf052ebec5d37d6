"""Per-modality prompt sets (AllSpark Table XVI), stored as YAML data beside this module.

``load_prompts(name, info)`` returns the list for a prompt set (a name such as ``hsi`` or the path of a
YAML file of the same form), with placeholders such as ``{categories}`` filled from the dataset's
``info()`` (``categories`` = its class names, comma-separated). The first prompt is the evaluation prompt.
"""
from __future__ import annotations

import difflib
import string
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_prompts", "load_answer_template", "list_prompt_sets", "PROMPT_DIR"]

PROMPT_DIR = Path(__file__).resolve().parent


def list_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _prompt_file(name: str) -> Path:
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PROMPT_DIR / f"{name}.yaml"
        if not path.is_file():
            known = list_prompt_sets()
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(f"unknown prompt set {name!r}{hint} Available: {', '.join(known)}")
    elif not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    return path


def load_answer_template(name: str) -> str:
    """The answer sentence of a prompt set (its ``answer`` field, e.g. ``'This remote sensing image shows
    {name}.'``): the target text of answer training, ``{name}`` filled with a class name. A set without one is a
    ``ValueError`` naming the file."""
    path = _prompt_file(name)
    data = yaml.safe_load(path.read_text()) or {}
    template = data.get("answer")
    if not isinstance(template, str) or _fields(template) != {"name"}:
        raise ValueError(f"{path}: answer training needs an 'answer' template with exactly one {{name}} field "
                         f"(e.g. answer: 'This image shows {{name}}.'), found {template!r}")
    return template


def load_prompts(name: str, info: dict[str, Any] | None = None) -> list[str]:
    path = _prompt_file(name)
    data = yaml.safe_load(path.read_text()) or {}
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ValueError(f"{path}: 'prompts' must be a non-empty list of strings")
    values = dict(info or {})
    if "class_names" in values and "categories" not in values:
        values["categories"] = ", ".join(str(c) for c in values["class_names"])
    filled = []
    for template in prompts:
        missing = _fields(template) - set(values)
        if missing:
            raise ValueError(
                f"prompt set {name!r} needs {sorted(missing)} from the dataset info, which has {sorted(values)}"
            )
        filled.append(template.format(**{k: values[k] for k in _fields(template)}))
    return filled
