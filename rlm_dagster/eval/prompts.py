"""Every text the eval's own strategies (``direct`` and ``tools``) send to the model.

    >>> "FINAL(" in DIRECT_SYSTEM and "FINAL(" in TOOLS_SYSTEM.template
    True

The ``rlm`` strategy uses the engine's prompts unchanged (``rlm_dagster/prompts``,
``PROMPT_VERSION``). The ``tools`` prompt copies the engine's system prompt wherever the
two can say the same thing (the table list, what each function does, the cost paragraph,
how to work, how to answer), so the comparison measures the calling style, not the wording.
The texts live here rather than in ``rlm_dagster/prompts`` so that an eval edit does not
change the engine's ``PROMPT_VERSION`` (and with it every cache key of every pipeline);
:data:`EVAL_PROMPT_VERSION` versions them instead, and every result records both.
"""

from __future__ import annotations

import hashlib
from string import Template

DIRECT_SYSTEM = """\
You answer a question about data that is given to you in full in the user's message: each
table as CSV, one row per line, with a header. Read the rows yourself; nothing else is
available to you. If the message says the data was truncated, answer from the rows you have
and say so.

## Your answer
End with FINAL(text): a complete, self-contained answer.
"""

DIRECT_USER = Template(
    """\
$tables
$truncation
Question: $question
"""
)

DIRECT_TRUNCATION = Template(
    """\
NOTE: the data above is truncated to fit the model's context window ($window tokens): $shown.
Rows not shown exist but are missing from this message.
"""
)

TOOLS_SYSTEM = Template(
    """\
You answer a question about data that is far too large to read directly. You work through
tools: call them, and you will see what they return. You never see the data unless a tool
returns it, so ask for summaries, counts and small samples, not whole tables.

## Tables
$tables

## Tools
- `sql(query)`: read-only DuckDB SQL over the tables above and over results of llm_where;
  returns the rows as text. One SELECT (or WITH/DESCRIBE/SUMMARIZE) per call. Writes, files
  and other tables are refused with SQLPolicyError, which names the rule.
- `llm_query(prompt)`: one call to a sub-model ($sub_model); it sees only the prompt you
  give it (put the text it needs into the prompt).
- `llm_where(table, predicate, columns, where, limit)`: the rows of `table` (a table name or
  a SELECT) for which the natural-language `predicate` holds, judged by the sub-model in
  batches. `where` is a SQL condition applied first (free); `columns` limits what the
  sub-model reads; `limit=k` stops after k matches. It returns the name of a new table
  (usable in sql()) with a `_verdict_reason` column.

## Cost and limits
Sub-calls cost money and time. You may make at most $max_sub_calls sub-calls in this run
(each llm_where batch counts as one) and spend at most $max_cost. Filter with SQL first
(dates, plans, keywords with ILIKE), then use llm_where on what is left. Never call
llm_query on thousands of rows one at a time. You have $max_iterations turns; each of your
replies is one turn.

## How to work
1. Look first: schemas, row counts, a few sample rows.
2. Narrow with SQL, judge meaning with llm_where or llm_query, aggregate with SQL.
3. Check your result (counts, a few examples), then answer.
Use ORDER BY when you ask for rows, so that what you see does not depend on the engine's
scan order.

## Your answer
When you have it, reply without calling a tool and end with FINAL(text): a complete,
self-contained answer.
"""
)

TOOLS_LAST_TURN = Template(
    """\
You have used all $max_iterations turns. Give your final answer now, from what you have
already found: reply without calling a tool and end with FINAL(your answer).
"""
)

TOOLS_NUDGE = (
    "Your reply had no tool call and no final answer. Continue: call a tool to make progress, "
    "or end with FINAL(value)."
)

TOOL_SPECS: list[dict[str, object]] = [
    {
        "name": "sql",
        "description": "Run one read-only DuckDB SQL query over the tables; returns the rows "
        "as text.",
        "input_schema": {
            "type": "object",
            "properties": {"query": {"type": "string", "description": "one SELECT query"}},
            "required": ["query"],
        },
    },
    {
        "name": "llm_query",
        "description": "One call to the sub-model with this prompt; returns its reply. It "
        "sees only the prompt.",
        "input_schema": {
            "type": "object",
            "properties": {"prompt": {"type": "string"}},
            "required": ["prompt"],
        },
    },
    {
        "name": "llm_where",
        "description": "The rows of a table (a name or a SELECT) for which a natural-language "
        "predicate holds, judged by the sub-model in batches; returns the name of a new table "
        "with a _verdict_reason column.",
        "input_schema": {
            "type": "object",
            "properties": {
                "table": {"type": "string", "description": "a table name or a SELECT"},
                "predicate": {"type": "string"},
                "columns": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "only these columns are shown to the sub-model",
                },
                "where": {"type": "string", "description": "a SQL condition applied first"},
                "limit": {"type": "integer", "description": "stop after this many matches"},
            },
            "required": ["table", "predicate"],
        },
    },
]


def _version() -> str:
    digest = hashlib.sha256()
    for text in (
        DIRECT_SYSTEM,
        DIRECT_USER.template,
        DIRECT_TRUNCATION.template,
        TOOLS_SYSTEM.template,
        TOOLS_LAST_TURN.template,
        TOOLS_NUDGE,
        repr(TOOL_SPECS),
    ):
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()[:12]


EVAL_PROMPT_VERSION = _version()
