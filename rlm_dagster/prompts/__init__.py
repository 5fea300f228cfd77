"""Prompt templates, one Markdown file each, rendered with ``$name`` placeholders.

    >>> "refund" in render("where_system.md", predicate="mentions a refund", answer_format="")
    True

``PROMPT_VERSION`` changes whenever a template changes; caches and asset code versions
include it so that a prompt edit is never served stale results.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from string import Template
from typing import Any

_NAMES = (
    "system.md",
    "where_system.md",
    "where_answer_json.md",
    "where_answer_tool.md",
    "final_answer.md",
    "nudge.md",
)


@cache
def template(name: str) -> Template:
    return Template(resources.files(__package__).joinpath(name).read_text(encoding="utf-8"))


def render(name: str, **values: Any) -> str:
    """Fill the template ``name``; a missing value is an error, not a silent blank."""
    return template(name).substitute(**values)


def _version() -> str:
    digest = hashlib.sha256()
    for name in _NAMES:
        digest.update(template(name).template.encode("utf-8"))
    return digest.hexdigest()[:12]


PROMPT_VERSION = _version()
