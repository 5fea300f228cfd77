"""Every Python snippet in the README runs as written, without an API key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"^(`{3,})python\n(.*?)^\1$", README.read_text(), re.S | re.M)


@pytest.mark.parametrize("code", [code for _, code in SNIPPETS], ids=range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    # dont_inherit: this module's `from __future__ import annotations` must not leak in
    exec(compile(code, str(README), "exec", dont_inherit=True), {"__name__": "readme_snippet"})


def test_the_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 5
