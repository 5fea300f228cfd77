"""The root loop of a Recursive Language Model. No Dagster here.

    >>> wh = Warehouse.from_frames({"tickets": tickets_df})  # doctest: +SKIP
    >>> result = run_rlm("How many tickets mention a refund?", warehouse=wh, lm=lm)  # doctest: +SKIP
    >>> result.answer_text  # doctest: +SKIP
    '42 tickets mention a refund.'

Each turn: the root model replies; every ```repl``` / ```python``` block in the reply runs in
the REPL worker, in order; the real outputs (truncated, with a note) go back as the next user
message. The run ends when code calls ``FINAL(value)`` (or ``FINAL_VAR``, or sets
``answer["ready"] = True``), or when the reply's text outside code says ``FINAL(...)`` /
``FINAL_VAR(name)``. After ``max_iterations`` turns one last call asks for the answer; if
none comes, :class:`NoFinalAnswer` carries the trajectory.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from rlm_dagster.cache import CacheStore
from rlm_dagster.engine.budget import Budget, Limits
from rlm_dagster.engine.events import (
    ChildStarted,
    Event,
    IterationDone,
    RunWarning,
    TurnStarted,
    WhereDone,
)
from rlm_dagster.errors import (
    AnswerRejected,
    CacheError,
    ConfigError,
    ModelError,
    ModelRefused,
    NoFinalAnswer,
    QueryError,
    RLMError,
)
from rlm_dagster.models.client import LM, Accounting, Usage, cached_system
from rlm_dagster.prompts import render, snippet
from rlm_dagster.redact import redact
from rlm_dagster.repl import CellResult, Worker
from rlm_dagster.repl.forkserver import ForkedWorker, ForkServer
from rlm_dagster.repl.host import cut_middle
from rlm_dagster.repl.protocol import decode_arrow, encode_arrow, frame_to_arrow
from rlm_dagster.repl.sandbox import WorkerLimits
from rlm_dagster.repl.seam import REPL, REPLFactory
from rlm_dagster.semantic import Semantic, WhereConfig, WhereStats
from rlm_dagster.sql.output import OutputSchema
from rlm_dagster.sql.spool import SpooledTable
from rlm_dagster.sql.tables import TableSource
from rlm_dagster.sql.warehouse import TableInfo, Warehouse

# Columns of the answer table the asset writes itself.
RESERVED_COLUMNS = frozenset({"_partition"})

_CODE_BLOCK = re.compile(r"^```[ \t]*(repl|python|py)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)
_ANY_FENCE = re.compile(r"^```.*?^[ \t]*```[ \t]*$", re.M | re.S)
_FINAL_VAR = re.compile(r"^[ \t]*FINAL_VAR\(\s*[\"']?([A-Za-z_]\w*)[\"']?\s*\)", re.M)
_FINAL = re.compile(r"^[ \t]*FINAL\(", re.M)


# -- parsing replies --------------------------------------------------------------------------


def extract_code_blocks(text: str) -> list[str]:
    """The code of every fenced block tagged ``repl``, ``python`` or ``py``, in order.

    >>> extract_code_blocks("look:\\n```repl\\nprint(1)\\n```\\n```sql\\nSELECT 1\\n```")
    ['print(1)\\n']
    """
    return [m.group(2) for m in _CODE_BLOCK.finditer(text)]


def find_text_final(text: str) -> tuple[str, str] | None:
    """A ``FINAL(...)`` or ``FINAL_VAR(name)`` written as text outside code blocks.

    >>> find_text_final("Done.\\nFINAL(42 tickets)")
    ('FINAL', '42 tickets')
    >>> find_text_final("```repl\\nFINAL(x)\\n```") is None
    True
    """
    prose = _ANY_FENCE.sub("", text)
    if m := _FINAL_VAR.search(prose):
        return "FINAL_VAR", m.group(1)
    if m := _FINAL.search(prose):
        body = prose[m.end() :].rstrip()
        close = body.rfind(")")
        body = body[:close] if close >= 0 else body
        body = body.strip()
        if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
            body = body[1:-1]
        return "FINAL", body
    return None


def truncate(text: str, limit: int, dropped: int = 0) -> str:
    """``text`` cut to ``limit`` characters, with a note saying how much was not shown.

    >>> truncate("abcdef", 3)
    'abc\\n[output truncated: 3 more characters not shown. Print less: counts, summaries, .head().]'
    """
    hidden = dropped + max(0, len(text) - limit)
    if not hidden:
        return text
    return (
        text[:limit]
        + f"\n[output truncated: {hidden:,} more characters not shown. Print less: counts, "
        "summaries, .head().]"
    )


# -- results ----------------------------------------------------------------------------------


@dataclass
class Answer:
    """A final answer: text, a table, or both (a table's text is its preview)."""

    text: str
    table: pa.Table | None = None
    form: str = "FINAL"


@dataclass
class Turn:
    """One root-model turn: its reply, the cells it ran, and the spend after it."""

    iteration: int
    reply: str
    cells: list[CellResult] = field(default_factory=list)
    thinking: str = ""  # the model's thinking text (empty where the model omits it)
    thinking_tokens: int = 0
    note: str = ""
    sub_calls: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    children: list[RLMResult] = field(default_factory=list)  # rlm_query runs of this turn


@dataclass
class RLMResult:
    """What a run produced and what it cost."""

    question: str
    answer: Answer
    turns: list[Turn]
    accounting: Accounting
    duration_s: float
    limits: Limits
    run_id: str = "r0"
    depth: int = 0
    where_stats: list[WhereStats] = field(default_factory=list)  # this run and its children
    # Who answered and where the code ran: the provider ("demo" for the offline demo model),
    # the models, and the sandbox level with its layers.
    provider: str = ""
    root_model: str = ""
    sub_model: str = ""
    sandbox: str = ""
    # Content fingerprints of the bound tables (what a data version is computed from).
    inputs: dict[str, str] = field(default_factory=dict)
    # Every row the run's llm_where calls judged, with its verdict (Semantic.verdicts), in a
    # file: read it with .reader() or .read_all(); .close() deletes it.
    verdicts: SpooledTable | None = None

    @property
    def answer_text(self) -> str:
        return self.answer.text

    @property
    def where_undecided_rows(self) -> int:
        """Rows llm_where left NULL (failed or refused), over the whole call tree."""
        return sum(s.failed for s in self.where_stats)

    @property
    def where_clipped_rows(self) -> int:
        """Rows llm_where judged on a clipped value, over the whole call tree."""
        return sum(s.clipped for s in self.where_stats)

    def call_tree(self) -> list[dict[str, Any]]:
        """This run and every child run under it: id, parent, depth, question, turns, answer."""
        parent, _, _ = self.run_id.rpartition(".")
        nodes = [
            {
                "id": self.run_id,
                "parent": parent or None,
                "depth": self.depth,
                "question": _clip(" ".join(self.question.split()), 200),
                "iterations": self.iterations,
                "answer": _clip(" ".join(self.answer.text.split()), 200),
            }
        ]
        for turn in self.turns:
            for child in turn.children:
                nodes += child.call_tree()
        return nodes

    @property
    def iterations(self) -> int:
        return len(self.turns)

    def trajectory_markdown(self, max_chars: int = 1_500) -> str:
        return render_trajectory(self.turns, max_chars)

    def trajectory_table(self) -> pa.Table:
        """The whole trajectory, nothing clipped, one row per piece: the run (and child run)
        id and depth, the turn, the cell, what it is (``reply``, ``thinking``, ``code``,
        ``output``, ``error``, ``note``, ``answer``) and its text, key-shaped strings
        redacted. What the Markdown trajectory clips is here in full."""
        rows: list[dict[str, Any]] = []

        def walk(result: RLMResult) -> None:
            for t in result.turns:
                pieces: list[tuple[int | None, str, str]] = [
                    (None, "reply", t.reply),
                    (None, "thinking", t.thinking),
                ]
                for i, cell in enumerate(t.cells, 1):
                    pieces += [(i, "code", cell.code), (i, "output", cell.output)]
                    pieces.append((i, "error", cell.error or ""))
                pieces.append((None, "note", t.note))
                for cell_no, kind, text in pieces:
                    if text:
                        rows.append(
                            {
                                "run_id": result.run_id,
                                "depth": result.depth,
                                "turn": t.iteration,
                                "cell": cell_no,
                                "kind": kind,
                                "text": redact(text),
                            }
                        )
                for child in t.children:
                    walk(child)
            rows.append(
                {
                    "run_id": result.run_id,
                    "depth": result.depth,
                    "turn": None,
                    "cell": None,
                    "kind": "answer",
                    "text": redact(result.answer.text),
                }
            )

        walk(self)
        schema = pa.schema(
            [
                ("run_id", pa.string()),
                ("depth", pa.int64()),
                ("turn", pa.int64()),
                ("cell", pa.int64()),
                ("kind", pa.string()),
                ("text", pa.string()),
            ]
        )
        return pa.Table.from_pylist(rows, schema=schema)


def render_trajectory(turns: list[Turn], max_chars: int = 1_500) -> str:
    """The trajectory as Markdown: each turn's reply, code and (clipped) output, with
    key-shaped strings redacted. Everything the model or its code wrote is inside a fence
    longer than any backtick run in it, so it renders as text: it cannot close its block, or
    add headings, links, images or HTML to the page."""
    parts: list[str] = []
    for t in turns:
        parts.append(
            f"### Turn {t.iteration} · {t.seconds:.1f} s · {t.sub_calls} sub-calls · "
            f"${t.cost_usd:.4f} so far"
        )
        # Thinking is shown apart from the reply, clipped and labelled, never as the model's
        # prose; most 5.x models omit its text, and then only its size is shown.
        if t.thinking.strip():
            thought = _clip(" ".join(t.thinking.split()), min(max_chars, 600))
            parts.append(f"_thinking ({t.thinking_tokens:,} tokens):_\n" + fenced(thought))
        elif t.thinking_tokens:
            parts.append(f"_thought for {t.thinking_tokens:,} tokens (text not returned)_")
        prose = _ANY_FENCE.sub("", t.reply).strip()
        if prose:
            parts.append(fenced(_clip(prose, max_chars)))
        for i, cell in enumerate(t.cells, 1):
            parts.append(
                f"**cell {i}** ({cell.seconds:.2f} s)\n"
                + fenced(_clip(cell.code, max_chars), "python")
            )
            shown = (cell.output + (f"\n{cell.error}" if cell.error else "")).strip()
            if shown:
                parts.append(fenced(_clip(shown, max_chars)))
        if t.note:
            parts.append(fenced(t.note))
        for child in t.children:
            inner = render_trajectory(child.turns, max_chars)
            parts.append(
                f"**child RLM {child.run_id}** (depth {child.depth}):\n"
                + fenced(_clip(child.question, 300))
                + "\n\n"
                + "\n".join("> " + line for line in inner.splitlines())
                + f"\n\n**{child.run_id} answered:**\n"
                + fenced(_clip(child.answer.text, max_chars))
            )
    return redact("\n\n".join(parts))


def fenced(text: str, lang: str = "text") -> str:
    """``text`` in a fenced code block that nothing inside it can close.

    >>> print(fenced("a ``` b"))
    ````text
    a ``` b
    ````
    """
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def _clip(text: str, n: int) -> str:
    more = len(text) - n
    return text if more <= 0 else text[:n] + f" …[{more:,} more chars: see the trajectory table]"


# -- the run ------------------------------------------------------------------------------------


class RLMRun:
    """One run: a worker, a budget, the semantic engine, and the root loop over them."""

    def __init__(
        self,
        question: str,
        *,
        warehouse: TableSource,
        lm: LM,
        limits: Limits | None = None,
        output: OutputSchema | None = None,
        on_event: Callable[[Event], None] | None = None,
        sandbox: str = "auto",
        where_config: WhereConfig | None = None,
        context: Any = None,
        depth: int = 0,
        run_id: str = "r0",
        budget: Budget | None = None,
        worker_limits: WorkerLimits | None = None,
        where_stats: list[WhereStats] | None = None,
        repl: REPLFactory | None = None,
        tags: Mapping[str, Any] | None = None,
        cache: CacheStore | None = None,
        replay: bool = True,
    ) -> None:
        self.question = question
        # Shared with child runs, like the budget: the metadata counts the whole call tree.
        self.where_stats = [] if where_stats is None else where_stats
        self.worker_limits = worker_limits
        self.warehouse = warehouse
        self.lm = lm
        self.limits = limits or Limits()
        self.output = output
        self.on_event = on_event or (lambda event: None)
        self.sandbox = sandbox
        self.where_config = where_config
        self.context = context
        self.depth = depth
        self.run_id = run_id
        # The run's store of verdicts, leases and ledger rows: given, or the client's call
        # store when that is one (run(lm=LM(cache=open_cache(...))) keeps working).
        if cache is None and isinstance(lm.cache, CacheStore):
            cache = lm.cache
        self.cache = cache
        # A child run shares its parent's budget: its spend counts as it happens.
        # The run's meter: its own accounting and ledger tags, never the shared client's.
        if budget is None:
            tags = dict(tags or {})
            tags.setdefault("run_id", uuid.uuid4().hex)
            budget = Budget(self.limits, ledger=self.cache, tags=tags, replay=replay)
        self.budget = budget
        self.semantic = Semantic(
            lm,
            warehouse,
            self.budget,
            cache=self.cache,
            config=where_config,
            on_event=self.on_event,
            depth=depth,
        )
        self._child_ids = itertools.count(1)
        self._turn_children: list[RLMResult] = []
        self.messages: list[dict[str, Any]] = []
        self.turns: list[Turn] = []
        self.final: Answer | None = None
        self._fatal: RLMError | None = None
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "sql": self._sql,
            "llm_query": lambda a: self.semantic.query(a["prompt"], a.get("model")),
            "llm_query_batched": lambda a: self.semantic.query_batched(
                a["prompts"], a.get("model")
            ),
            "llm_where": self._llm_where,
            "rlm_query": lambda a: self._rlm_query(str(a["prompt"]), a.get("context")),
            "rlm_query_batched": self._rlm_query_batched,
            "final": lambda a: self._accept(a["value"], "FINAL"),
        }
        # The sandboxed worker process; engine tests may pass an in-process double.
        self.repl_factory: REPLFactory = repl or Worker
        # Child runs' REPLs: forks of one fork server per run tree (started on the first
        # child, owned by the run that started it), not a new process each.
        self._fork_server: ForkServer | None = None
        self._fork_lock = threading.Lock()
        self.worker: REPL = self.repl_factory(
            {name: self._fatal_guard(fn) for name, fn in handlers.items()},
            tables=self._table_infos,
            cell_timeout_s=self.limits.cell_timeout_s,
            max_capture_chars=max(4 * self.limits.max_observation_chars, 100_000),
            sandbox=sandbox,
            context=context,
            limits=worker_limits,
        )

    # -- handlers the worker calls ----------------------------------------------------------

    def _fatal_guard(
        self, handler: Callable[[dict[str, Any]], Any]
    ) -> Callable[[dict[str, Any]], Any]:
        """Remember a failure the model's code must not work around: a provider error (after
        retries, or one a retry cannot fix) or a cache that cannot be written. The cell sees
        the error, every later call fails the same way at once, and the run ends with it
        after the cell, whatever the code did with the exception. A refusal is about one
        prompt's content, not the provider: the model may rephrase."""

        def call(args: dict[str, Any]) -> Any:
            if self._fatal is not None:
                raise self._fatal
            try:
                return handler(args)
            except (ModelError, CacheError) as err:
                if not isinstance(err, ModelRefused) and self._fatal is None:
                    self._fatal = err
                raise

        return call

    def _table_infos(self) -> list[dict[str, Any]]:
        return [_table_dict(t) for t in self.warehouse.tables.values()]

    def _sql(self, args: dict[str, Any]) -> dict[str, Any]:
        table = self.warehouse.query(
            str(args["query"]),
            max_rows=self.limits.max_sql_rows,
            # stop a little before the cell's own deadline, so the model reads why
            timeout_s=max(0.1, self.worker.cell_time_left() - 0.5),
        )
        return {"arrow": encode_arrow(table)}

    def _llm_where(self, args: dict[str, Any]) -> dict[str, Any]:
        table, predicate = str(args["table"]), str(args["predicate"])
        columns, where = args.get("columns"), args.get("where")
        batches = args.get("batches")
        if args.get("dry_run"):
            plan = self.semantic.plan(
                table,
                predicate,
                columns=columns,
                where=where,
                batches=batches,
                recall=args.get("recall"),
                precision=args.get("precision"),
                on_miss=args.get("on_miss"),
            )
            return {"plan": plan.as_dict()}
        info, provenance, stats = self.semantic.where(
            table,
            predicate,
            columns=columns,
            where=where,
            limit=args.get("limit"),
            batches=batches,
            recall=args.get("recall"),
            precision=args.get("precision"),
            on_miss=args.get("on_miss"),
        )
        self.where_stats.append(stats)
        self.on_event(WhereDone(stats))
        return {
            **_table_dict(info),
            "provenance": _table_dict(provenance),
            "summary": stats.describe(deterministic=True),
        }

    def _rlm_query(self, prompt: str, context: Any = None) -> str:
        """A child RLM one level deeper, sharing tables and budget; at the depth limit, a plain
        sub-call with the context appended to the prompt."""
        context = _context_from_worker(context)
        if self.depth + 1 >= self.limits.max_depth:
            text = (
                prompt
                if context is None
                else snippet("child_fallback.md", prompt=prompt, context=_context_text(context))
            )
            return self.semantic.query(text)
        child = RLMRun(
            prompt,
            warehouse=self.warehouse,
            lm=self.lm,
            limits=self.limits,
            on_event=self.on_event,
            sandbox=self.sandbox,
            where_config=self.where_config,
            context=context,
            depth=self.depth + 1,
            run_id=f"{self.run_id}.{next(self._child_ids)}",
            budget=self.budget,
            worker_limits=self.worker_limits,
            where_stats=self.where_stats,
            repl=self._child_repl(),
            cache=self.cache,
        )
        self.on_event(ChildStarted(run_id=child.run_id, depth=child.depth))
        try:
            result = child.run()
        except NoFinalAnswer as err:
            # Not a text that looks like an answer: an error the parent's code must handle
            # (or let end its cell), so no placeholder can reach a final answer unnoticed.
            self._turn_children.append(err.trajectory)
            raise NoFinalAnswer(
                f"child RLM {child.run_id} gave no final answer in "
                f"{self.limits.max_iterations} iterations (its turns are in the trajectory). "
                "Ask it something narrower, split its part into smaller questions, or work "
                "that part out in this REPL.",
                trajectory=err.trajectory,
            ) from None
        self._turn_children.append(result)
        return result.answer_text

    def _child_repl(self) -> REPLFactory:
        """What a child run's REPL is made by: this run's factory, except that sandboxed
        workers become forks of a fork server (a few ms each instead of a new process's
        ~0.4 s of CPU), shared by the whole tree of child runs."""
        if self.repl_factory is not Worker:
            return self.repl_factory
        with self._fork_lock:
            if self._fork_server is None:
                self._fork_server = ForkServer(sandbox=self.sandbox, limits=self.worker_limits)
            return self._fork_server

    def _rlm_query_batched(self, args: dict[str, Any]) -> list[str]:
        prompts = [str(p) for p in args["prompts"]]
        contexts = args.get("contexts") or [None] * len(prompts)
        if len(contexts) != len(prompts):
            raise ValueError("rlm_query_batched: give one context per prompt (or none)")
        workers = max(1, min(len(prompts), self.lm.max_concurrency, 4))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rlm-child") as pool:
            return list(pool.map(self._rlm_query, prompts, contexts))

    def _accept(self, value: dict[str, Any], form: str) -> None:
        """Validate a final value against the output schema; raise to tell the model why not."""
        kind = value.get("kind")
        table: pa.Table | None = None
        if kind == "table":
            name = str(value["name"])
            self.warehouse.info(name)
            table = self.warehouse.trusted_arrow(f'SELECT * FROM "{name}"')
        elif kind == "frame":
            table = decode_arrow(str(value["arrow"]))
        reserved = sorted(RESERVED_COLUMNS & set(table.column_names)) if table is not None else []
        if reserved:
            raise AnswerRejected(
                f"FINAL rejected: column name(s) {reserved} are reserved (the asset writes them, "
                "e.g. the partition key); rename them, then call FINAL again."
            )
        if self.output is not None:
            if table is None:
                raise AnswerRejected(
                    f"FINAL rejected: this asset needs a table with columns ({self.output.describe()}), "
                    "not text. Build a DataFrame or use a table handle and call FINAL(df)."
                )
            table = self.output.conform(table)
        text = str(value.get("text", "")) if table is None else table_preview(table)
        self.final = Answer(text=text, table=table, form=form)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> RLMResult:
        started = time.monotonic()
        if self.depth + 1 < self.limits.max_depth and self.repl_factory is Worker:
            # Children are possible: start their fork server while the root model thinks.
            server = self._child_repl()
            assert isinstance(server, ForkServer)
            threading.Thread(target=server.warm, name="rlm-fork-server", daemon=True).start()
        if isinstance(self.worker, (Worker, ForkedWorker)):
            # Start the REPL while the root model thinks: ready by the time its first cell is.
            self.worker.prestart()
        output_instructions = "\n" + (
            snippet("answer_table.md", columns=self.output.describe())
            if self.output
            else snippet("answer_text.md")
        )
        system = cached_system(
            render(
                "system.md",
                tables=self.warehouse.describe(),
                sub_model=self.lm.sub_model,
                max_sub_calls=f"{self.limits.max_sub_calls:,}",
                max_cost="unlimited"
                if self.limits.max_cost_usd is None
                else f"${self.limits.max_cost_usd:.2f}",
                max_iterations=self.limits.max_iterations,
                output_instructions=output_instructions,
                context=_context_description(self.context),
            )
        )
        if self.depth == 0:
            self._announce_profiles()
        messages: list[dict[str, Any]] = self.messages
        messages[:] = [
            {
                "role": "user",
                "content": snippet(
                    "first_turn.md",
                    question=self.question,
                    max_iterations=self.limits.max_iterations,
                ),
            }
        ]
        try:
            for iteration in range(1, self.limits.max_iterations + 1):
                self._turn(iteration, system, messages)
                if self.final is not None:
                    break
            if self.final is None:
                messages[-1]["content"] += "\n\n" + render(
                    "final_answer.md",
                    max_iterations=self.limits.max_iterations,
                    output_instructions=output_instructions.replace("## Your answer\n", ""),
                )
                self._turn(self.limits.max_iterations + 1, system, messages, last=True)
        except RLMError as err:
            # Every failure carries the trajectory so far (the outermost run's, set last).
            err.partial = self._partial(started)
            raise
        finally:
            self.worker.close()
            if self._fork_server is not None:
                self._fork_server.close()
        if self.final is None:
            raise NoFinalAnswer(
                f"No final answer after {self.limits.max_iterations} iterations (and one last "
                "call asking for it). Raise max_iterations, or make the question narrower; the "
                "trajectory is attached.",
                trajectory=self._partial(started),
            )
        return self._partial(started)

    def _announce_profiles(self) -> None:
        """Say once per run which models run on the conservative profile."""
        for role, model in (("root", self.lm.root_model), ("sub", self.lm.sub_model)):
            if not self.lm.catalog.profile(model).known:
                self.on_event(
                    RunWarning(
                        f"{role} model {model!r} is not in rlm_dagster's model table: it runs "
                        "with the conservative profile (no effort or thinking settings, no "
                        "structured outputs, llm_where verdicts through an offered tool, "
                        "4,096 output tokens, compaction at 32K context). Declare what it "
                        f"supports with RLMResource(model_profiles={{{model!r}: {{...}}}})."
                    )
                )
                if self.lm.sub_model == self.lm.root_model:
                    break
        if self.limits.max_cost_usd is not None:
            unpriced = sorted(
                {m for m in (self.lm.root_model, self.lm.sub_model) if not self._priced(m)}
            )
            if unpriced:
                self.on_event(
                    RunWarning(
                        f"max_cost_usd=${self.limits.max_cost_usd:g} cannot be enforced for "
                        f"{', '.join(map(repr, unpriced))}: its price is unknown, so its calls "
                        "count as $0 (max_tokens, max_sub_calls and max_wall_time_s still "
                        "apply). Declare its price with RLMResource(model_profiles={model: "
                        "{'input_usd_per_mtok': ..., 'output_usd_per_mtok': ...}})."
                    )
                )

    def _priced(self, model: str) -> bool:
        return self.lm.catalog.cost_usd(model, Usage(input_tokens=1)) is not None

    def _partial(self, started: float) -> RLMResult:
        return RLMResult(
            question=self.question,
            answer=self.final or Answer(text=""),
            turns=list(self.turns),
            accounting=self.budget.accounting,
            duration_s=time.monotonic() - started,
            limits=self.limits,
            run_id=self.run_id,
            depth=self.depth,
            where_stats=self.where_stats,
            provider=self.lm.provider,
            root_model=self.lm.root_model,
            sub_model=self.lm.sub_model,
            sandbox=f"{self.worker.level} ({', '.join(self.worker.layers) or 'no layers'})",
        )

    def _turn(
        self,
        iteration: int,
        system: list[dict[str, Any]],
        messages: list[dict[str, Any]],
        last: bool = False,
    ) -> None:
        t0 = time.monotonic()
        self.budget.check()
        compact(messages, int(0.75 * self._context_budget()))
        self.on_event(
            TurnStarted(
                run_id=self.run_id,
                depth=self.depth,
                iteration=iteration,
                max_iterations=self.limits.max_iterations,
                model=self.lm.root_model,
            )
        )
        reply = self.lm.complete(
            role="root",
            model=self.lm.root_model,
            system=system,
            messages=_with_cache_mark(messages),
            depth=self.depth,
            deadline=self.budget.deadline,
            meter=self.budget,
        )
        reply.check_not_refused(f"root turn {iteration} of run {self.run_id}")
        turn = Turn(
            iteration=iteration,
            reply=reply.text,
            thinking=reply.thinking,
            thinking_tokens=reply.record.usage.thinking_tokens,
        )
        self.turns.append(turn)
        self._turn_children = turn.children
        notes: list[str] = []
        observations: list[str] = []
        blocks = extract_code_blocks(reply.text)
        for i, code in enumerate(blocks, 1):
            cell = self.worker.execute(code, deadline=self.budget.deadline)
            turn.cells.append(cell)
            if self._fatal is not None:
                raise self._fatal
            observations.append(self._observation(i, len(blocks), cell))
            if cell.answer is not None and self.final is None:
                self._try_accept(cell.answer, "answer dict", notes)
            if self.final is not None:
                break
            self.budget.check()
        if self.final is None and (text_final := find_text_final(reply.text)):
            code_failed = any(c.error for c in turn.cells)
            if code_failed:
                notes.append(snippet("note_text_final_ignored.md"))
            else:
                self._text_final(*text_final, notes)
        if blocks and _FAKE_OUTPUT.search(reply.text):
            notes.append(snippet("note_fake_output.md"))
        if reply.stop_reason == "max_tokens":
            notes.append(
                snippet("note_cut_off_before_code.md")
                if not blocks and self.final is None
                else snippet("note_cut_off_in_code.md")
            )
        if not blocks and self.final is None and not notes:
            notes.append(snippet("nudge.md"))
        turn.note = "; ".join(notes)
        turn.sub_calls = self.budget.sub_calls_started
        turn.cost_usd = self.budget.accounting.cost_usd
        turn.seconds = time.monotonic() - t0
        self.on_event(
            IterationDone(
                run_id=self.run_id,
                depth=self.depth,
                iteration=iteration,
                max_iterations=self.limits.max_iterations,
                cells=len(turn.cells),
                code_lines=sum(len(c.code.splitlines()) for c in turn.cells),
                output_chars=sum(len(c.output) for c in turn.cells),
                errors=sum(1 for c in turn.cells if c.error),
                sub_calls=turn.sub_calls,
                cost_usd=turn.cost_usd,
                final=self.final is not None,
                note=turn.note,
            )
        )
        if self.final is None and not last:
            remaining = self.limits.max_iterations - iteration
            # Observations hold nothing that changes when a retried run replays its calls from
            # the cache (no timings, no spend): the same code then gives the same next request.
            status = snippet(
                "turn_status.md",
                next=iteration + 1,
                max_iterations=self.limits.max_iterations,
                left=remaining,
            )
            body = "\n\n".join(
                observations + ([f"[note] {turn.note}"] if turn.note else []) + [status]
            )
            messages += [
                {"role": "assistant", "content": reply.text or "(empty reply)"},
                {"role": "user", "content": body},
            ]

    def _context_budget(self) -> int:
        """Tokens the conversation may grow to: the asset's limit, the root model's window, and
        its long-prompt price threshold (past which the whole turn costs more)."""
        profile = self.lm.catalog.profile(self.lm.root_model)
        return min(
            self.limits.context_window_tokens,
            profile.context_window,
            profile.long_prompt_threshold or profile.context_window,
        )

    def _observation(self, i: int, n: int, cell: CellResult) -> str:
        """What the model reads of a cell: its output and its error share one cap
        (``max_observation_chars``); a long error keeps its start and its end."""
        cap = self.limits.max_observation_chars
        error = cut_middle(cell.error or "", cap // 2)
        out = truncate(cell.output, max(0, cap - len(error)), cell.dropped_chars)
        head = f"[cell {i} of {n}]"
        body = out if out.strip() else "(no output)"
        if error:
            body = (out + "\n" if out.strip() else "") + error
        return f"{head}\n{body}"

    def _try_accept(self, value: dict[str, Any], form: str, notes: list[str]) -> None:
        try:
            self._accept(value, form)
        except RLMError as err:
            notes.append(str(err))

    def _text_final(self, form: str, arg: str, notes: list[str]) -> None:
        if form == "FINAL_VAR":
            try:
                value = self.worker.get_var(arg)
            except NameError as err:
                notes.append(f"FINAL_VAR({arg}) rejected: {err}")
                return
            self._try_accept(value, "FINAL_VAR (text)", notes)
        else:
            self._try_accept({"kind": "text", "text": arg}, "FINAL (text)", notes)


_FAKE_OUTPUT = re.compile(
    r"^```[ \t]*(?:output|text|console|stdout|repl[-_ ]?output)[ \t]*$"
    r"|^[ \t]*(?:#+[ \t]*)?(?:repl[ \t]+)?(?:output|stdout|execution result)[ \t]*:",
    re.I | re.M,
)


def compact(messages: list[dict[str, Any]], max_tokens: int, keep_turns: int = 3) -> bool:
    """Fold old turns into a short digest when the conversation nears ``max_tokens``.

    The question (first message) and the last ``keep_turns`` turns stay verbatim; each older
    turn becomes one line (its first code line and the start of its output). Deterministic,
    so a replayed run compacts identically. Returns whether anything was compacted.
    """
    keep = 2 * keep_turns
    if len(messages) <= keep + 1 or _estimate_tokens(messages) <= max_tokens:
        return False
    head, middle, tail = messages[0], messages[1:-keep], messages[-keep:]
    lines = []
    for reply, observation in zip(middle[::2], middle[1::2], strict=False):
        code = extract_code_blocks(str(reply["content"]))
        first = code[0].strip().splitlines()[0] if code and code[0].strip() else "(no code)"
        seen = " ".join(str(observation["content"]).split())[:300]
        lines.append(f"- ran `{first[:120]}` -> {seen}")
    digest = "\n\n" + snippet("compacted.md", turns=len(lines)) + "\n" + "\n".join(lines)
    messages[:] = [{"role": "user", "content": str(head["content"]) + digest}, *tail]
    return True


def _estimate_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m["content"])) for m in messages) // 4


