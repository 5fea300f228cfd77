"""Prompt templates, one Markdown file each, rendered with ``$name`` placeholders.

    >>> "refund" in render("where_system.md", predicate="mentions a refund", answer_format="")
    True

Every text the models read (root, sub and ``llm_where`` prompts, notes, status lines) is a
file here; ``PROMPT_VERSION`` covers every file and changes whenever one changes; caches and asset code versions
include it so that a prompt edit is never served stale results.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from string import Template
from typing import Any


@cache
def template(name: str) -> Template:
    return Template(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


def render(name: str, **values: Any) -> str:
    """Fill the template ``name``; a missing value is an error, not a silent blank."""
    return template(name).substitute(**values)


def snippet(name: str, **values: Any) -> str:
    """A one-part template (a note, a heading, a status line) filled, without its
    surrounding blank lines: the caller joins the parts."""
    return render(name, **values).strip("\n")


def names() -> list[str]:
    """Every template in this folder: all text the model reads comes from one of them."""
    folder = resources.files(__package__)
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".md"))


def _version() -> str:
    digest = hashlib.sha256()
    for name in names():
        digest.update(name.encode("utf-8") + b"\0" + template(name).template.encode("utf-8"))
    return digest.hexdigest()[:12]


PROMPT_VERSION = _version()
