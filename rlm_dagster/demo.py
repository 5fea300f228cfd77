"""The offline DEMO model: a scripted fake Messages API, used when no API key is set.

    >>> with demo_server() as fake:  # doctest: +SKIP
    ...     lm = LM(api_key="demo", base_url=fake.base_url, root_model=DEMO_ROOT_MODEL,
    ...             sub_model=DEMO_SUB_MODEL, provider="demo")

It is NOT a language model. Its "root model" writes fixed REPL programs for the sample
pipeline's questions (and a short look-around for any other question); its "sub-model" judges
rows and answers prompts with keyword rules. It exists so that the sample pipeline runs
offline through the real code path — the ``anthropic`` SDK over HTTP, the REPL worker, the
SQL policy, ``llm_where``'s wire protocol — and every run it serves is labelled
``rlm/provider: demo``.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from rlm_dagster.testing import FakeAnthropic, FakeRequest

DEMO_ROOT_MODEL = "demo-root"
DEMO_SUB_MODEL = "demo-sub"
# The demo server answers like a Claude model without thinking or effort (Haiku 4.5), and
# costs nothing.
DEMO_PROFILES = {
    model: {"like": "claude-haiku-4-5", "input_usd_per_mtok": 0.0, "output_usd_per_mtok": 0.0}
    for model in (DEMO_ROOT_MODEL, DEMO_SUB_MODEL)
}

CHURN_PREDICATE = "The customer threatens to cancel, not renew, or move to a competitor."

_CHURN_SIGNALS = re.compile(
    r"cancel (our|my|the) (subscription|contract|account|plan)|cancell?ing (our|my|the)? ?"
    r"(subscription|contract|account)|not (be )?renew|won'?t (be )?renew|no(t)? going to renew|"
    r"competitor|switch(ing)? to|mov(e|ing) (our team |everything |)(off|away|to)|terminat|"
    r"walk away|take our business|look(ing)? elsewhere|alternatives?|churn|leave your|end our",
    re.I,
)
_REASONS = [
    ("pricing", re.compile(r"price|pricing|cost|expensive|invoice|budget|renewal quote|\$", re.I)),
    ("outage", re.compile(r"outage|down|downtime|unavailable|incident|sla", re.I)),
    ("competitor", re.compile(r"competitor|alternative|switch|evaluat", re.I)),
    ("missing_feature", re.compile(r"feature|roadmap|missing|support for|integration", re.I)),
    ("support_quality", re.compile(r"support|response time|no one|nobody|waiting|ticket", re.I)),
    ("bugs", re.compile(r"bug|broken|error|crash|fail", re.I)),
]
_THEMES = [
    ("billing", re.compile(r"invoice|billing|charge|refund|payment|price", re.I)),
    ("outage", re.compile(r"outage|down|unavailable|502|503|incident", re.I)),
    ("login/SSO", re.compile(r"sso|login|password|saml|okta|2fa|mfa", re.I)),
    ("data sync & exports", re.compile(r"sync|export|import|csv|pipeline", re.I)),
    ("API", re.compile(r"\bapi\b|rate limit|webhook|token", re.I)),
    ("dashboards", re.compile(r"dashboard|chart|report", re.I)),
]

_CHURN_PROGRAMS = [
    """Let me look at the tables first.
```repl
print(repr(tickets))
print(repr(customers))
print(sql("SELECT plan, count(*) AS customers FROM customers GROUP BY plan ORDER BY customers DESC"))
print(sql("SELECT min(created_at) AS first, max(created_at) AS last FROM tickets"))
```""",
    f"""Narrow with SQL (enterprise customers, last 90 days), then judge meaning with llm_where.
```repl
window = '''
    SELECT t.ticket_id, t.customer_id, t.subject, t.body
    FROM tickets t JOIN customers c USING (customer_id)
    WHERE c.plan = 'enterprise'
      AND t.created_at >= TIMESTAMP '2026-11-15' - INTERVAL 90 DAY
'''
print(len(sql(window)), "enterprise tickets in the window")
threats = llm_where(window, "{CHURN_PREDICATE}", columns=["subject", "body"])
print(len(threats), "threaten to churn")
print(threats.head(5))
```""",
    """Ask the sub-model for a short reason per threat, then assemble the answer.
```repl
found = threats.df()
reasons = llm_query_batched(
    [f"In 2-5 words, why is this customer threatening to leave?\\n\\n{b}" for b in found["body"]]
)
answer_df = found[["customer_id", "ticket_id"]].copy()
answer_df["reason"] = reasons
names = sql("SELECT customer_id, name AS customer_name FROM customers")
answer_df = answer_df.merge(names, on="customer_id")[["customer_id", "customer_name", "ticket_id", "reason"]]
print(answer_df.head(10))
FINAL(answer_df)
```""",
]

_THEME_PROGRAMS = [
    """First, the size and time range of the urgent tickets.
