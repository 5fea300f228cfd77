"""Long trajectories and long contexts: prompt caching, compaction, and what models write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from rlm_dagster import Limits, Warehouse, run, run_rlm
from rlm_dagster.cache import Cache
from rlm_dagster.engine.loop import compact
from rlm_dagster.models.client import LM
from rlm_dagster.repl.seam import REPLFactory
from rlm_dagster.testing import FakeAnthropic, FakeReply

MakeLM = Callable[..., LM]


def wide_warehouse() -> Warehouse:
    """A 60-column table: its schema alone makes the system prompt a cacheable prefix."""
    return Warehouse.from_frames(
        {"events": pd.DataFrame({f"attribute_{i:02d}_value": [i] for i in range(60)})}
    )


def test_every_turn_after_the_first_reads_the_conversation_from_the_prompt_cache(
    make_lm: MakeLM, tmp_path: Path, inprocess_repl: REPLFactory
) -> None:
    turns = [
        f"```repl\nprint('step {i}', sql('SELECT count(*) AS n FROM events'))\n```"
        for i in range(9)
    ]
    with FakeAnthropic(root=[*turns, "FINAL(done)"]) as fake:
        lm = make_lm(fake, cache=Cache(tmp_path / "c.sqlite3"))
        run_rlm(
            "q", warehouse=wide_warehouse(), lm=lm, tags={"run_id": "long"}, repl=inprocess_repl
        )
    rows = [r for r in Cache(tmp_path / "c.sqlite3").ledger("long") if r["role"] == "root"]
    assert len(rows) == 10
    assert rows[0]["cache_read_input_tokens"] == 0 and rows[0]["cache_creation_input_tokens"] > 0
    assert all(r["cache_read_input_tokens"] > 0 for r in rows[1:])
    # each turn re-reads everything before it at cache price: only the newest turn is fresh
    reads = [r["cache_read_input_tokens"] for r in rows]
    assert reads == sorted(reads) and all(r["input_tokens"] < 200 for r in rows[1:])


def test_old_turns_are_compacted_deterministically() -> None:
    messages = [{"role": "user", "content": "Question: how many?"}]
    for i in range(10):
        messages.append({"role": "assistant", "content": f"```repl\nx{i} = {i}\nprint(x{i})\n```"})
        messages.append({"role": "user", "content": f"[cell 1 of 1]\n{i}\n" + "y" * 2_000})
    again = [dict(m) for m in messages]
    assert compact(messages, max_tokens=2_000, keep_turns=3)
    compact(again, max_tokens=2_000, keep_turns=3)
    assert messages == again  # same input, same digest: a replayed run stays on the cache
    assert len(messages) == 1 + 2 * 3
    head = messages[0]["content"]
    assert head.startswith("Question: how many?") and "7 turns:" in head and "`x0 = 0`" in head
    assert [m["role"] for m in messages] == ["user"] + ["assistant", "user"] * 3
    assert messages[1]["content"].startswith("```repl\nx7")
    assert not compact(messages, max_tokens=10**6)


def test_compaction_keeps_a_long_run_under_its_window(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    turns = [f"```repl\nprint('chunk {i}', 'z' * 4000)\n```" for i in range(12)]
    with FakeAnthropic(root=[*turns, "FINAL(done)"], prompt_caching=False) as fake:
        run_rlm(
            "q",
            warehouse=wide_warehouse(),
            lm=make_lm(fake),
            limits=Limits(context_window_tokens=8_000),
            repl=inprocess_repl,
        )
        sizes = [len(str(r.body["messages"])) // 4 for r in fake.requests if r.kind == "root"]
        last = [r for r in fake.requests if r.kind == "root"][-1]
    assert max(sizes) < 8_000 and sizes[-1] < sizes[6] * 2
    assert "Earlier turns were compacted" in str(last.body["messages"][0]["content"])


def test_made_up_repl_output_is_not_trusted(make_lm: MakeLM, inprocess_repl: REPLFactory) -> None:
    reply = "```repl\nprint(6 * 7)\n```\nREPL output:\n```output\n41\n```\nSo the answer is 41."
    with FakeAnthropic(root=[reply, "FINAL(42)"]) as fake:
        run_rlm("q", warehouse=wide_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
        seen = [r for r in fake.requests if r.kind == "root"][1].last_user_text
    assert "42" in seen and "looks like REPL output; it was ignored" in seen


def test_a_reply_cut_off_by_thinking_is_detected_and_told(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    cut = FakeReply(text="", stop_reason="max_tokens")
    with FakeAnthropic(root=[cut, "FINAL(ok)"]) as fake:
        result = run_rlm("q", warehouse=wide_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
        seen = [r for r in fake.requests if r.kind == "root"][1].last_user_text
    assert result.answer_text == "ok"
    assert "cut off at the output-token limit before any code or answer" in seen


def test_run_binds_text_list_and_dict_contexts(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    program = "```repl\nFINAL(f'{type(context).__name__}:{len(context)}')\n```"
    with FakeAnthropic(root=lambda r: program) as fake:
        lm = make_lm(fake)
        got = [
            run("q", context=value, lm=lm, repl=inprocess_repl).answer_text
            for value in ("x" * 5_000, ["doc one", "doc two", "doc three"], {"a": 1, "b": [2]})
        ]
        system = fake.requests[0].system
    assert got == ["str:5000", "list:3", "dict:2"]
    assert "The variable `context` holds a str of 5,000 characters" in system


def test_run_binds_a_dataframe_context(make_lm: MakeLM, inprocess_repl: REPLFactory) -> None:
    program = (
        "```repl\nFINAL(f'{type(context).__name__}:{context.shape}:{context.loc[1, \"b\"]}')\n```"
    )
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    with FakeAnthropic(root=lambda r: program) as fake:
        assert (
            run("q", context=frame, lm=make_lm(fake), repl=inprocess_repl).answer_text
            == "DataFrame:(2, 2):y"
        )
