"""Recursive RLMs: rlm_query at depth 2 and 3, shared budgets, call trees, the paper's programs."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
from dagster_duckdb import DuckDBResource

from rlm_dagster import BudgetExceeded, Limits, RLMResource, rlm_asset, run
from rlm_dagster.cache import Cache
from rlm_dagster.errors import QueryError
from rlm_dagster.models.client import LM
from rlm_dagster.testing import FakeAnthropic, FakeReply, FakeRequest

MakeLM = Callable[..., LM]

# A long context: 40 sections, some with needles; each section states its own needle count.
SECTIONS = [
    f"## Section {i}\n" + " ".join("needle" if (i * 7 + j) % 11 == 0 else "hay" for j in range(60))
    for i in range(40)
]
BOOK = "\n".join(SECTIONS)
NEEDLES = BOOK.count("needle")


def question_of(request: FakeRequest) -> str:
    first = request.body["messages"][0]["content"]
    return first if isinstance(first, str) else first[0]["text"]


def turn_of(request: FakeRequest) -> int:
    return sum(1 for m in request.body["messages"] if m["role"] == "assistant")


def count_needles(request: FakeRequest) -> str:
    """The fake sub-model: counts the needles in the text it was given."""
    return str(request.prompt.split("\n", 1)[-1].count("needle"))


def code(src: str) -> str:
    return f"```repl\n{src}\n```"


# Each level halves its context and asks one level down; the deepest level asks llm_query.
RECURSIVE = [
    code(
        "half = len(context) // 2\n"
        "parts = rlm_query_batched(['Count the needles.', 'Count the needles.'],"
        " contexts=[context[:half], context[half:]])\n"
        "print(parts)"
    ),
    code("total = sum(int(p) for p in parts)\nFINAL(str(total))"),
]


def recursive_root(request: FakeRequest) -> str:
    return RECURSIVE[min(turn_of(request), len(RECURSIVE) - 1)]


@pytest.mark.parametrize(("depth", "levels"), [(2, {0, 1}), (3, {0, 1, 2})])
def test_rlm_query_recurses_to_max_depth(
    make_lm: MakeLM, tmp_path: Path, depth: int, levels: set[int]
) -> None:
    with FakeAnthropic(root=recursive_root, sub=count_needles) as fake:
        lm = make_lm(fake, cache=Cache(tmp_path / "c.sqlite3"))
        result = run(
            "How many needles are in the book?",
            context=BOOK,
            lm=lm,
            limits=Limits(max_depth=depth),
            tags={"run_id": f"depth{depth}"},
        )
        subs = fake.count("sub")
    assert result.answer_text == str(NEEDLES)
    tree = result.call_tree()
    assert {n["depth"] for n in tree} == levels
    assert len(tree) == sum(2**d for d in levels)  # a binary tree of runs
    assert all(n["parent"] == n["id"].rpartition(".")[0] for n in tree if n["depth"])
    assert subs == 2 ** (depth)  # the deepest runs fall back to one llm_query per half
    ledger = Cache(tmp_path / "c.sqlite3").ledger(f"depth{depth}")
    assert {r["depth"] for r in ledger if r["role"] == "root"} == levels
    assert max(r["depth"] for r in ledger if r["role"] == "sub") == depth - 1
    md = result.trajectory_markdown()
    assert "child RLM r0.1" in md and "r0.2 answered" in md


def test_child_spend_counts_against_the_parent_budget_as_it_happens(make_lm: MakeLM) -> None:
    """A child's root turns and sub-calls count against the shared max_sub_calls: its first
    turn (1) and its batch of 3 use the 4 allowed, its next turn is refused, and the parent
    sees the refusal and goes on."""
    parent = [
        code(
            "try:\n    print(rlm_query('Count the needles.', context=context))\nexcept BudgetExceeded as e:\n    print('refused:', e)"
        ),
        code("print('after the child')"),
        "FINAL(done)",
    ]
    child = [
        code("print(llm_query_batched(['count:\\n' + c for c in context.split('## ')[1:4]]))"),
        code("print(llm_query('count:\\n' + context[:100]))"),
        "FINAL(child done)",
    ]

    def root(request: FakeRequest) -> str:
        script = child if "Count the needles" in question_of(request) else parent
        return script[min(turn_of(request), len(script) - 1)]

    with FakeAnthropic(root=root, sub=count_needles) as fake:
        lm = make_lm(fake)
        result = run("q", context=BOOK, lm=lm, limits=Limits(max_depth=2, max_sub_calls=4))
        subs = fake.count("sub", include_faulted=True)
        child_turns = [
            r for r in fake.requests if r.kind == "root" and "Count the needles" in question_of(r)
        ]
        parent_turns = [
            r
            for r in fake.requests
            if r.kind == "root" and "Count the needles" not in question_of(r)
        ]
    assert subs == 3 and len(child_turns) == 1  # the child's second turn was never sent
    assert "refused: max_sub_calls=4 reached" in parent_turns[1].last_user_text
    assert result.answer_text == "done"


def test_child_cost_can_end_the_whole_run(make_lm: MakeLM) -> None:
    parent = [
        code("print(rlm_query('Count the needles.', context=context))"),
        code("print(1)"),
        "FINAL(never)",
    ]
    child = [code("print(len(context))"), code("print(2)"), code("print(3)"), "FINAL(child)"]

    def root(request: FakeRequest) -> FakeReply:  # every turn costs $0.225 of output
        script = child if "Count the needles" in question_of(request) else parent
        text = script[min(turn_of(request), len(script) - 1)]
        return FakeReply(text=text, usage={"output_tokens": 3_000})

    with FakeAnthropic(root=root, root_model="claude-opus-4-1") as fake:
        lm = make_lm(fake)
        with pytest.raises(BudgetExceeded, match="max_cost_usd") as err:
            run("q", context=BOOK, lm=lm, limits=Limits(max_depth=2, max_cost_usd=0.6))
    assert err.value.partial is not None
    accounting = err.value.partial.accounting  # the whole call tree's, children included
    assert any(r.depth == 1 for r in accounting.records)
    assert accounting.cost_usd <= 0.6  # reserved before sending: never over the limit


# -- programs in the style of published RLM trajectories -------------------------------------------

PAPER_PROGRAMS: dict[str, list[str]] = {
    # Chunk a long string context, llm_query per chunk in a loop, aggregate in Python.
    "chunk-loop": [
        code("print(type(context), len(context))\nprint(context[:200])"),
        code(
            "lines = context.split('\\n')\n"
            "chunks = ['\\n'.join(lines[i:i + 8]) for i in range(0, len(lines), 8)]\n"
            "counts = []\n"
            "for chunk in chunks:\n"
            "    counts.append(int(llm_query('count:\\n' + chunk)))\n"
            "total = sum(counts)\nprint(len(chunks), total)"
        ),
        code("FINAL(str(total))"),
    ],
    # Batched sub-calls over sections, then FINAL_VAR as text.
    "batched-final-var": [
        code(
            "sections = context.split('## ')[1:]\n"
            "answers = llm_query_batched(['count:\\n' + s for s in sections])\n"
            "result = str(sum(int(a) for a in answers))\nprint(result)"
        ),
        "The total is in `result`.\nFINAL_VAR(result)",
    ],
    # The official library's answer dict.
    "answer-dict": [
        code(
            "import re\n"
            "hits = [m.start() for m in re.finditer('needle', context)]\n"
            "answer['content'] = str(len(hits))\n"
            "answer['ready'] = True"
        ),
    ],
    # Text-level FINAL after exploring with code in an earlier turn.
    "text-final": [
        code("n = context.count('needle')\nprint(n)"),
        "I counted them in the REPL.\nFINAL({needles})",
    ],
    # SHOW_VARS, then a recursive sub-RLM per half, merged in Python.
    "rlm-query-merge": [
        code(
            "half = len(context) // 2\nleft = rlm_query('Count the needles.', context=context[:half])\nprint(SHOW_VARS())"
        ),
        code(
            "right = rlm_query('Count the needles.', context=context[half:])\ntotal = int(left) + int(right)\nprint(total)"
        ),
        code("FINAL_VAR('total')"),
    ],
}


@pytest.mark.parametrize("name", sorted(PAPER_PROGRAMS))
def test_programs_in_the_style_of_rlm_trajectories_run_unchanged(
    make_lm: MakeLM, name: str
) -> None:
    program = [p.replace("{needles}", str(NEEDLES)) for p in PAPER_PROGRAMS[name]]
    with FakeAnthropic(
        root=lambda r: program[min(turn_of(r), len(program) - 1)], sub=count_needles
    ) as fake:
        result = run("How many needles are in the book?", context=BOOK, lm=make_lm(fake))
    assert result.answer_text == str(NEEDLES), result.trajectory_markdown()


def test_programs_over_a_list_of_documents(make_lm: MakeLM) -> None:
    documents = [{"id": i, "text": s} for i, s in enumerate(SECTIONS)]
    program = [
        code(
            "rich = [d for d in context if d['text'].count('needle') >= 5]\n"
            "answers = llm_query_batched(['count:\\n' + d['text'] for d in rich])\n"
            "FINAL(', '.join(f\"{d['id']}:{a}\" for d, a in zip(rich, answers)))"
        )
    ]
    with FakeAnthropic(root=program, sub=count_needles) as fake:
        result = run("Which sections have at least 5 needles?", context=documents, lm=make_lm(fake))
    expected = ", ".join(
        f"{i}:{s.count('needle')}" for i, s in enumerate(SECTIONS) if s.count("needle") >= 5
    )
    assert result.answer_text == expected


# -- an upstream asset as context -------------------------------------------------------------------


def test_rlm_asset_binds_an_upstream_asset_as_context(warehouse_file: str) -> None:
    @dg.asset
    def book() -> str:
        return BOOK

    answer = rlm_asset(
        name="needles", question="How many needles?", tables=["tickets"], context="book"
    )
    assert dg.AssetKey("book") in {d.asset_key for d in next(iter(answer.specs)).deps}
    program = [code("FINAL(str(context.count('needle')))")]
    with FakeAnthropic(root=program) as fake:
        result = dg.materialize(
            [book, answer],
            resources={
                "rlm": RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
                "duckdb": DuckDBResource(database=warehouse_file),
            },
        )
        system = next(r for r in fake.requests if r.kind == "root").system
    assert result.success
    con = duckdb.connect(warehouse_file, read_only=True)
    assert con.sql("SELECT answer FROM needles").fetchall() == [(str(NEEDLES),)]
    con.close()
    assert re.search(r"`context` holds a str of [\d,]+ characters", system)


def test_rlm_asset_binds_a_dataframe_asset(warehouse_file: str) -> None:
    @dg.asset
    def frame() -> pd.DataFrame:
        return pd.DataFrame({"section": range(len(SECTIONS)), "text": SECTIONS})

    answer = rlm_asset(name="rows", question="How many rows?", tables=["tickets"], context="frame")
    with FakeAnthropic(
        root=[code("FINAL(str(len(context)) + ' ' + type(context).__name__)")]
    ) as fake:
        result = dg.materialize(
            [frame, answer],
            resources={
                "rlm": RLMResource(api_key="k", base_url=fake.base_url, root_model="fake-root"),
                "duckdb": DuckDBResource(database=warehouse_file),
            },
        )
    assert result.success
    con = duckdb.connect(warehouse_file, read_only=True)
    assert con.sql("SELECT answer FROM rows").fetchall() == [(f"{len(SECTIONS)} DataFrame",)]
    con.close()


def test_the_host_never_decodes_arrow_sent_by_model_code(make_lm: MakeLM) -> None:
    """A forged child context carrying 'arrow' (a tiny payload could decode to gigabytes) is
    refused before the host reads it; a DataFrame context still works."""
    program = [
        code(
            "try:\n"
            "    _rlm_channel_call = type(rlm_query).__self__.channel.call\n"
            "except Exception:\n"
            "    _rlm_channel_call = None\n"
            "print(rlm_query('Count the needles.', context=pd.DataFrame({'n': [1, 2]})))"
        ),
        "FINAL(done)",
    ]
    from rlm_dagster.engine.loop import _context_from_worker

    with pytest.raises(QueryError, match="context"):
        _context_from_worker({"kind": "frame", "arrow": "QUFBQQ=="})
    with pytest.raises(QueryError, match="context"):
        _context_from_worker({"arrow": "QUFBQQ==", "rows": 10**30})

    def root(request: FakeRequest) -> str:
        if "Count the needles" in question_of(request):
            return "```repl\nFINAL(str(len(context)))\n```"
        return program[min(turn_of(request), len(program) - 1)]

    with FakeAnthropic(root=root) as fake:
        result = run("q", lm=make_lm(fake), limits=Limits(max_depth=2))
    assert result.turns[0].cells[0].output.strip().endswith("2")


def test_a_child_without_an_answer_is_an_error_in_the_parents_code(make_lm: MakeLM) -> None:
    """A child that never answers raises NoFinalAnswer in the parent's cell (catchable),
    never a placeholder text the parent could pass off as an answer."""
    parent = [
        code(
            "try:\n    part = rlm_query('Count the needles.')\nexcept Exception as e:\n"
            "    part = None\n    print(type(e).__name__, '|', e)"
        ),
        code("FINAL('no part' if part is None else part)"),
    ]

    def root(request: FakeRequest) -> str:
        if "Count the needles" in question_of(request):
            return code("print('still looking')")  # the child never calls FINAL
        return parent[min(turn_of(request), len(parent) - 1)]

    with FakeAnthropic(root=root, sub=count_needles) as fake:
        lm = make_lm(fake)
        result = run("q", lm=lm, limits=Limits(max_depth=2, max_iterations=2))
        parent_turns = [
            r
            for r in fake.requests
            if r.kind == "root" and "Count the needles" not in question_of(r)
        ]
    seen = parent_turns[1].last_user_text
    assert "NoFinalAnswer | child RLM r0.1 gave no final answer in 2 iterations" in seen, seen
    assert "ERROR:" not in seen
    assert result.answer_text == "no part"
    assert "child RLM r0.1" in result.trajectory_markdown()  # its turns are kept