```repl
print(repr(tickets))
print(sql("SELECT priority, count(*) AS n FROM tickets GROUP BY priority ORDER BY n DESC"))
```""",
    """Classify each recent urgent ticket's subject with batched sub-calls, then count themes.
```repl
urgent = sql('''
    SELECT ticket_id, subject FROM tickets
    WHERE priority = 'urgent' AND created_at >= TIMESTAMP '2026-11-15' - INTERVAL 30 DAY
''')
themes = llm_query_batched([f"Name the theme of this support ticket subject: {s}" for s in urgent["subject"]])
urgent["theme"] = themes
counts = urgent["theme"].value_counts()
print(len(urgent), "urgent tickets in the last 30 days")
print(counts)
```""",
    """```repl
lines = [f"- {theme}: {n} tickets" for theme, n in counts.items()]
FINAL("Main themes of the " + str(len(urgent)) + " urgent tickets in the last 30 days "
      "(demo model, keyword themes):\\n" + "\\n".join(lines))
```""",
]

_GENERIC_PROGRAMS = [
    """```repl
for name, value in list(globals().items()):
    if hasattr(value, "columns") and hasattr(value, "head"):
        print(repr(value))
```""",
    """FINAL(The offline demo model only scripts the sample pipeline's questions; set ANTHROPIC_API_KEY to answer this one with Claude.)""",
]


# What each scripted program ends with: the churn program a table with these columns, the
# themes program free text.
_CHURN_COLUMNS = {"customer_id", "customer_name", "ticket_id", "reason"}


def unscripted(question: str, output_columns: Collection[str] | None) -> str | None:
    """Why the demo cannot answer ``question`` with ``output_columns`` (``None``: free text),
    or ``None`` when one of its scripts does."""
    program = _program_for(question)
    if program is _CHURN_PROGRAMS and set(output_columns or ()) == _CHURN_COLUMNS:
        return None
    if program is _THEME_PROGRAMS and output_columns is None:
        return None
    shape = "free text" if output_columns is None else f"columns {sorted(output_columns)}"
    return (
        f"The offline DEMO model (scripted programs and keyword rules, not an LLM) has no "
        f"script for this question with {shape}; it only answers the sample pipeline's two "
        "questions (churn threats with columns customer_id, customer_name, ticket_id, reason; "
        "urgent ticket themes as text). It refuses rather than pass off a placeholder as an "
        "answer. Set ANTHROPIC_API_KEY and use RLMResource(api_key=dg.EnvVar("
        "'ANTHROPIC_API_KEY')), or point RLMResource(base_url=...) at an Anthropic-compatible "
        "server."
    )


def _program_for(question: str) -> list[str]:
    q = question.lower()
    if "cancel" in q or "churn" in q:
        return _CHURN_PROGRAMS
    if "theme" in q:
        return _THEME_PROGRAMS
    return _GENERIC_PROGRAMS


def demo_root(request: FakeRequest) -> str:
    """The demo root model: the next step of the scripted program for this question."""
    messages: list[dict[str, Any]] = request.body.get("messages", [])
    first = messages[0]["content"] if messages else ""
    question = first if isinstance(first, str) else " ".join(b.get("text", "") for b in first)
    turn = sum(1 for m in messages if m.get("role") == "assistant")
    program = _program_for(question)
    if "You have used all" in request.last_user_text:
        return "FINAL(The demo model could not finish this question within the iteration limit.)"
    return program[min(turn, len(program) - 1)]


def demo_where(predicate: str, row: dict[str, Any]) -> tuple[bool, str]:
    """Keyword judge for the demo's churn predicate (and a crude one for any other)."""
    text = " ".join(str(v) for v in row.values())
    if "cancel" in predicate.lower() or "churn" in predicate.lower():
        m = _CHURN_SIGNALS.search(text)
        return (True, f"demo rule matched '{m.group(0)}'") if m else (False, "no churn signal")
    words = [w for w in re.findall(r"[a-z]{5,}", predicate.lower())]
    hit = next((w for w in words if w in text.lower()), None)
    return (hit is not None, f"demo rule: mentions '{hit}'" if hit else "demo rule: no keyword")


def demo_sub(request: FakeRequest) -> str:
    """Keyword answers to the demo programs' sub-call prompts."""
    prompt = request.prompt
    table = _REASONS if "leave" in prompt else _THEMES
    for label, pattern in table:
        if pattern.search(
            prompt.split("\n", 1)[-1] if "leave" in prompt else prompt.split(":", 1)[-1]
        ):
            return label
    return "other"


def demo_server() -> FakeAnthropic:
    """A fake Messages API serving the demo model (start it with ``with``)."""
    return FakeAnthropic(root=demo_root, sub=demo_sub, where=demo_where, root_model=DEMO_ROOT_MODEL)
