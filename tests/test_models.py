"""Model capability profiles, and every current model family on the strict fake.

The strict fake (``FakeAnthropic(strict=True)``, the default) answers HTTP 400 to every
request shape the real API rejects for a model, so a request these tests send is one the
real API accepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest

from rlm_dagster import ConfigError, Limits, RLMResource, Warehouse, run_rlm
from rlm_dagster.cache import Cache
from rlm_dagster.engine.budget import Budget
from rlm_dagster.engine.events import Event, RunWarning
from rlm_dagster.errors import ModelRefused
from rlm_dagster.models.client import LM, THINKING_ROOM, Usage
from rlm_dagster.models.profiles import CONSERVATIVE, ModelCatalog, profile_for
from rlm_dagster.semantic import Semantic, WhereConfig
from rlm_dagster.testing import REFUSE, FakeAnthropic, FakeReply, FakeRequest

MakeLM = Callable[..., LM]

CURRENT = [
    "claude-fable-5-2",
    "claude-fable-5-1",
    "claude-opus-5-5",
    "claude-sonnet-5-5",
    "claude-haiku-5-5",
    "claude-opus-5",
    "claude-sonnet-5",
    "claude-opus-4-8",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
]
# Verdict channel per family: structured outputs, forced tool, or the offered tool (auto).
CHANNELS = {
    **{m: "structured" for m in CURRENT},
    "claude-fable-5": "auto_tool",
    "claude-3-7-sonnet": "forced_tool",
    "claude-opus-4-1": "forced_tool",
    "llama-3.2-local": "auto_tool",  # unknown: the conservative profile
}

TICKETS = pd.DataFrame(
    {
        "ticket_id": [1, 2, 3, 4, 5, 6],
        "body": [
            "We will cancel our contract next month.",
            "The export button is broken.",
            "Moving to a competitor unless pricing changes.",
            "Please reset my password.",
            "Thanks for the quick fix!",
            "The export button is broken.",
        ],
    }
)


def churn(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    body = row["body"].lower()
    hit = "cancel" in body or "competitor" in body
    return hit, "threat" if hit else "no threat"


def where_program(reply_after: str = "") -> list[str]:
    return [
        "```repl\nhits = llm_where(tickets, 'threatens to cancel', columns=['body'])\n"
        "note = llm_query('Say ok')\nprint(len(hits), note)\n```",
        "```repl\nFINAL(f'{len(hits)} tickets threaten to cancel')\n```" + reply_after,
    ]


# -- the profile table ----------------------------------------------------------------------


@pytest.mark.parametrize(("model", "channel"), sorted(CHANNELS.items()))
def test_every_family_has_a_verdict_channel(model: str, channel: str) -> None:
    assert profile_for(model).verdict_channel == channel


def test_the_5x_models_refuse_what_the_migration_guides_say() -> None:
    for model in ("claude-sonnet-5-5", "claude-opus-5-5", "claude-fable-5-1", "claude-fable-5-2"):
        p = profile_for(model)
        assert not p.forced_tool_choice and not p.sampling_params and not p.prefill
        assert p.thinks_by_default and p.min_cache_tokens == (512 if "fable" not in model else 1024)
    assert profile_for("claude-opus-5-5").thinking_param("off", "low") is None  # cannot
    assert profile_for("claude-sonnet-5-5").thinking_param("off", "low") == {
        "type": "between_tools"
    }
    haiku = profile_for("claude-haiku-5-5")
    assert haiku.thinking_param("off", "low") == {"type": "disabled"}
    assert haiku.thinking_param("off", "max") is None  # disabled + max answers 400
    assert haiku.long_prompt_threshold == 100_000 and haiku.default_effort == "medium"


def test_effort_is_clamped_to_what_the_model_takes() -> None:
    assert profile_for("claude-opus-4-6").effort("xhigh") == "high"  # no xhigh before 4.7
    assert profile_for("claude-opus-4-5").effort("max") == "high"
    assert profile_for("claude-haiku-4-5").effort("low") is None  # takes no effort at all
    with pytest.raises(ConfigError, match="effort must be one of"):
        profile_for("claude-sonnet-5-5").effort("extreme")


def test_dated_ids_use_their_family_and_unknown_models_the_conservative_profile() -> None:
    assert profile_for("claude-sonnet-4-5-20250929").family == "claude-sonnet-4-5"
    unknown = profile_for("claude-opus-9")
    assert not unknown.known and unknown.verdict_channel == "auto_tool"
    assert unknown.effort("low") is None and not unknown.structured_outputs
    assert CONSERVATIVE.thinking_param("off", None) is None


def test_a_declared_profile_prices_and_describes_a_local_model() -> None:
    catalog = ModelCatalog(
        {
            "qwen-local": {
                "like": "claude-haiku-4-5",
                "input_usd_per_mtok": 0.5,
                "output_usd_per_mtok": 1.0,
                "max_output_tokens": 8_192,
            }
        }
    )
    profile = catalog.profile("qwen-local")
    assert profile.known and profile.verdict_channel == "structured"
    assert profile.max_output_tokens == 8_192
    assert catalog.cost_usd("qwen-local", Usage(1_000_000, 1_000_000)) == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="unknown field"):
        ModelCatalog({"m": {"forced_tools": True}})
    with pytest.raises(ConfigError, match="not a model family"):
        ModelCatalog({"m": {"like": "gpt-9"}})


def test_a_sub_model_that_cannot_return_verdicts_fails_at_definition_load() -> None:
    with pytest.raises(ConfigError, match="cannot return llm_where verdicts") as err:
        RLMResource(
            api_key="k",
            sub_model="text-only-local",
            model_profiles={"text-only-local": {"tools": False}},
        )
    assert "model_profiles" in str(err.value)  # the message names the fix
    with pytest.raises(ConfigError, match="root_effort"):
        RLMResource(api_key="k", root_effort="extreme")


def test_haiku_55_long_prompt_tier_bills_the_whole_request() -> None:
    catalog = ModelCatalog()
    short = catalog.cost_usd("claude-haiku-5-5", Usage(input_tokens=100_000, output_tokens=1_000))
    long = catalog.cost_usd("claude-haiku-5-5", Usage(input_tokens=100_001, output_tokens=1_000))
    assert short == pytest.approx((100_000 * 0.10 + 1_000 * 0.50) / 1e6)
    assert long == pytest.approx((100_001 * 0.50 + 1_000 * 2.50) / 1e6)


# -- requests shaped by the profile -----------------------------------------------------------


def test_root_turns_send_effort_and_leave_room_for_thinking(make_lm: MakeLM) -> None:
    with FakeAnthropic(root=["FINAL('done')"], root_model="claude-sonnet-5-5") as fake:
        lm = make_lm(fake, root_model="claude-sonnet-5-5", sub_model="claude-haiku-5-5")
        reply = lm.complete(
            role="root",
            model=lm.root_model,
            system="s",
            messages=[{"role": "user", "content": "q"}],
        )
    body = fake.requests[-1].body
    assert body["output_config"] == {"effort": "medium"}
    assert "thinking" not in body  # adaptive thinking is the default: nothing to send
    assert body["max_tokens"] == lm.root_max_tokens + THINKING_ROOM["medium"]
    assert reply.text == "FINAL('done')" and reply.record.usage.thinking_tokens > 0
    assert reply.thinking == ""  # display omitted: thinking text is not returned


def test_sub_calls_turn_thinking_off_at_low_effort_where_the_model_allows(
    make_lm: MakeLM,
) -> None:
    for sub, thinking in (
        ("claude-haiku-5-5", {"type": "disabled"}),
        ("claude-sonnet-5-5", {"type": "between_tools"}),
        ("claude-opus-5-5", None),  # cannot turn it off: left adaptive, at low effort
    ):
        with FakeAnthropic(sub="ok") as fake:
            lm = make_lm(fake, sub_model=sub)
            sem = Semantic(lm, Warehouse.from_frames({}), Budget(Limits(), lm.accounting))
            assert sem.query("hello") == "ok"
        body = fake.requests[-1].body
        assert body.get("thinking") == thinking, sub
        assert body["output_config"] == {"effort": "low"}
        assert not fake.rejections


def test_a_forced_tool_choice_is_refused_before_it_is_sent(make_lm: MakeLM) -> None:
    with FakeAnthropic(sub="ok") as fake:
        lm = make_lm(fake, sub_model="claude-sonnet-5-5")
        with pytest.raises(ConfigError, match="forced tool_choice"):
            lm.complete(
                role="sub",
                model=lm.sub_model,
                system="s",
                messages=[{"role": "user", "content": "q"}],
                tools=[{"name": "t", "input_schema": {"type": "object"}}],
                tool_choice={"type": "tool", "name": "t"},
            )
    assert fake.count(include_faulted=True) == 0


def test_the_strict_fake_rejects_what_our_client_must_never_send(make_lm: MakeLM) -> None:
    """The strict fake is the reference: a forced tool on Sonnet 5.5 is a 400 there too."""
    import anthropic

    with FakeAnthropic(sub="ok") as fake:
        client = anthropic.Anthropic(api_key="k", base_url=fake.base_url, max_retries=0)
        with pytest.raises(anthropic.BadRequestError):
            client.messages.create(
                model="claude-sonnet-5-5",
                max_tokens=100,
                messages=[{"role": "user", "content": "q"}],
                tools=[{"name": "t", "input_schema": {"type": "object"}}],
                tool_choice={"type": "tool", "name": "t"},
            )
        client.close()
    assert len(fake.rejections) == 1


# -- every current family, end to end on the strict fake ---------------------------------------


@pytest.mark.parametrize("model", CURRENT)
def test_root_loop_runs_on_each_family(model: str, make_lm: MakeLM) -> None:
    with FakeAnthropic(root=where_program(), where=churn, sub="ok", root_model=model) as fake:
        # the fake tells root turns from sub-calls by model, so the sub model differs
        sub = "claude-haiku-4-5" if model == "claude-haiku-5-5" else "claude-haiku-5-5"
        lm = make_lm(fake, root_model=model, sub_model=sub)
        result = run_rlm(
            "Who threatens to cancel?",
            warehouse=Warehouse.from_frames({"tickets": TICKETS}),
            lm=lm,
            sandbox="process",
        )
    assert not fake.rejections, fake.rejections
    assert result.answer_text == "2 tickets threaten to cancel"
    root_bodies = [r.body for r in fake.requests if r.kind == "root"]
    profile = profile_for(model)
    for body in root_bodies:
        assert ("output_config" in body) == bool(profile.effort_levels)
        assert body["messages"][-1]["role"] == "user"  # never a prefill
    root_usage = [r.usage for r in result.accounting.records if r.role == "root"]
    assert all((u.thinking_tokens > 0) == profile.thinks_by_default for u in root_usage)


@pytest.mark.parametrize("model", sorted(CHANNELS))
def test_llm_where_and_llm_query_run_on_each_family(model: str, make_lm: MakeLM) -> None:
    with FakeAnthropic(where=churn, sub="ok") as fake:
        lm = make_lm(fake, sub_model=model)
        wh = Warehouse.from_frames({"tickets": TICKETS})
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting), config=WhereConfig(batch_rows=3))
        info, _, stats = sem.where("tickets", "threatens to cancel", columns=["body"])
        assert sem.query("Say ok") == "ok"
        got = wh.query(f"SELECT ticket_id FROM {info.name} ORDER BY 1").to_pydict()
    assert not fake.rejections, fake.rejections
    assert got == {"ticket_id": [1, 3]} and stats.failed == 0
    where = [r for r in fake.requests if r.kind == "where"]
    channel = CHANNELS[model]
    for req in where:
        body = req.body
        if channel == "structured":
            assert body["output_config"]["format"]["type"] == "json_schema"
            assert "tools" not in body
        else:
            assert body["tools"][0]["name"] == "record_verdicts"
            assert body["tool_choice"]["type"] == ("tool" if channel == "forced_tool" else "auto")


# -- refusals -------------------------------------------------------------------------------------


def test_a_refused_where_batch_leaves_only_the_refused_rows_null(make_lm: MakeLM) -> None:
    def judge(predicate: str, row: dict[str, Any]) -> Any:
        return REFUSE if "password" in row["body"] else churn(predicate, row)

    with FakeAnthropic(where=judge) as fake:
        lm = make_lm(fake, sub_model="claude-haiku-5-5")
        wh = Warehouse.from_frames({"tickets": TICKETS})
        sem = Semantic(lm, wh, Budget(Limits(), lm.accounting))
        info, prov, stats = sem.where("tickets", "threatens to cancel", columns=["body"])
        rows = wh.query(
            f"SELECT ticket_id, _verdict, _decided_by, _error FROM {prov.name} ORDER BY 1"
        ).to_pylist()
        matches = wh.query(f"SELECT ticket_id FROM {info.name} ORDER BY 1").to_pydict()
    assert matches == {"ticket_id": [1, 3]}
    refused = [r for r in rows if r["_verdict"] is None]
    assert [r["ticket_id"] for r in refused] == [4]
    assert refused[0]["_decided_by"] == "refused" and "refused by the model" in refused[0]["_error"]
    assert all(r["_verdict"] is not None for r in rows if r["ticket_id"] != 4)
    assert stats.failed == 1


def test_a_refused_root_turn_fails_the_run_and_is_not_retryable(make_lm: MakeLM) -> None:
    with FakeAnthropic(
        root=[FakeReply(stop_reason="refusal")], root_model="claude-sonnet-5-5"
    ) as fake:
        lm = make_lm(fake, root_model="claude-sonnet-5-5")
        with pytest.raises(ModelRefused, match="refusal") as err:
            run_rlm("q", warehouse=Warehouse.from_frames({}), lm=lm, sandbox="process")
    assert err.value.retryable is False
    assert fake.count("root") == 1  # not retried


def test_a_refused_llm_query_reaches_the_model_as_an_error(make_lm: MakeLM) -> None:
    program = [
        "```repl\ntry:\n    llm_query('x')\nexcept Exception as e:\n    print(type(e).__name__)\n```",
        "```repl\nFINAL('handled')\n```",
    ]

    def sub(req: FakeRequest) -> FakeReply:
        return FakeReply(stop_reason="refusal")

    with FakeAnthropic(root=program, sub=sub) as fake:
        result = run_rlm(
            "q", warehouse=Warehouse.from_frames({}), lm=make_lm(fake), sandbox="process"
        )
    assert "ModelRefused" in result.turns[0].cells[0].output


# -- thinking: billed, shown as thinking, replayed from the cache ------------------------------------


def test_thinking_is_billed_shown_apart_and_replays_from_the_cache(
    make_lm: MakeLM, tmp_path: Any
) -> None:
    cache_path = tmp_path / "c.sqlite3"

    def one_run() -> tuple[Any, FakeAnthropic, LM]:
        with (
            FakeAnthropic(
                root=where_program(), where=churn, sub="ok", root_model="claude-opus-5-5"
            ) as fake,
            Cache(cache_path) as cache,
        ):
            lm = make_lm(
                fake, root_model="claude-opus-5-5", sub_model="claude-haiku-5-5", cache=cache
            )
            result = run_rlm(
                "Who threatens to cancel?",
                warehouse=Warehouse.from_frames({"tickets": TICKETS}),
                lm=lm,
                sandbox="process",
            )
            return result, fake, lm

    first, _, _ = one_run()
    paid = [r for r in first.accounting.records if r.role == "root"]
    assert all(r.usage.thinking_tokens > 0 for r in paid)
    assert all(r.usage.output_tokens > r.usage.thinking_tokens for r in paid)
    markdown = first.trajectory_markdown()
    assert "thought for" in markdown and "text not returned" in markdown
    with Cache(cache_path) as cache:
        ledger = cache.ledger()
    assert sum(row["thinking_tokens"] for row in ledger if row["role"] == "root") == sum(
        r.usage.thinking_tokens for r in paid
    )

    second, fake2, _ = one_run()
    assert second.answer_text == first.answer_text
    assert fake2.count("root") == 0  # every root turn replayed from the call cache
    assert [t.thinking_tokens for t in second.turns] == [t.thinking_tokens for t in first.turns]


def test_an_unknown_model_runs_conservatively_and_says_so_once(make_lm: MakeLM) -> None:
    events: list[Event] = []
    with FakeAnthropic(root=where_program(), where=churn, sub="ok", root_model="llama-local") as f:
        lm = make_lm(f, root_model="llama-local", sub_model="llama-local-sub")
        run_rlm(
            "q",
            warehouse=Warehouse.from_frames({"tickets": TICKETS}),
            lm=lm,
            sandbox="process",
            on_event=events.append,
        )
    warnings = [e.describe() for e in events if isinstance(e, RunWarning)]
    profiles = [w for w in warnings if "conservative profile" in w]
    assert len(profiles) == 2  # one per unknown model, once per run
    # and, said up front: a USD limit cannot hold for models without a price
    (usd,) = [w for w in warnings if "cannot be enforced" in w]
    assert "'llama-local', 'llama-local-sub'" in usd and "max_tokens" in usd
    assert len(warnings) == 3
    for req in f.requests:
        assert "output_config" not in req.body and "thinking" not in req.body


# -- price tiers in the planner ---------------------------------------------------------------


def test_llm_where_packs_under_the_long_prompt_threshold(make_lm: MakeLM) -> None:
    rows = pd.DataFrame({"text": [f"{i} " + "word " * 700 for i in range(400)]})
    with FakeAnthropic(where=lambda p, r: False) as fake:
        lm = make_lm(fake, sub_model="claude-haiku-5-5")
        sem = Semantic(
            lm,
            Warehouse.from_frames({"t": rows}),
            Budget(Limits(max_cost_usd=None), lm.accounting),
            config=WhereConfig(batch_rows=1_000, batch_tokens=1_000_000),
        )
        plan = sem.plan("t", "mentions a cat")
        assert plan.requests > 1
        # every request's prompt estimate stays in the short tier, and the price says so
        short_rate = (plan.est_input_tokens * 0.10 + plan.est_output_tokens * 0.50) / 1e6
        assert plan.est_cost_usd == pytest.approx(short_rate)
        sem.where("t", "mentions a cat")
    prompts = [r.body for r in fake.requests if r.kind == "where" and r.status == 200]
    assert prompts and all(len(json.dumps(b)) // 4 < 100_000 for b in prompts)
    assert all(
        r.usage.input_tokens + r.usage.cache_read_input_tokens < 100_000
        for r in lm.accounting.records
    )