def _context_description(context: Any) -> str:
    """What the system prompt says about the ``context`` variable."""
    if context is None:
        return ""
    if isinstance(context, str):
        shape = f"a str of {len(context):,} characters"
    elif isinstance(context, list):
        kinds = sorted({type(x).__name__ for x in context[:100]})
        shape = f"a list of {len(context):,} items ({', '.join(kinds) or 'empty'})"
    elif isinstance(context, dict) and context.get("kind") == "frame":
        shape = "a pandas DataFrame"
    elif isinstance(context, dict):
        shape = f"a dict with keys {', '.join(map(str, list(context)[:20]))}"
    else:
        shape = f"a {type(context).__name__}"
    return "\n" + snippet("context.md", shape=shape)


def _context_from_worker(context: Any) -> Any:
    """A child's context as model code sent it, checked before the host builds anything from
    it: JSON values, or a DataFrame as the worker's JSON frame (re-encoded here). Arrow from
    the worker is never decoded: the host only reads Arrow it wrote itself."""
    if isinstance(context, dict) and context.get("kind") == "frame" and "arrow" not in context:
        return {"kind": "frame", "arrow": encode_arrow(frame_to_arrow(context.get("frame")))}
    if isinstance(context, dict) and "arrow" in context:
        raise QueryError(
            "rlm_query context= must be text, a list, a dict of JSON values or a DataFrame."
        )
    return context


