"""Code-block extraction, text-level FINAL forms and observation truncation."""

from __future__ import annotations

import pytest

from rlm_dagster.engine.loop import extract_code_blocks, find_text_final, truncate


def test_blocks_tagged_repl_python_or_py_in_order() -> None:
    text = (
        "First.\n```repl\na = 1\n```\nthen\n```python\nb = 2\n```\n"
        "```py\nc = 3\n```\n```sql\nSELECT 1\n```\n```\nuntagged\n```\n"
    )
    assert extract_code_blocks(text) == ["a = 1\n", "b = 2\n", "c = 3\n"]


def test_block_keeps_inner_backticks_and_indentation() -> None:
    text = "```repl\nfor i in range(2):\n    print(f'`{i}`')\n```"
    assert extract_code_blocks(text) == ["for i in range(2):\n    print(f'`{i}`')\n"]


def test_unclosed_block_is_not_run() -> None:
    assert extract_code_blocks("```repl\nprint(1)\n") == []


def test_no_blocks() -> None:
    assert extract_code_blocks("I think the answer is 4.") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Done.\nFINAL(42 tickets mention refunds)", ("FINAL", "42 tickets mention refunds")),
        ("FINAL('quoted answer')", ("FINAL", "quoted answer")),
        ('FINAL("double quoted")', ("FINAL", "double quoted")),
        (
            "FINAL(multi\nline (with parens) answer)\n",
            ("FINAL", "multi\nline (with parens) answer"),
        ),
        ("Result in var.\nFINAL_VAR(result)", ("FINAL_VAR", "result")),
        ("FINAL_VAR('result_df')", ("FINAL_VAR", "result_df")),
        ("  FINAL_VAR( summary )", ("FINAL_VAR", "summary")),
    ],
)
def test_text_final_forms(text: str, expected: tuple[str, str]) -> None:
    assert find_text_final(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "```repl\nFINAL(x)\n```",  # FINAL inside code runs as code, not as text
        "I will call FINAL(x) once I have the numbers.",  # mid-sentence mention
        "No final here.",
    ],
)
def test_not_a_text_final(text: str) -> None:
    assert find_text_final(text) is None


def test_final_var_wins_over_final_when_both_present() -> None:
    assert find_text_final("FINAL_VAR(x)\nFINAL(y)") == ("FINAL_VAR", "x")


def test_truncate_short_text_unchanged() -> None:
    assert truncate("hello", 10) == "hello"


def test_truncate_says_how_much_was_hidden() -> None:
    out = truncate("x" * 50_000, 1_000)
    assert out.startswith("x" * 1_000) and "x" * 1_001 not in out
    assert "[output truncated: 49,000 more characters not shown" in out


def test_truncate_counts_characters_dropped_in_the_worker() -> None:
    out = truncate("abc", 10, dropped=5_000)
    assert out.startswith("abc\n") and "5,000 more characters" in out
