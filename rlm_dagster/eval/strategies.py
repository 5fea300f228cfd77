"""Three ways to answer the same question with the same model, limits and budget.

    >>> sorted(STRATEGIES)
    ['direct', 'rlm', 'tools']

* ``rlm`` — the product: :func:`rlm_dagster.run_rlm`, the root model writing code in the
  sandboxed REPL where ``sql``, ``llm_query``, ``llm_query_batched`` and ``llm_where`` are
  functions it can loop over.
* ``direct`` — no tools: the tables rendered as CSV into one prompt, cut to the root model's
  context window, the cut stated in the prompt and recorded in the result.
* ``tools`` — the way agent frameworks offer the same functions: ``sql``, ``llm_query`` and
  ``llm_where`` as Messages-API tools, one JSON call per ``tool_use`` block, answered with
  ``tool_result`` blocks, each executed by the same :class:`~rlm_dagster.sql.warehouse.Warehouse`
  and :class:`~rlm_dagster.semantic.Semantic` code the REPL's functions call.

All three go through one :class:`~rlm_dagster.models.client.LM` (same models, retries,
profile-shaped requests and call cache) and meter every call with a fresh
:class:`~rlm_dagster.engine.budget.Budget` under the same :class:`~rlm_dagster.Limits`, so
each question has the same limits on turns, sub-calls, USD and wall time in every strategy.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from rlm_dagster.cache import CacheStore
from rlm_dagster.engine.budget import Budget, Limits
from rlm_dagster.engine.loop import run_rlm, truncate
from rlm_dagster.errors import CacheError, ModelError, ModelRefused, NoFinalAnswer, RLMError
from rlm_dagster.eval.prompts import (
    DIRECT_SYSTEM,
    DIRECT_TRUNCATION,
    DIRECT_USER,
    TOOL_SPECS,
    TOOLS_LAST_TURN,
    TOOLS_NUDGE,
    TOOLS_SYSTEM,
)
from rlm_dagster.eval.task import Task
from rlm_dagster.models.client import LM, THINKING_ROOM, Accounting, cached_system
from rlm_dagster.prompts import snippet
from rlm_dagster.repl.seam import REPLFactory
from rlm_dagster.semantic import Semantic
from rlm_dagster.sql.warehouse import Warehouse

# Characters per token when sizing the direct prompt: the client's own upper-bound estimate
# (3, on the high side), so a prompt cut to the window is never refused for its size.
CHARS_PER_TOKEN = 3
# Room kept free in the window beside the data: system prompt, question and notes.
PROMPT_OVERHEAD_TOKENS = 1_024


@dataclass
class Harness:
    """What every strategy gets: the one client, the per-question limits, the cache."""

    lm: LM
    limits: Limits
    cache: CacheStore | None = None
    sandbox: str = "auto"
    repl: REPLFactory | None = None  # tests only: an in-process REPL instead of the worker
    run_id: str = "eval"


@dataclass
class Attempt:
    """What one strategy produced for one question, and what it spent."""

    text: str = ""
    table: pa.Table | None = None
    accounting: Accounting = field(default_factory=Accounting)
    error: BaseException | None = None
    turns: int = 0
    seconds: float = 0.0
    truncation: dict[str, dict[str, int]] | None = None  # direct: table -> shown/total rows


Strategy = Callable[[Task, Harness], Attempt]


def _tags(task: Task, strategy: str, harness: Harness) -> dict[str, str]:
    return {
        "run_id": f"{harness.run_id}/{task.id}/{strategy}",
        "asset": f"eval/{strategy}",
        "partition": task.id,
    }


def _budget(task: Task, strategy: str, harness: Harness) -> Budget:
    return Budget(harness.limits, ledger=harness.cache, tags=_tags(task, strategy, harness))


# -- rlm ------------------------------------------------------------------------------------


def rlm_strategy(task: Task, harness: Harness) -> Attempt:
    """The engine, as a user would call it."""
    warehouse = Warehouse.from_frames(task.tables)
    try:
        result = run_rlm(
            task.question,
            warehouse=warehouse,
            lm=harness.lm,
            limits=harness.limits,
            sandbox=harness.sandbox,
            repl=harness.repl,
            tags=_tags(task, "rlm", harness),
        )
    except RLMError as err:
        # NoFinalAnswer carries the run so far as ``trajectory``; every other error as
        # ``partial``.
        partial = err.partial or getattr(err, "trajectory", None)
        return Attempt(
            error=err,
            accounting=partial.accounting if partial is not None else Accounting(),
            turns=partial.iterations if partial is not None else 0,
        )
    finally:
        warehouse.close()
    return Attempt(
        text=result.answer_text,
        table=result.answer.table,
        accounting=result.accounting,
        turns=result.iterations,
    )


# -- direct ---------------------------------------------------------------------------------


def window_tokens(lm: LM) -> int:
    """Tokens of the root model's window the data may fill: the window less the reply's
    room (thinking included, where the model thinks) and the prompt around the data."""
    profile = lm.catalog.profile(lm.root_model)
    effort = profile.effort(lm.effort["root"])
    reply = lm.root_max_tokens
    if profile.thinks(profile.thinking_param(lm.thinking_mode["root"], effort)):
        reply += THINKING_ROOM[effort or profile.default_effort or "high"]
    return max(0, profile.context_window - reply - PROMPT_OVERHEAD_TOKENS)


def render_tables(
    tables: Mapping[str, pd.DataFrame], max_chars: int
) -> tuple[str, dict[str, dict[str, int]]]:
    """The tables as CSV within ``max_chars``, and per table the rows shown and in all.

    Smallest table first, each up to an even share of what is left, so small tables (a
    customers table beside the tickets) stay whole and the room they leave goes to the
    larger ones, which are cut at a row boundary.

    >>> text, cut = render_tables({"t": pd.DataFrame({"a": range(100)})}, max_chars=60)
    >>> cut
    {'t': {'shown': 15, 'total': 100}}
    """
    parts: dict[str, str] = {}
    shown: dict[str, dict[str, int]] = {}
    left = max_chars
    line = io.StringIO()
    writer = csv.writer(line, lineterminator="\n")

    def csv_line(values: Iterable[Any]) -> str:
        line.seek(0)
        line.truncate()
        writer.writerow(values)
        return line.getvalue()

    ordered = sorted(tables.items(), key=lambda kv: (len(kv[1]), kv[0]))
    for i, (name, frame) in enumerate(ordered):
        share = left // (len(ordered) - i)
        pieces = [f"## Table {name} ({len(frame):,} rows)\n", csv_line(frame.columns)]
        used = sum(map(len, pieces))
        for row in frame.itertuples(index=False, name=None):
            text = csv_line(row)
            if used + len(text) > share:
                break
            pieces.append(text)
            used += len(text)
        parts[name] = "".join(pieces)
        shown[name] = {"shown": len(pieces) - 2, "total": len(frame)}
        left -= used
    return "\n".join(parts[name] for name in tables), shown


def direct_strategy(task: Task, harness: Harness) -> Attempt:
    """One call: the data in the prompt, as much as the window holds."""
    lm = harness.lm
    window = lm.catalog.profile(lm.root_model).context_window
    budget_chars = window_tokens(lm) * CHARS_PER_TOKEN - len(task.question) - len(DIRECT_SYSTEM)
    tables, shown = render_tables(task.tables, max(0, budget_chars))
    cut = {name: n for name, n in shown.items() if n["shown"] < n["total"]}
    note = ""
    if cut:
        listed = "; ".join(
            f"table {name} shows the first {n['shown']:,} of its {n['total']:,} rows"
            for name, n in cut.items()
        )
        note = DIRECT_TRUNCATION.substitute(window=f"{window:,}", shown=listed)
    user = DIRECT_USER.substitute(tables=tables, truncation=note, question=task.question)
    budget = _budget(task, "direct", harness)
    attempt = Attempt(accounting=budget.accounting, truncation=shown if cut else None)
    try:
        reply = lm.complete(
            role="root",
            model=lm.root_model,
            system=cached_system(DIRECT_SYSTEM),
            messages=[{"role": "user", "content": user}],
            deadline=budget.deadline,
            meter=budget,
        )
        reply.check_not_refused(f"the direct prompt of {task.id}")
    except RLMError as err:
        attempt.error = err
        return attempt
    attempt.text, attempt.turns = reply.text, 1
    return attempt


# -- tools ----------------------------------------------------------------------------------


class ToolRun:
    """One question answered through a Messages-API tool loop over the same functions.

    Each reply's ``tool_use`` blocks run in order; the next user message holds one
    ``tool_result`` per block, with its id (``is_error`` when the call failed), as the API
    requires. The run ends at a reply with ``FINAL(...)`` and no tool call, like agent
    frameworks end theirs; a reply with neither gets a nudge, and after ``max_iterations``
    turns one last turn asks for the answer, as the engine does. A provider or cache failure ends the run (the engine's rule);
    any other error goes back to the model as the tool's result.
    """

    def __init__(self, task: Task, harness: Harness) -> None:
        self.task, self.harness = task, harness
        self.lm, self.limits = harness.lm, harness.limits
        self.warehouse = Warehouse.from_frames(task.tables)
        self.budget = _budget(task, "tools", harness)
        self.semantic = Semantic(self.lm, self.warehouse, self.budget, cache=harness.cache)
        self.messages: list[dict[str, Any]] = []

    def system(self) -> str:
        limits = self.limits
        return TOOLS_SYSTEM.substitute(
            tables=self.warehouse.describe(),
            sub_model=self.lm.sub_model,
            max_sub_calls=f"{limits.max_sub_calls:,}",
            max_cost="unlimited" if limits.max_cost_usd is None else f"${limits.max_cost_usd:.2f}",
            max_iterations=limits.max_iterations,
        )

    def run(self) -> Attempt:
        attempt = Attempt(accounting=self.budget.accounting)
        system = cached_system(self.system())
        self.messages = [{"role": "user", "content": f"Question: {self.task.question}"}]
        try:
            for turn in range(1, self.limits.max_iterations + 2):
                last = turn > self.limits.max_iterations
                self.budget.check()
                reply = self.lm.complete(
                    role="root",
                    model=self.lm.root_model,
                    system=system,
                    messages=_with_cache_mark(self.messages),
                    tools=TOOL_SPECS,
                    deadline=self.budget.deadline,
                    meter=self.budget,
                )
                reply.check_not_refused(f"tools turn {turn} of {self.task.id}")
                attempt.turns = turn
                if not reply.tool_calls and ("FINAL(" in reply.text or last):
                    attempt.text = reply.text
                    return attempt
                if last:
                    raise NoFinalAnswer(
                        f"No final answer after {self.limits.max_iterations} turns and one last "
                        "turn asking for it: the model called a tool instead."
                    )
                # The client keeps each call's name and input, not the block's id: the ids are
                # ours, unique in the conversation, and each tool_result answers its own.
                ids = [f"toolu_eval_{turn:03d}_{i:02d}" for i in range(len(reply.tool_calls))]
                content: list[dict[str, Any]] = []
                if reply.text or not reply.tool_calls:
                    content.append({"type": "text", "text": reply.text or "(empty reply)"})
                content += [
                    {"type": "tool_use", "id": tid, "name": name, "input": args}
                    for tid, (name, args) in zip(ids, reply.tool_calls, strict=True)
                ]
                results: list[dict[str, Any]] = [
                    self.call(tid, name, args)
                    for tid, (name, args) in zip(ids, reply.tool_calls, strict=True)
                ]
                if not results:  # neither a tool call nor FINAL: the engine's nudge, in kind
                    results.append({"type": "text", "text": TOOLS_NUDGE})
                results.append({"type": "text", "text": self._status(turn)})
                self.messages += [
                    {"role": "assistant", "content": content},
                    {"role": "user", "content": results},
                ]
        except RLMError as err:
            attempt.error = err
        finally:
            self.warehouse.close()
        return attempt

    def _status(self, turn: int) -> str:
        """The engine's turn line after each turn, and its last-turn request at the end."""
        most = self.limits.max_iterations
        if turn < most:
            return snippet("turn_status.md", next=turn + 1, max_iterations=most, left=most - turn)
        return TOOLS_LAST_TURN.substitute(max_iterations=most)

    def call(self, tool_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one tool call; its ``tool_result`` block."""
        try:
            text = self._execute(name, args)
            error = False
        except (ModelError, CacheError) as err:
            if isinstance(err, ModelRefused):
                text, error = f"{type(err).__name__}: {err}", True
            else:
                raise
        except (RLMError, ValueError, TypeError, KeyError) as err:
            text, error = f"{type(err).__name__}: {err}", True
        text = truncate(text, self.limits.max_observation_chars)
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id, "content": text}
        if error:
            block["is_error"] = True
        return block

    def _execute(self, name: str, args: dict[str, Any]) -> str:
        if name == "sql":
            table = self.warehouse.query(
                str(args["query"]),
                max_rows=self.limits.max_sql_rows,
                timeout_s=self.limits.cell_timeout_s,
            )
            return _frame_text(table)
        if name == "llm_query":
            return self.semantic.query(str(args["prompt"]))
        if name == "llm_where":
            info, _, stats = self.semantic.where(
                str(args["table"]),
                str(args["predicate"]),
                columns=args.get("columns") or None,
                where=args.get("where") or None,
                limit=args.get("limit"),
            )
            columns = ", ".join(info.columns)
            return (
                f"table {info.name}: {info.rows:,} rows ({columns}); read it with sql(). "
                + stats.describe(deterministic=True)
            )
        raise KeyError(f"no tool named {name!r}; the tools are sql, llm_query and llm_where")


def _frame_text(table: pa.Table, rows: int = 500) -> str:
    """A query result as text: at most ``rows`` rows (the result is then cut to the
    observation limit, as the REPL cuts what code prints)."""
    if table.num_rows == 0:
        return f"(no rows; columns: {', '.join(table.column_names)})"
    text = table.slice(0, rows).to_pandas().to_string(index=False, max_colwidth=300)
    more = table.num_rows - rows
    return text + (
        f"\n... {more:,} more rows (aggregate in SQL or add a LIMIT)" if more > 0 else ""
    )


def _with_cache_mark(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with its last block marked as a prompt-cache breakpoint (as the
    engine marks its own), so the next turn re-reads it at cache price."""
    *head, last = messages
    content = last["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    return [*head, {"role": last["role"], "content": blocks}]


def tools_strategy(task: Task, harness: Harness) -> Attempt:
    """The same functions as separate tools, one JSON call each."""
    return ToolRun(task, harness).run()


STRATEGIES: dict[str, Strategy] = {
    "rlm": rlm_strategy,
    "direct": direct_strategy,
    "tools": tools_strategy,
}


def check_tools_supported(lm: LM) -> str | None:
    """Why the ``tools`` strategy cannot run with this client, or None.

    The client keeps a reply's text and tool calls but not its thinking blocks' signatures,
    and the Messages API wants a thinking model's thinking block back in front of the
    ``tool_use`` it answers; so the tool loop runs only where the root does not think up
    front (``--root-thinking off`` on models that can turn it off)."""
    profile = lm.catalog.profile(lm.root_model)
    thinking = profile.thinking_param(lm.thinking_mode["root"], profile.effort(lm.effort["root"]))
    if not profile.thinks(thinking):
        return None
    fix = (
        "use --root-thinking off (all strategies then run without up-front thinking), or"
        if lm.thinking_mode["root"] != "off"
        else "this model cannot turn thinking off at this effort, so"
    )
    return (
        f"the tools strategy cannot run with root model {lm.root_model!r} thinking: the client "
        "does not keep thinking blocks (with their signatures) to send back with tool results. "
        f"To compare, {fix} leave tools out with --strategies rlm,direct."
    )
