"""The root loop end to end: real worker, real DuckDB, real SDK against the fake server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

from rlm_dagster import BudgetExceeded, Limits, NoFinalAnswer, Warehouse, run_rlm
from rlm_dagster.engine.budget import Budget
from rlm_dagster.models.client import LM
from rlm_dagster.repl.seam import REPLFactory
from rlm_dagster.semantic import MATCH_REASONS_SCHEMA, Semantic, WhereConfig
from rlm_dagster.testing import FakeAnthropic, FakeRequest, shape_verdicts

MakeLM = Callable[..., LM]


def code(src: str) -> str:
    return f"Working on it.\n```repl\n{src}\n```"


def small_warehouse() -> Warehouse:
    return Warehouse.from_frames(
        {
            "tickets": pd.DataFrame(
                {
                    "ticket_id": [1, 2, 3, 4, 5, 6],
                    "customer_id": [10, 10, 20, 30, 30, 40],
                    "body": [
                        "We will cancel our contract next month.",
                        "How do I export a dashboard?",
                        "Moving to a competitor unless this is fixed.",
                        "Password reset request.",
                        "Password reset request.",
                        "Thanks, great support!",
                    ],
                }
            ),
            "customers": pd.DataFrame(
                {
                    "customer_id": [10, 20, 30, 40],
                    "plan": ["enterprise", "pro", "enterprise", "free"],
                }
            ),
        }
    )


def churn_judge(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    hit = bool(re.search(r"cancel our|competitor", row.get("body", "")))
    return hit, "threat" if hit else "no threat"


def root_requests(fake: FakeAnthropic) -> list[FakeRequest]:
    return [r for r in fake.requests if r.kind == "root"]


# -- a whole run ----------------------------------------------------------------------------


def test_scripted_run_uses_sql_llm_where_llm_query_and_final(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    script = [
        code(
            "print(len(tickets), tickets.columns)\nprint(sql('SELECT count(*) AS n FROM customers'))"
        ),
        code(
            "threats = llm_where(tickets, 'threatens to cancel', columns=['body'])\n"
            "print(len(threats))\n"
            "summary = llm_query('Summarise: ' + ' | '.join(threats.df()['body']))\n"
            "print(summary)"
        ),
        code(
            "df = sql(f'SELECT ticket_id, _verdict_reason FROM {threats} ORDER BY ticket_id')\nFINAL(df)"
        ),
    ]
    with FakeAnthropic(root=script, sub=lambda r: "two churn threats", where=churn_judge) as fake:
        result = run_rlm(
            "Who threatens to churn?",
            warehouse=small_warehouse(),
            lm=make_lm(fake),
            repl=inprocess_repl,
        )
        roots = root_requests(fake)
    assert result.answer.table is not None
    assert result.answer.table.to_pydict() == {
        "ticket_id": [1, 3],
        "_verdict_reason": ["threat", "threat"],
    }
    assert result.iterations == 3 and result.answer.form == "FINAL"
    # what the model saw: real outputs of its code, turn counters and spend
    assert "6 ['ticket_id', 'customer_id', 'body']" in roots[1].last_user_text
    assert "Turn 2 of 20" in roots[1].last_user_text
    assert (
        "[llm_where: 6 rows -> 6 after where -> 5 distinct; 2 rows match. Result: where_1]"
        in roots[2].last_user_text
    )
    assert "two churn threats" in roots[2].last_user_text
    # accounting: 3 root turns, 1 where batch, 1 llm_query
    assert result.accounting.calls("root") == 3
    assert result.accounting.calls("where") == 1 and result.accounting.calls("sub") == 1
    assert result.accounting.by_model()["claude-haiku-4-5"].cost_usd > 0


def test_root_prompt_describes_tables_and_is_cache_marked(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    with FakeAnthropic(root=["FINAL(ok)"]) as fake:
        run_rlm("q?", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
        body = fake.requests[0].body
    system = body["system"]
    assert system[0]["cache_control"] == {"type": "ephemeral"}
    assert (
        "tickets (table, 6 rows): ticket_id BIGINT, customer_id BIGINT, body VARCHAR"
        in system[0]["text"]
    )
    assert body["messages"][-1]["content"][0]["cache_control"] == {"type": "ephemeral"}


# -- llm_where wire protocol ----------------------------------------------------------------


def test_llm_where_speaks_the_wire_protocol(make_lm: MakeLM) -> None:
    with FakeAnthropic(where=churn_judge) as fake:
        lm = make_lm(fake)
        wh = small_warehouse()
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(batch_rows=3))
        info, _, stats = sem.where("tickets", "The customer threatens to cancel", columns=["body"])
        where_requests = [r for r in fake.requests if r.kind == "where"]
    assert stats.rows_in == 6 and stats.distinct == 5 and stats.requests == 2
    for req in where_requests:
        body = req.body
        assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
        assert "<predicate>The customer threatens to cancel</predicate>" in req.system
        # Haiku 4.5 has structured outputs: the verdicts' JSON schema (reasons only for
        # matches, the default), no tools
        assert body["output_config"] == {
            "format": {"type": "json_schema", "schema": MATCH_REASONS_SCHEMA}
        }
        assert "tools" not in body and "tool_choice" not in body
        lines = req.last_user_text.splitlines()
        assert all(re.fullmatch(r'<row id="\d+">\{.*\}</row>', line) for line in lines)
        ids = [k for k, _ in req.rows or []]
        assert len(ids) == len(set(ids))
        assert all(set(row) == {"body"} for _, row in req.rows or [])  # only projected columns
    # the two system prompts are byte-identical: one cacheable prefix for every batch
    assert where_requests[0].body["system"] == where_requests[1].body["system"]
    result = wh.query(f"SELECT ticket_id, _verdict_reason FROM {info.name} ORDER BY 1").to_pydict()
    assert result == {"ticket_id": [1, 3], "_verdict_reason": ["threat", "threat"]}


def test_llm_where_matches_ground_truth_on_sample_data(
    make_lm: MakeLM,
    warehouse_file: str,
    churn_labels: dict[int, bool],
    churn_by_body: dict[str, bool],
) -> None:
    def judge(predicate: str, row: dict[str, Any]) -> bool:
        return churn_by_body[row["body"]]

    with FakeAnthropic(where=judge) as fake:
        lm = make_lm(fake)
        wh = Warehouse.snapshot(warehouse_file, ["tickets"])
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting))
        info, _, stats = sem.where(
            "tickets", "threatens to cancel", columns=["body"], where="priority <> 'low'"
        )
        got = set(wh.query(f"SELECT ticket_id FROM {info.name}").to_pydict()["ticket_id"])
        considered = set(
            wh.query("SELECT ticket_id FROM tickets WHERE priority <> 'low'").to_pydict()[
                "ticket_id"
            ]
        )
    assert got == {t for t in considered if churn_labels[t]}
    assert stats.distinct < stats.rows_in  # duplicated bodies judged once
    assert sum(len(r.rows or []) for r in fake.requests) == stats.distinct


def test_malformed_verdicts_are_reasked_then_null(make_lm: MakeLM) -> None:
    """Row id 'bad' rows never get a valid verdict: re-asked smaller, then alone, then NULL."""

    def reply(req: FakeRequest) -> str:
        verdicts = []
        for k, row in req.rows or []:
            if "export" in row["body"]:
                continue  # always missing
            verdicts.append({"id": k, "match": "competitor" in row["body"], "reason": "r"})
        if len(verdicts) > 1:
            verdicts.append(dict(verdicts[0]))  # a duplicate id on the first pass
        return json.dumps(shape_verdicts(req, verdicts))

    with FakeAnthropic(where_reply=reply) as fake:
        lm = make_lm(fake)
        wh = small_warehouse()
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(batch_rows=10))
        info, _, stats = sem.where("tickets", "moves to a competitor", columns=["body"])
        sizes = [len(r.rows or []) for r in fake.requests]
    assert stats.failed == 1 and len(stats.errors) == 1 and "missing" in stats.errors[0]
    assert sizes[0] == 5 and sizes[-1] == 1  # first the whole batch, at last the bad row alone
    assert wh.query(f"SELECT ticket_id FROM {info.name}").to_pydict() == {"ticket_id": [3]}


def test_llm_where_limit_stops_early(make_lm: MakeLM) -> None:
    rows = pd.DataFrame({"n": list(range(200)), "text": [f"row {i}" for i in range(200)]})
    with FakeAnthropic(where=lambda p, r: True) as fake:
        lm = make_lm(fake, max_concurrency=2)
        wh = Warehouse.from_frames({"t": rows})
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(batch_rows=10))
        info, _, stats = sem.where("t", "anything", limit=5)
    assert info.rows == 5 and stats.requests == 2  # one wave of two batches, not twenty


# -- observations -----------------------------------------------------------------------------


def test_python_error_reaches_the_model_with_traceback_tail(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    script = [code("x = {'a': 1}\nx['missing']"), "FINAL(recovered)"]
    with FakeAnthropic(root=script) as fake:
        result = run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
        seen = root_requests(fake)[1].last_user_text
    assert result.answer_text == "recovered"
    assert 'File "<cell 1>", line 2' in seen and "x['missing']" in seen
    assert "KeyError: 'missing'" in seen
    assert "rlm_dagster" not in seen  # no worker-internal frames


def test_sql_policy_error_reaches_the_model(make_lm: MakeLM, inprocess_repl: REPLFactory) -> None:
    script = [code("sql('DROP TABLE tickets')"), "FINAL(ok)"]
    with FakeAnthropic(root=script) as fake:
        run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
        seen = root_requests(fake)[1].last_user_text
    assert "SQLPolicyError: [read-only]" in seen


def test_long_output_is_truncated_with_a_note(make_lm: MakeLM, inprocess_repl: REPLFactory) -> None:
    script = [code("print('x' * 50_000)"), "FINAL(done)"]
    with FakeAnthropic(root=script) as fake:
        run_rlm(
            "q",
            warehouse=small_warehouse(),
            lm=make_lm(fake),
            limits=Limits(max_observation_chars=1_000),
            repl=inprocess_repl,
        )
        seen = root_requests(fake)[1].last_user_text
    assert "x" * 1_000 in seen and "x" * 1_001 not in seen
    assert "[output truncated: 49,001 more characters not shown" in seen  # 50,000 x + newline


def test_reply_without_code_or_final_gets_a_nudge(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    with FakeAnthropic(root=["Let me think about this.", "FINAL(ok)"]) as fake:
        run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
        seen = root_requests(fake)[1].last_user_text
    assert "no ```repl``` code block and no final answer" in seen


# -- ending a run -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "answer", "form"),
    [
        ([code("FINAL('in code')")], "in code", "FINAL"),
        ([code("n = 7\nFINAL_VAR('n')")], "7", "FINAL"),
        (["All done.\nFINAL(as text)"], "as text", "FINAL (text)"),
        ([code("result = 'from var'"), "FINAL_VAR(result)"], "from var", "FINAL_VAR (text)"),
        (
            [code("answer['content'] = 'dict form'\nanswer['ready'] = True")],
            "dict form",
            "answer dict",
        ),
        # code and a text FINAL in one reply: the code runs first, then the variable is read
        ([code("total = 6 * 7") + "\nFINAL_VAR(total)"], "42", "FINAL_VAR (text)"),
    ],
)
def test_final_forms(
    make_lm: MakeLM, script: list[str], answer: str, form: str, inprocess_repl: REPLFactory
) -> None:
    with FakeAnthropic(root=script) as fake:
        result = run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
    assert (result.answer_text, result.answer.form) == (answer, form)


def test_text_final_ignored_when_code_in_same_reply_failed(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    script = [code("1/0") + "\nFINAL(made up before seeing output)", "FINAL(real)"]
    with FakeAnthropic(root=script) as fake:
        result = run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
    assert result.answer_text == "real"
    assert "text FINAL ignored" in result.turns[0].note


def test_no_final_after_max_iterations_keeps_trajectory(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    with FakeAnthropic(root=lambda req: code("print('still exploring')")) as fake:
        with pytest.raises(NoFinalAnswer, match="No final answer after 3 iterations") as err:
            run_rlm(
                "q",
                warehouse=small_warehouse(),
                lm=make_lm(fake),
                limits=Limits(max_iterations=3),
                repl=inprocess_repl,
            )
        last = root_requests(fake)[-1].last_user_text
    assert fake.count("root") == 4  # 3 iterations + one last call asking for the answer
    assert "You have used all 3 iterations" in last
    partial = err.value.trajectory
    assert partial.iterations == 4 and "still exploring" in partial.trajectory_markdown()
    assert err.value.partial is partial  # like every run error's partial


def test_output_schema_is_enforced_on_final(make_lm: MakeLM, inprocess_repl: REPLFactory) -> None:
    script = [
        code("FINAL('just text')"),
        code("FINAL(pd.DataFrame({'customer': [1]}))"),
        code(
            "FINAL(pd.DataFrame({'Customer_ID': ['10', '20'], 'reason': ['price', 'outage'], 'extra': [0, 0]}))"
        ),
    ]
    with FakeAnthropic(root=script) as fake:
        result = run_rlm(
            "q",
            warehouse=small_warehouse(),
            lm=make_lm(fake),
            output={"customer_id": "BIGINT", "reason": "VARCHAR"},
            repl=inprocess_repl,
        )
        roots = root_requests(fake)
    assert (
        "needs a table with columns (customer_id BIGINT, reason VARCHAR)" in roots[1].last_user_text
    )
    assert "missing ['customer_id', 'reason']" in roots[2].last_user_text
    assert result.answer.table is not None
    assert result.answer.table.to_pydict() == {
        "customer_id": [10, 20],
        "reason": ["price", "outage"],
    }


# -- limits -----------------------------------------------------------------------------------------


def test_fan_out_over_sub_call_budget_is_refused_before_any_request(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    script = [
        code(
            "try:\n    llm_query_batched([f'q{i}' for i in range(10)])\nexcept BudgetExceeded as e:\n    print('refused:', e)"
        ),
        "FINAL(ok)",
    ]
    with FakeAnthropic(root=script) as fake:
        run_rlm(
            "q",
            warehouse=small_warehouse(),
            lm=make_lm(fake),
            limits=Limits(max_sub_calls=5),
            repl=inprocess_repl,
        )
        seen = root_requests(fake)[1].last_user_text
        subs = fake.count("sub", include_faulted=True)
    assert "refused: 10 sub-calls requested but only 5 of max_sub_calls=5 are left" in seen
    assert subs == 0


def test_llm_query_batched_keeps_order(make_lm: MakeLM) -> None:
    with FakeAnthropic(sub=lambda req: req.prompt.upper()) as fake:
        lm = make_lm(fake)
        sem = Semantic(lm, small_warehouse(), Budget(Limits(), lm.accounting))
        assert sem.query_batched([f"q{i}" for i in range(5)]) == [f"Q{i}" for i in range(5)]


def test_llm_query_batched_fails_loud_when_the_provider_keeps_failing(
    make_lm: MakeLM, tmp_path: Any
) -> None:
    """A prompt that still fails after retries ends the call (retryably), after every other
    prompt finished and was cached: a retried run pays only for the one that failed."""
    from rlm_dagster.cache import Cache
    from rlm_dagster.errors import ProviderUnavailable
    from rlm_dagster.testing import Fault

    def sub(req: FakeRequest) -> str | Fault:
        if req.prompt == "q2":
            return Fault(status=529, message="overloaded")
        return req.prompt.upper()

    with FakeAnthropic(sub=sub) as fake, Cache(tmp_path / "c.sqlite3") as cache:
        lm = make_lm(fake, max_retries=1, cache=cache)
        sem = Semantic(lm, small_warehouse(), Budget(Limits(), lm.accounting))
        with pytest.raises(ProviderUnavailable, match="529") as err:
            sem.query_batched([f"q{i}" for i in range(5)])
        assert err.value.retryable
        assert sorted(r.prompt for r in fake.requests if r.status == 200) == [
            "q0",
            "q1",
            "q3",
            "q4",
        ]
        fake.reset()
        with pytest.raises(ProviderUnavailable):
            sem.query_batched([f"q{i}" for i in range(5)])
        assert {r.prompt for r in fake.requests} == {"q2"}  # the rest replayed from the cache


def test_cost_limit_ends_the_run_with_partial_trajectory(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    """The budget holds one root turn's upper bound but not a second one on top of what the
    first spent: the second turn is refused before it is sent, and the trajectory is kept."""
    from rlm_dagster.testing import FakeReply

    def turn(req: FakeRequest) -> FakeReply:  # a long, expensive turn: $0.10 of output
        return FakeReply(text=code("print('x')"), usage={"output_tokens": 10_000})

    with FakeAnthropic(root=turn, root_model="claude-sonnet-5-5") as fake:
        lm = make_lm(fake)
        request = lm._request(
            "root", lm.root_model, "s" * 8_000, [{"role": "user", "content": "q"}], *[None] * 3
        )
        _, bound = lm.upper_bound(request)
        assert bound is not None
        limits = Limits(max_cost_usd=bound * 1.5)
        with pytest.raises(BudgetExceeded, match="can cost up to") as err:
            run_rlm("q", warehouse=small_warehouse(), lm=lm, limits=limits, repl=inprocess_repl)
    assert err.value.limit == "max_cost_usd"
    assert err.value.partial is not None and err.value.partial.iterations == 1
    assert fake.count("root") == 1
    assert lm.accounting.cost_usd <= bound * 1.5


def test_cell_timeout_restarts_worker_and_tells_the_model(make_lm: MakeLM) -> None:
    script = [
        code("keep = 1\nwhile True:\n    pass"),
        code("print('keep' in globals(), len(tickets))"),
        "FINAL(ok)",
    ]
    with FakeAnthropic(root=script) as fake:
        run_rlm(
            "q", warehouse=small_warehouse(), lm=make_lm(fake), limits=Limits(cell_timeout_s=1.5)
        )
        roots = root_requests(fake)
    assert "TimeoutError: the cell ran longer than 1.5 s" in roots[1].last_user_text
    assert "variables you defined are lost" in roots[1].last_user_text
    assert "False 6" in roots[2].last_user_text


def test_trajectory_markdown_shows_code_and_outputs(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    with FakeAnthropic(root=[code("print(sql('SELECT 41 + 1 AS n'))"), "FINAL(42)"]) as fake:
        result = run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
    md = result.trajectory_markdown()
    assert "### Turn 1" in md and "SELECT 41 + 1" in md and "42" in md
    assert json.dumps(md)  # plain text, serialisable as metadata


def test_model_text_cannot_break_out_of_its_markdown_block(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    """Prose, code and output are fenced so that nothing the model writes renders as page
    structure: a closing fence, a heading, an image or raw HTML stays text."""
    hostile = "```\n# Injected heading\n![x](http://127.0.0.1/leak?d=rows)\n<img src=x>\n````"
    script = [
        hostile + "\n```repl\nprint('````\\n## also injected')\n```",
        "```repl\nFINAL('done')\n```",
    ]
    with FakeAnthropic(root=script) as fake:
        result = run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
    markdown = result.trajectory_markdown()
    outside: list[str] = []
    fence: str | None = None
    for line in markdown.splitlines():
        stripped = line.lstrip("> ")
        opener = re.match(r"^(`{3,})", stripped)
        if fence is None and opener:
            fence = opener.group(1)
        elif (
            fence is not None and stripped.startswith(fence) and not stripped[len(fence) :].strip()
        ):
            fence = None
        elif fence is None:
            outside.append(stripped)
    assert not any(
        (line.startswith("#") and "Turn" not in line) or "![" in line or "<img" in line
        for line in outside
    ), outside


def test_a_worker_made_partition_column_is_refused(
    make_lm: MakeLM, inprocess_repl: REPLFactory
) -> None:
    script = [
        "```repl\nimport pandas as pd\nFINAL(pd.DataFrame({'_partition': ['x'], 'n': [1]}))\n```",
        "```repl\nimport pandas as pd\nFINAL(pd.DataFrame({'n': [1]}))\n```",
    ]
    with FakeAnthropic(root=script) as fake:
        result = run_rlm("q", warehouse=small_warehouse(), lm=make_lm(fake), repl=inprocess_repl)
    assert "reserved" in (result.turns[0].cells[0].error or "")
    assert result.answer.table is not None and result.answer.table.column_names == ["n"]
