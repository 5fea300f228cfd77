"""Every text the models read is a template file, and PROMPT_VERSION covers all of them."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

import pytest

from rlm_dagster import prompts

PACKAGE = Path(prompts.__file__).resolve().parents[1]


def test_every_template_file_is_versioned_and_used() -> None:
    files = sorted(p.name for p in Path(prompts.__file__).parent.glob("*.md"))
    assert prompts.names() == files
    code = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    unused = [name for name in files if f'"{name}"' not in code]
    assert not unused, f"templates no code renders: {unused}"


def test_prompt_version_changes_with_any_template(monkeypatch: pytest.MonkeyPatch) -> None:
    before = prompts._version()
    real = prompts.template
    for name in prompts.names():

        def edited(n: str, target: str = name) -> Template:
            text = real(n).template
            return Template(text + " " if n == target else text)

        monkeypatch.setattr(prompts, "template", edited)
        assert prompts._version() != before, name
        monkeypatch.undo()
    assert prompts._version() == before


def test_rendering_refuses_a_missing_value() -> None:
    with pytest.raises(KeyError):
        prompts.render("first_turn.md", question="q")
    assert prompts.snippet("turn_status.md", next=2, max_iterations=5, left=3) == (
        "Turn 2 of 5 (3 left)."
    )
    assert not re.search(r"^\s|\s$", prompts.snippet("nudge.md"))