def _context_text(context: Any) -> str:
    return context if isinstance(context, str) else json.dumps(context, default=str)[:200_000]


def _table_dict(info: TableInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "columns": list(info.columns),
        "types": list(info.types),
        "rows": info.rows,
    }


def _with_cache_mark(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with the last one marked as a prompt-cache breakpoint, so the next turn
    re-reads this whole conversation at cache price."""
    *head, last = messages
    marked = {
        "role": last["role"],
        "content": [
            {"type": "text", "text": last["content"], "cache_control": {"type": "ephemeral"}}
        ],
    }
    return [*head, marked]


def table_preview(table: pa.Table, rows: int = 20) -> str:
    """The first ``rows`` rows as fixed-width text."""
    text = table.slice(0, rows).to_pandas().to_string(index=False, max_colwidth=60)
    more = table.num_rows - rows
    return text + (f"\n… {more:,} more rows" if more > 0 else "")


def run_rlm(question: str, *, warehouse: Warehouse, **options: Any) -> RLMResult:
    """:func:`run` with ``tables=warehouse``, under its first name; ``run`` is the one API and
    takes the same ``options``."""
    return run(question, tables=warehouse, **options)


def run(
    question: str,
    *,
    lm: LM,
    context: Any = None,
    tables: Warehouse | Mapping[str, Any] | None = None,
    limits: Limits | None = None,
    output: OutputSchema | dict[str, str] | None = None,
    on_event: Callable[[Event], None] | None = None,
    sandbox: str = "auto",
    where_config: WhereConfig | None = None,
    repl: REPLFactory | None = None,
    tags: Mapping[str, Any] | None = None,
    replay: bool = True,
) -> RLMResult:
    """Run an RLM without Dagster, over a long ``context`` and/or ``tables``.

        >>> result = run("Which chapter introduces the villain?", context=book_text, lm=lm)  # doctest: +SKIP

    ``context`` is bound as the REPL variable ``context`` (a str, a list of documents, a dict,
    or a pandas DataFrame); ``tables`` is a :class:`Warehouse` or a mapping of names to
    DataFrames / Arrow tables, each bound as a table. ``repl`` replaces the sandboxed worker
    (tests only: an in-process double never confines model code). ``tags`` label the run's
    ledger rows (``run_id``, ``asset``, ``partition``; a fresh ``run_id`` by default).
    ``replay=False`` asks for a fresh answer: calls and verdicts in the cache are not
    replayed (what the run pays for is still cached).

    Runs may share one ``lm`` (one client, in threads at once): each run has its own budget,
    accounting and ledger tags.
    """
    warehouse = tables if isinstance(tables, Warehouse) else Warehouse.from_frames(tables or {})
    schema = OutputSchema.parse(output) if isinstance(output, dict) else output
    return RLMRun(
        question,
        warehouse=warehouse,
        lm=lm,
        limits=limits,
        output=schema,
        on_event=on_event,
        sandbox=sandbox,
        where_config=where_config,
        context=wire_context(context),
        repl=repl,
        tags=tags,
        replay=replay,
    ).run()


def wire_context(context: Any) -> Any:
    """A context value in the form the REPL worker receives: JSON, or a DataFrame as Arrow."""
    if context is None or isinstance(context, str | int | float | bool):
        return context
    if isinstance(context, pd.DataFrame | pa.Table):
        table = (
            context
            if isinstance(context, pa.Table)
            else pa.Table.from_pandas(context, preserve_index=False)
        )
        return {"kind": "frame", "arrow": encode_arrow(table)}
    if isinstance(context, list | tuple | dict):
        json.dumps(context, default=str)  # fail here, not in the worker, if it cannot travel
        return json.loads(json.dumps(context, default=str))
    raise ConfigError(
        f"context must be a str, list, dict or DataFrame, not {type(context).__name__}; convert it first"
    )
