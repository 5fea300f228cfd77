"""A fake Anthropic Messages API on 127.0.0.1, for testing RLM pipelines without a real model.

:class:`FakeAnthropic` is a real HTTP server (stdlib only) that speaks enough of
``POST /v1/messages`` for the official ``anthropic`` SDK to parse its replies, retry its
faults and honour its ``retry-after`` headers. Point a client at :attr:`FakeAnthropic.base_url`
and script what the "model" says::

    >>> import anthropic
    >>> from rlm_dagster.testing import FakeAnthropic, Fault
    >>> with FakeAnthropic(root=["FINAL('done')"], sub=lambda req: "yes") as fake:
    ...     client = anthropic.Anthropic(api_key="test-key", base_url=fake.base_url)
    ...     fake.inject(Fault(status=429, retry_after_s=0.01))  # first request is rate limited
    ...     msg = client.messages.create(
    ...         model="fake-root", max_tokens=100,
    ...         messages=[{"role": "user", "content": "How many tickets?"}],
    ...     )
    ...     sub = client.messages.create(
    ...         model="claude-haiku", max_tokens=10,
    ...         messages=[{"role": "user", "content": "Is it urgent?"}],
    ...     )
    ...     client.close()
    >>> msg.content[0].text, sub.content[0].text
    ("FINAL('done')", 'yes')
    >>> fake.count("root"), fake.count("root", include_faulted=True)
    (1, 2)
    >>> fake.requests[-1].prompt
    'Is it urgent?'

Requests are routed by *kind*:

* ``"where"`` — a semantic-filter request: it offers a tool named ``record_verdicts``, or it
  asks for structured output (``output_config.format``) with ``<predicate>...</predicate>`` in
  its system prompt and offers no tools. The predicate is read from the system prompt, the
  rows from ``<row id="K">{json}</row>`` lines of the last user message, and the ``where=``
  judge is called per row. With ``output_config.format`` the fake answers a text block holding
  ``{"verdicts": [{"id": K, "match": bool, "reason": str}, ...]}`` as JSON, otherwise a
  ``record_verdicts`` tool call; :attr:`FakeRequest.verdict_channel` records which
  (``"structured"``, ``"forced_tool"`` or ``"tool"``).
* ``"root"`` — ``body["model"] == root_model``; answered from the ``root=`` script.
* ``"sub"`` — anything else; answered by ``sub=``.

**Strict mode** (``strict=True``, the default) answers HTTP 400 ``invalid_request_error``,
with a message in the style of the real API naming the field, to every request shape the real
API rejects. A rejected request is recorded in :attr:`FakeAnthropic.requests` (status 400, its
message in :attr:`FakeRequest.rejection`) and in :attr:`FakeAnthropic.rejections`; it gets no
fault and consumes no script entry. Generic rules, for any model: unknown top-level fields
("Extra inputs are not permitted"), more than 4 ``cache_control`` blocks, a ``tool_choice``
without ``tools`` or naming a tool that is not offered, malformed ``thinking`` /
``output_config`` / sampling values, and an ``output_config.format`` schema with an object
lacking ``"additionalProperties": false``. Per-model rules apply to the families of
:data:`MODEL_RULES` (a dated id such as ``claude-haiku-4-5-20251001`` maps to its family, see
:func:`rules_for`; the documentation URL of each rule is in :attr:`ModelRules.sources`):

=================  ======  ========  =======  ========================  ==========  =======
family             forced  sampling  prefill  thinking types            effort      max out
=================  ======  ========  =======  ========================  ==========  =======
claude-sonnet-5-5  no      default   no       adaptive, between_tools*  all/high    128K
claude-opus-5-5    no      default   no       adaptive                  all/medium  128K
claude-fable-5-1   no      default   no       adaptive                  all/high    128K
claude-fable-5     no†     default   no       adaptive                  all/high    128K
claude-haiku-5-5   yes†    default   no       adaptive, disabled*       all/medium  128K
claude-opus-5      yes†    default   no       adaptive, disabled*       all/high    128K
claude-sonnet-5    yes†    default   no       adaptive, disabled        all/high    128K
claude-sonnet-4-5  yes     one of‡   yes      enabled, disabled         none        64K
claude-haiku-4-5   yes     one of‡   yes      enabled, disabled         none        64K
claude-sonnet-4    yes     any       yes      enabled, disabled         none        64K
=================  ======  ========  =======  ========================  ==========  =======

"forced" is ``tool_choice`` ``{"type": "any"}`` or ``{"type": "tool", ...}``; † only while the
model does not think: forced tool use is never compatible with thinking, and the 5.x models
think unless the request sends ``thinking={"type": "disabled"}`` (Fable cannot turn it off).
"default": temperature / top_p / top_k other than their defaults are a 400; ‡ temperature and
top_p not both. Starred (*): thinking may be turned off at effort low, medium or high only.
"effort": the accepted ``output_config.effort`` levels / the default ("none": any effort is a
400).
Fable 5.1, Fable 5.2 and Mythos 5.x share the Fable rules. Manual thinking (``{"type":
"enabled", "budget_tokens": N}``) also rejects prefill, a temperature other than 1 and top_k.
Every family above accepts structured outputs except ``claude-sonnet-4``. Minimum cacheable
prompts: 512 tokens on the 5.x families, 1024 on Sonnet 5 / Sonnet 4.5 / Sonnet 4, 4096 on
Haiku 4.5. Any other model id (``"fake-root"``, a local server's model) gets the generic rules
only. ``strict=False`` checks only the basics (model, max_tokens, messages, no streaming).

**Thinking.** A model thinks when it thinks by default (the 5.x families) and the request does
not turn thinking off, or when the request asks for ``adaptive`` / ``enabled`` thinking. The
reply then starts with ``{"type": "thinking", "thinking": "", "signature": "fake-signature-N"}``:
the text is empty where the default display is ``"omitted"`` (the 5.x families) and a short
summary with ``thinking={"type": "adaptive", "display": "summarized"}``. Thinking spends
``thinking_tokens[effort]`` tokens (the request's effort, else the model's default, see
:data:`DEFAULT_THINKING_TOKENS`), billed in ``usage.output_tokens`` and reported in
``usage.output_tokens_details.thinking_tokens``. Thinking counts against ``max_tokens``: when
thinking and the answer do not both fit, the reply stops with ``stop_reason="max_tokens"``,
its text cut to what is left and its tool call dropped::

    >>> with FakeAnthropic(sub="The answer is 42.") as fake:
    ...     client = anthropic.Anthropic(api_key="k", base_url=fake.base_url, max_retries=0)
    ...     try:
    ...         client.messages.create(
    ...             model="claude-sonnet-5-5", max_tokens=1000, thinking={"type": "disabled"},
    ...             messages=[{"role": "user", "content": "Sum it up."}],
    ...         )
    ...     except anthropic.BadRequestError as exc:
    ...         print(exc.status_code, exc.body["error"]["type"])
    ...     msg = client.messages.create(
    ...         model="claude-sonnet-5-5", max_tokens=1000, output_config={"effort": "low"},
    ...         messages=[{"role": "user", "content": "Sum it up."}],
    ...     )
    ...     client.close()
    400 invalid_request_error
    >>> print(fake.rejections[0].split(";")[0])
    thinking.type: "thinking.type.disabled" is not supported for this model (claude-sonnet-5-5 accepts "adaptive", "between_tools")
    >>> [block.type for block in msg.content], msg.usage.output_tokens_details.thinking_tokens
    (['thinking', 'text'], 40)

**Refusals.** A ``where`` judge returning :data:`REFUSE` for any row, or a root / sub handler
returning :data:`REFUSE`, makes the whole reply a refusal: HTTP 200, ``content: []``,
``stop_reason="refusal"`` and ``stop_details={"type": "refusal", "category": None,
"explanation": "fake refusal"}``. ``FakeReply(stop_reason="refusal", stop_details=...)``
scripts one with a category (its ``text``, if any, is the partial output before it).

**Structured outputs.** With ``output_config.format`` a root or sub reply must be JSON text: a
scripted reply that does not parse is answered HTTP 400 naming the problem (a bug in the test's
script, not API behaviour). Where-requests get their verdicts as JSON text (above).

**Message batches.** ``POST /v1/messages/batches`` (create), ``GET .../batches/{id}``
(retrieve), ``GET .../batches/{id}/results`` (JSONL), ``POST .../batches/{id}/cancel``,
``GET /v1/messages/batches`` (list, newest first) and ``DELETE .../batches/{id}`` behave like
the real Message Batches API, so ``client.messages.batches.*`` works unchanged. A create is
answered 400 ``invalid_request_error`` for a malformed envelope: no requests or more than
``max_batch_requests`` (100,000), a ``custom_id`` not matching ``^[a-zA-Z0-9_-]{1,64}$`` or
used twice; a body over ``max_batch_bytes`` (256 MB) is a 413 ``request_too_large``. As with
the real API, each request's ``params`` are validated asynchronously: a request
``/v1/messages`` would reject comes back as an ``errored`` result carrying the same
``invalid_request_error`` message. A batch is ``in_progress`` for ``batch_delay_s`` (read
when the batch is looked at, so changing it affects batches already submitted; ``latency_s``
and faults injected with :meth:`FakeAnthropic.inject` do not apply to batch requests), then
``ended`` with a ``results_url`` on this server; ``request_counts`` stay all ``processing``
until then. Each succeeded result holds exactly the message ``/v1/messages`` would have
answered (the same ``where=`` judge, scripts, thinking and prompt-cache accounting), and
every processed request is logged in :attr:`FakeAnthropic.requests` with its
:attr:`FakeRequest.batch_id` and :attr:`FakeRequest.custom_id`. ``batch_error_rate`` or a
``batch_outcome`` callable turn chosen requests into ``errored`` (``api_error``,
``overloaded_error``, ...) or ``expired`` results. A cancel answers ``canceling`` and the
batch ends at the next look: requests processed by then (a share of ``batch_delay_s``
elapsed) keep their results, the rest are ``canceled``. :attr:`FakeAnthropic.batches` and
:attr:`FakeAnthropic.batch_calls` let tests check what was submitted, and how often;
:meth:`FakeAnthropic.inject_batch_fault` makes the batch endpoints fail. Batches live in the
server object, so a client process killed mid-way finds them again.

Only this module's stdlib imports are needed to run the server; it never touches the network
beyond the loopback interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, TypeAlias, cast
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DEFAULT_THINKING_TOKENS",
    "EFFORT_LEVELS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "MODEL_RULES",
    "REFUSE",
    "BatchOutcome",
    "FakeAnthropic",
    "FakeBatch",
    "FakeBatchCall",
    "FakeReply",
    "FakeRequest",
    "Fault",
    "HandlerResult",
    "Kind",
    "ModelRules",
    "RefuseType",
    "Reply",
    "RootEntry",
    "ToolUse",
    "VerdictChannel",
    "WhereJudge",
    "rules_for",
    "shape_verdicts",
    "verdicts_in_schema",
]

Kind: TypeAlias = Literal["root", "sub", "where"]
_KINDS: tuple[str, ...] = ("root", "sub", "where")

#: Name of the tool whose presence marks a semantic-filter ("where") request.
WHERE_TOOL_NAME = "record_verdicts"

_REDACTED_HEADERS = frozenset({"authorization", "x-api-key", "proxy-authorization"})
_PREDICATE_RE = re.compile(r"<predicate>(.*?)</predicate>", re.DOTALL)
_ROW_RE = re.compile(r'^\s*<row id="(-?\d+)">(.*)</row>\s*$', re.MULTILINE)

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_ERROR_STATUS: dict[str, int] = {etype: status for status, etype in _ERROR_TYPES.items()}

#: The Message Batches API's limits: requests per batch, and bytes of the create body.
MAX_BATCH_REQUESTS: Final = 100_000
MAX_BATCH_BYTES: Final = 256 * 1024 * 1024
_CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_BATCH_PATH_RE = re.compile(
    r"^/v1/messages/batches(?:/(?P<id>[^/]+)(?:/(?P<op>results|cancel))?)?$"
)
_BATCH_EXPIRY_S = 24 * 3600.0


# --------------------------------------------------------------------------- per-model rules
#
# What the real Messages API accepts, per model family, written from Anthropic's documentation
# (December 2026). It is deliberately independent of rlm_dagster's own capability table
# (rlm_dagster.models.profiles): the fake must catch the client sending what a model rejects.

#: The ``output_config.effort`` levels the API knows, lowest first.
EFFORT_LEVELS: Final[tuple[str, ...]] = ("low", "medium", "high", "xhigh", "max")

#: Thinking tokens a thinking reply spends, per effort level (``thinking_tokens=`` overrides).
DEFAULT_THINKING_TOKENS: Final[Mapping[str, int]] = MappingProxyType(
    {"low": 40, "medium": 200, "high": 600, "xhigh": 1200, "max": 2000}
)

_DOCS = "https://platform.claude.com/docs/en"
_SRC: Final[Mapping[str, str]] = MappingProxyType(
    {
        "sonnet-5-5": f"{_DOCS}/models/sonnet-5-5/whats-new-sonnet-5-5",
        "sonnet-5-5-migration": f"{_DOCS}/models/sonnet-5-5/migration-guide",
        "opus-5-5": f"{_DOCS}/models/opus-5-5/whats-new-opus-5-5",
        "haiku-5-5": f"{_DOCS}/models/haiku-5-5/whats-new-haiku-5-5",
        "haiku-5-5-prompting": (
            f"{_DOCS}/build-with-claude/prompt-engineering/prompting-claude-haiku-5-5"
        ),
        "fable-5-1": f"{_DOCS}/models/fable-5-1/whats-new-fable-5-1",
        "fable-5-1-migration": f"{_DOCS}/models/fable-5-1/migration-guide",
        "fable-5-2": f"{_DOCS}/models/fable-5-2/whats-new-fable-5-2",
        "fable-5": "https://platform.claude.com/docs/zh-CN/models/fable-5/migration-guide",
        "opus-5": "https://platform.claude.com/docs/about-claude/models/whats-new-opus-5",
        "sonnet-5": f"{_DOCS}/models/sonnet-5/migration-guide",
        "thinking": "https://platform.claude.com/docs/zh-CN/build-with-claude/thinking-troubleshooting",
        "extended-thinking": f"{_DOCS}/build-with-claude/extended-thinking",
        "effort": f"{_DOCS}/build-with-claude/effort",
        "structured-outputs": f"{_DOCS}/build-with-claude/structured-outputs",
        "prompt-caching": f"{_DOCS}/build-with-claude/prompt-caching",
        "haiku-4-5": f"{_DOCS}/models/haiku-4-5/migration-guide",
        "prefill-4-6": f"{_DOCS}/agents-and-tools/tool-use/token-efficient-tool-use",
        "refusals": f"{_DOCS}/build-with-claude/refusals-and-fallback",
        "sonnet-5-vs-5-5": "https://apidog.com/blog/claude-sonnet-5-5-vs-sonnet-5/",
        "haiku-5-5-vs-4-5": "https://apidog.com/jp/blog/claude-haiku-5-5-vs-haiku-4-5/",
        "claude-5-5-openrouter": (
            "https://openrouter.ai/docs/cookbook/evaluate-and-optimize/model-migrations/claude-5-5"
        ),
        "haiku-4-5-overview": "https://platform.claude.com/docs/zh-CN/models/haiku-4-5/overview.md",
        "sonnet-4-5-overview": (
            "https://platform.claude.com/docs/zh-CN/models/sonnet-4-5/overview.md"
        ),
        "models-overview": f"{_DOCS}/about-claude/models/overview",
    }
)

SamplingRule: TypeAlias = Literal["any", "temperature_or_top_p", "default_only"]


@dataclass(frozen=True)
class ModelRules:
    """What one model family accepts, as the fake enforces it in strict mode.

    * ``forced_tool_choice`` — ``tool_choice`` ``{"type": "any"}`` / ``{"type": "tool"}``
      accepted (always subject to: no forced tool use while the model thinks).
    * ``sampling`` — ``"any"``: temperature/top_p/top_k accepted; ``"temperature_or_top_p"``:
      not both of temperature and top_p; ``"default_only"``: non-default values are a 400.
    * ``prefill`` — a conversation may end with an assistant turn.
    * ``thinking_types`` — accepted ``thinking.type`` values; ``thinks_by_default`` — the reply
      starts with thinking when the request has no ``thinking`` field.
    * ``thinking_off_max_effort`` — the highest effort that may be combined with thinking
      turned off (``disabled`` / ``between_tools``); None: no limit.
    * ``effort_levels`` — accepted ``output_config.effort`` values (empty: effort is a 400);
      ``default_effort`` — the level used when the request sets none.
    * ``default_display`` — thinking text shown by default (``"omitted"``: empty text).
    * ``structured_outputs`` — ``output_config.format`` accepted.
    * ``max_output_tokens`` — the largest ``max_tokens``; ``min_cache_tokens`` — prompts
      shorter than this are not cached (None: not documented, the fake's default applies).
    * ``sources`` — documentation URL per rule.
    """

    family: str
    forced_tool_choice: bool
    sampling: SamplingRule
    prefill: bool
    thinking_types: frozenset[str]
    thinks_by_default: bool
    thinking_off_max_effort: str | None
    effort_levels: tuple[str, ...]
    default_effort: str | None
    default_display: Literal["summarized", "omitted"]
    structured_outputs: bool
    max_output_tokens: int
    min_cache_tokens: int | None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


_ADAPTIVE: Final = frozenset({"adaptive"})
_MANUAL: Final = frozenset({"enabled", "disabled"})


def _five(family: str, **spec: Any) -> ModelRules:
    """A Claude 5.x family: adaptive thinking on by default, all five effort levels, no
    sampling parameters, no prefill, structured outputs, 128K output, omitted thinking text."""
    base: dict[str, Any] = dict(
        forced_tool_choice=True,
        sampling="default_only",
        prefill=False,
        thinks_by_default=True,
        thinking_off_max_effort=None,
        effort_levels=EFFORT_LEVELS,
        default_effort="high",
        default_display="omitted",
        structured_outputs=True,
        max_output_tokens=128_000,
        min_cache_tokens=512,
    )
    base.update(spec)
    return ModelRules(family=family, **base)


def _four(family: str, **spec: Any) -> ModelRules:
    """A Claude 4.x family from before adaptive thinking: manual extended thinking only when
    asked for, no effort, sampling parameters and prefill accepted, 64K output."""
    base: dict[str, Any] = dict(
        forced_tool_choice=True,
        sampling="any",
        prefill=True,
        thinking_types=_MANUAL,
        thinks_by_default=False,
        thinking_off_max_effort=None,
        effort_levels=(),
        default_effort=None,
        default_display="summarized",
        structured_outputs=True,
        max_output_tokens=64_000,
        min_cache_tokens=1024,
    )
    base.update(spec)
    return ModelRules(family=family, **base)


_FIVE_SOURCES = {
    "sampling": _SRC["claude-5-5-openrouter"],
    "prefill": _SRC["prefill-4-6"],
    "thinking": _SRC["thinking"],
    "effort": _SRC["effort"],
    "forced_tool_with_thinking": _SRC["extended-thinking"],
    "structured_outputs": _SRC["structured-outputs"],
}

_RULES: dict[str, ModelRules] = {
    "claude-sonnet-5-5": _five(
        "claude-sonnet-5-5",
        forced_tool_choice=False,
        thinking_types=frozenset({"adaptive", "between_tools"}),
        thinking_off_max_effort="high",
        sources={
            **_FIVE_SOURCES,
            "forced_tool_choice": _SRC["sonnet-5-5"],
            "thinking": _SRC["sonnet-5-5"],
            "sampling": _SRC["sonnet-5-5-migration"],
            "prefill": _SRC["sonnet-5-5-migration"],
            "effort": _SRC["sonnet-5-5"],
            "max_output_tokens": _SRC["sonnet-5-5"],
            "min_cache_tokens": _SRC["sonnet-5-vs-5-5"],
        },
    ),
    "claude-opus-5-5": _five(
        "claude-opus-5-5",
        forced_tool_choice=False,
        thinking_types=_ADAPTIVE,
        default_effort="medium",
        sources={
            **_FIVE_SOURCES,
            "forced_tool_choice": _SRC["opus-5-5"],
            "thinking": _SRC["opus-5-5"],
            "effort": _SRC["opus-5-5"],
            "max_output_tokens": _SRC["opus-5-5"],
            "min_cache_tokens": _SRC["claude-5-5-openrouter"],
        },
    ),
    "claude-haiku-5-5": _five(
        "claude-haiku-5-5",
        thinking_types=frozenset({"adaptive", "disabled"}),
        thinking_off_max_effort="high",
        default_effort="medium",
        sources={
            **_FIVE_SOURCES,
            "sampling": _SRC["haiku-5-5"],
            "prefill": _SRC["haiku-5-5"],
            "thinking": _SRC["haiku-5-5-prompting"],
            "effort": _SRC["haiku-5-5-prompting"],
            "max_output_tokens": _SRC["haiku-5-5"],
            "min_cache_tokens": _SRC["haiku-5-5-vs-4-5"],
        },
    ),
    # Fable 5.1 and 5.2 (and the same models sold as Mythos): thinking always on, no forced
    # tool use. Fable 5.2 keeps the 5.1 request rules; its minimum cacheable prompt is not
    # documented in what we read.
    "claude-fable-5-1": _five(
        "claude-fable-5-1",
        forced_tool_choice=False,
        thinking_types=_ADAPTIVE,
        min_cache_tokens=None,
        sources={
            **_FIVE_SOURCES,
            "forced_tool_choice": _SRC["fable-5-1"],
            "thinking": _SRC["fable-5-1-migration"],
            "max_output_tokens": _SRC["fable-5-2"],
        },
    ),
    # Fable 5 (and Mythos 5): thinking always on; forced tool use is not a documented 400 (it
    # became one in Fable 5.1), but it cannot be combined with thinking, which is always on.
    "claude-fable-5": _five(
        "claude-fable-5",
        thinking_types=_ADAPTIVE,
        min_cache_tokens=None,
        sources={
            **_FIVE_SOURCES,
            "thinking": _SRC["fable-5"],
            "forced_tool_choice": _SRC["fable-5-1"],
        },
    ),
    "claude-opus-5": _five(
        "claude-opus-5",
        thinking_types=frozenset({"adaptive", "disabled"}),
        thinking_off_max_effort="high",
        sources={
            **_FIVE_SOURCES,
            "thinking": _SRC["opus-5"],
            "effort": _SRC["opus-5"],
            "max_output_tokens": _SRC["opus-5"],
            "min_cache_tokens": _SRC["opus-5"],
        },
    ),
    "claude-sonnet-5": _five(
        "claude-sonnet-5",
        thinking_types=frozenset({"adaptive", "disabled"}),
        min_cache_tokens=1024,
        sources={
            **_FIVE_SOURCES,
            "sampling": _SRC["sonnet-5"],
            "thinking": _SRC["sonnet-5"],
            "max_output_tokens": _SRC["models-overview"],
            "forced_tool_choice": _SRC["sonnet-5-vs-5-5"],
            "min_cache_tokens": _SRC["sonnet-5-vs-5-5"],
        },
    ),
    "claude-sonnet-4-5": _four(
        "claude-sonnet-4-5",
        sampling="temperature_or_top_p",
        sources={
            "sampling": _SRC["haiku-4-5"],
            "thinking": _SRC["thinking"],
            "effort": _SRC["effort"],
            "structured_outputs": _SRC["structured-outputs"],
            "max_output_tokens": _SRC["sonnet-4-5-overview"],
            "min_cache_tokens": _SRC["prompt-caching"],
            "forced_tool_with_thinking": _SRC["extended-thinking"],
        },
    ),
    "claude-haiku-4-5": _four(
        "claude-haiku-4-5",
        sampling="temperature_or_top_p",
        min_cache_tokens=4096,
        sources={
            "sampling": _SRC["haiku-4-5"],
            "thinking": _SRC["thinking"],
            "effort": _SRC["effort"],
            "structured_outputs": _SRC["structured-outputs"],
            "max_output_tokens": _SRC["haiku-4-5-overview"],
            "min_cache_tokens": _SRC["prompt-caching"],
            "forced_tool_with_thinking": _SRC["extended-thinking"],
        },
    ),
    # Sonnet 4: not among the models with structured outputs.
    "claude-sonnet-4": _four(
        "claude-sonnet-4",
        structured_outputs=False,
        sources={
            "structured_outputs": _SRC["structured-outputs"],
            "max_output_tokens": _SRC["models-overview"],
            "min_cache_tokens": _SRC["prompt-caching"],
            "forced_tool_with_thinking": _SRC["extended-thinking"],
        },
    ),
}

#: Model id (undated) -> family name. A dated id (``claude-haiku-4-5-20251001``) maps to its
#: undated family; anything else is unknown and gets only the generic rules.
_MODEL_IDS: dict[str, str] = {
    "claude-sonnet-5-5": "claude-sonnet-5-5",
    "claude-opus-5-5": "claude-opus-5-5",
    "claude-haiku-5-5": "claude-haiku-5-5",
    "claude-fable-5-2": "claude-fable-5-1",
    "claude-mythos-5-2": "claude-fable-5-1",
    "claude-fable-5-1": "claude-fable-5-1",
    "claude-mythos-5-1": "claude-fable-5-1",
    "claude-fable-5": "claude-fable-5",
    "claude-mythos-5": "claude-fable-5",
    "claude-opus-5": "claude-opus-5",
    "claude-sonnet-5": "claude-sonnet-5",
    "claude-sonnet-4-5": "claude-sonnet-4-5",
    "claude-haiku-4-5": "claude-haiku-4-5",
    "claude-sonnet-4": "claude-sonnet-4",
    "claude-sonnet-4-0": "claude-sonnet-4",
}

#: The rules of every model family the fake knows, by family name.
MODEL_RULES: Final[Mapping[str, ModelRules]] = MappingProxyType(_RULES)

_DATED_RE = re.compile(r"^(?P<base>.+)-\d{8}$")


def rules_for(model: str) -> ModelRules | None:
    """The rules of ``model``'s family, or None for a model id the table does not know.

    >>> rules_for("claude-haiku-4-5-20251001").family
    'claude-haiku-4-5'
    >>> rules_for("claude-mythos-5-1").family, rules_for("fake-root") is None
    ('claude-fable-5-1', True)
    """
    family = _MODEL_IDS.get(model)
    if family is None and (dated := _DATED_RE.match(model)):
        family = _MODEL_IDS.get(dated.group("base"))
    return MODEL_RULES[family] if family else None


class RefuseType:
    """The type of :data:`REFUSE` (a single instance)."""

    _instance: RefuseType | None = None

    def __new__(cls) -> RefuseType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REFUSE"

    def __reduce__(self) -> str:
        return "REFUSE"


#: Return this from a ``where`` judge (for any row), or as a root/sub reply, to make the fake
#: model decline: the reply is ``stop_reason="refusal"`` with ``stop_details`` and no content.
REFUSE: Final = RefuseType()

VerdictChannel: TypeAlias = Literal["structured", "tool", "forced_tool"]


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class ToolUse:
    """A ``tool_use`` content block the fake model emits (``stop_reason="tool_use"``).

    ``id`` defaults to a generated ``"toolu_fake_<n>"``.
    """

    name: str
    input: dict[str, Any]
    id: str | None = None


@dataclass(frozen=True)
class FakeReply:
    """A full assistant reply.

    ``stop_reason=None`` (the default) means ``"tool_use"`` when ``tool_use`` is set and
    ``"end_turn"`` otherwise; any explicit value (e.g. ``"max_tokens"``) is passed through.
    ``usage`` entries override the fake's token estimates (e.g. ``{"output_tokens": 4096}``).
    The text block is omitted when ``text`` is empty and ``tool_use`` is set.

    ``stop_reason="refusal"`` is a declined request: ``stop_details`` defaults to
    ``{"type": "refusal", "category": None, "explanation": "fake refusal"}`` (pass your own,
    e.g. with ``"category": "cyber"``), the content is empty when ``text`` is (any ``text`` is
    the partial output before the refusal) and no thinking block is emitted.
    """

    text: str = ""
    stop_reason: str | None = None
    tool_use: ToolUse | None = None
    usage: dict[str, int] | None = None
    stop_details: dict[str, Any] | None = None


@dataclass(frozen=True)
class Fault:
    """An error (or a slow reply) the fake applies to one request.

    * ``status`` — HTTP status of the error reply (``None``: no error, just ``delay_s``).
      429 is sent as ``rate_limit_error``, 529 ``overloaded_error``, 500 ``api_error``,
      401 ``authentication_error``, 400 ``invalid_request_error``; others ``api_error``.
    * ``retry_after_s`` — sent as ``retry-after`` (seconds) and ``retry-after-ms``; the SDK
      then sleeps exactly that long before retrying. Without it (or with 0) the SDK uses its
      own exponential backoff, which starts at roughly 0.4-0.5 s.
    * ``delay_s`` — sleep this long before answering (with ``status=None`` the request is
      then answered normally).
    * ``message`` — the error message (a default naming the fault is used when empty).
    """

    status: int | None = None
    retry_after_s: float | None = None
    delay_s: float = 0.0
    message: str = ""

    def __post_init__(self) -> None:
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(
                f"Fault.status must be an HTTP error status 400-599, got {self.status}"
            )
        if self.retry_after_s is not None and self.retry_after_s < 0:
            raise ValueError(f"Fault.retry_after_s must be >= 0, got {self.retry_after_s}")
        if self.delay_s < 0:
            raise ValueError(f"Fault.delay_s must be >= 0, got {self.delay_s}")
        if self.status is None and self.delay_s == 0:
            raise ValueError("a Fault needs a status (error reply) or a delay_s (slow reply)")

    @property
    def error_type(self) -> str:
        """The Anthropic error ``type`` sent for :attr:`status`."""
        if self.status is None:
            return ""
        return _ERROR_TYPES.get(self.status, "api_error")


@dataclass(frozen=True)
class FakeRequest:
    """One request the fake received, as parsed from the wire.

    ``headers`` have lower-case names, with credentials replaced by ``"[redacted]"``.
    ``system`` is the system prompt with text blocks joined by newlines; ``last_user_text``
    the text of the last user message (text blocks, and the text of tool results).
    For ``"where"`` requests ``predicate`` and ``rows`` hold the parsed filter input (a row
    whose JSON does not parse is kept as ``(K, {"_raw": text})``); otherwise both are None.
    ``fault`` is the fault applied to the request, if any, and ``status`` the HTTP status the
    fake answered with (None while the request is still in flight).

    ``family`` is the model family whose rules applied (None: a model the rule table does not
    know); ``thinking`` the request's ``thinking`` field and ``effort`` its
    ``output_config.effort`` (None when absent); ``output_format`` its
    ``output_config.format``. For ``"where"`` requests ``verdict_channel`` says how the
    verdicts were asked for: ``"structured"`` (``output_config.format``), ``"forced_tool"``
    (``record_verdicts`` with a forced ``tool_choice``) or ``"tool"`` (offered, not forced).
    ``rejection`` is the message of the 400 the fake's validation answered, if it did.

    A request processed inside a message batch has ``batch_id`` and ``custom_id`` set (None
    for ``POST /v1/messages``); its ``status`` is the HTTP status ``/v1/messages`` would have
    answered (an ``errored`` result's error mapped back, e.g. 500 for ``api_error``).
    """

    index: int
    kind: Kind
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    system: str
    last_user_text: str
    predicate: str | None = None
    rows: list[tuple[int, dict[str, Any]]] | None = None
    fault: Fault | None = None
    status: int | None = None
    family: str | None = None
    thinking: dict[str, Any] | None = None
    effort: str | None = None
    output_format: dict[str, Any] | None = None
    verdict_channel: VerdictChannel | None = None
    rejection: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None

    @property
    def prompt(self) -> str:
        """Alias of :attr:`last_user_text`."""
        return self.last_user_text

    @property
    def faulted(self) -> bool:
        """Whether the fake answered (or will answer) this request with an HTTP error."""
        return self.status is not None and self.status != 200


Reply: TypeAlias = str | FakeReply | ToolUse | dict[str, Any] | RefuseType
"""What a script entry or callable may answer: text, a full reply, a tool call, a raw body, or
:data:`REFUSE`."""
HandlerResult: TypeAlias = Reply | Fault
RootEntry: TypeAlias = HandlerResult | Callable[[FakeRequest], HandlerResult]
WhereJudge: TypeAlias = Callable[[str, dict[str, Any]], bool | tuple[bool, str] | RefuseType]


BatchOutcome: TypeAlias = str | None
"""What a ``batch_outcome`` callable answers for one batch request: None (processed
normally), ``"expired"``, or an API error type (``"api_error"``, ``"overloaded_error"``,
``"invalid_request_error"``, ...) for an ``errored`` result."""


@dataclass(frozen=True)
class FakeBatch:
    """A snapshot of one message batch the fake holds.

    ``custom_ids`` and ``params`` are the submitted requests in order; ``headers`` those of
    the create call (credentials redacted). ``results`` maps each custom_id to its result
    object (``{"type": "succeeded", "message": {...}}``, ``{"type": "errored", ...}``,
    ``{"type": "canceled"}``, ``{"type": "expired"}``) once the batch has ended, else None.
    """

    id: str
    custom_ids: tuple[str, ...]
    params: tuple[dict[str, Any], ...]
    headers: dict[str, str]
    processing_status: str
    request_counts: dict[str, int]
    cancel_requested: bool
    results: dict[str, dict[str, Any]] | None


@dataclass(frozen=True)
class FakeBatchCall:
    """One call to a batch endpoint: ``operation`` is ``"create"``, ``"retrieve"``,
    ``"results"``, ``"cancel"``, ``"list"`` or ``"delete"``; ``batch_id`` the batch it named
    or made (None for a list, or a refused create); ``status`` the HTTP status answered."""

    operation: str
    batch_id: str | None
    status: int


@dataclass
class _Batch:
    """A message batch as the server keeps it (guarded by ``FakeAnthropic._batch_lock``)."""

    id: str
    requests: list[tuple[str, dict[str, Any]]]
    headers: dict[str, str]
    created: float  # time.time()
    created_mono: float
    cancel_mono: float | None = None
    cancel_wall: float | None = None
    cancel_processed: int = 0
    results: dict[str, dict[str, Any]] | None = None
    ended: float | None = None


def _rfc3339(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _errored(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "errored",
        "error": {"type": "error", "error": {"type": error_type, "message": message}},
    }


def _default_sub(request: FakeRequest) -> str:
    return "fake sub-model answer"


# --------------------------------------------------------------------------- internals


@dataclass
class _Out:
    """An HTTP response about to be written."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


class _UserCodeError(Exception):
    """A user-supplied callable raised or returned something unusable."""


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def _error_out(status: int, message: str, error_type: str | None = None) -> _Out:
    etype = error_type or _ERROR_TYPES.get(status, "api_error")
    return _Out(
        status, _json_bytes({"type": "error", "error": {"type": etype, "message": message}})
    )


def _redacted(raw_headers: Mapping[str, str]) -> dict[str, str]:
    """Headers with lower-case names and credentials replaced by ``"[redacted]"``."""
    return {
        k.lower(): ("[redacted]" if k.lower() in _REDACTED_HEADERS else v)
        for k, v in raw_headers.items()
    }


def _fmt_seconds(value: float) -> str:
    return repr(float(value))


def _block_text(block: Any) -> str:
    """Text of one content block (text blocks, and tool results' text)."""
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type") == "text" and isinstance(block.get("text"), str):
        return cast(str, block["text"])
    if block.get("type") == "tool_result":
        return _content_text(block.get("content", ""))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for t in (_block_text(b) for b in content) if t)
    return ""


def _last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content", ""))
    return ""


def _tool_names(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        return []
    return [str(t.get("name")) for t in tools if isinstance(t, dict)]


def _parse_rows(text: str) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    for match in _ROW_RE.finditer(text):
        raw = match.group(2)
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        rows.append((int(match.group(1)), value if isinstance(value, dict) else {"_raw": raw}))
    return rows


def _cache_segments(body: dict[str, Any]) -> list[tuple[str, bool]]:
    """The request in cache-prefix order (tools, system, messages) as (text, has a cache
    breakpoint) pieces; the ``cache_control`` marks themselves are not part of the text."""

    def piece(block: Any, prefix: str = "") -> tuple[str, bool]:
        if isinstance(block, str):  # a plain string is one text block, as the API reads it
            block = {"type": "text", "text": block}
        if isinstance(block, dict):
            marked = "cache_control" in block
            block = {k: v for k, v in block.items() if k != "cache_control"}
            return prefix + json.dumps(block, sort_keys=True, ensure_ascii=False), marked
        return prefix + str(block), False

    segments = [piece(tool) for tool in body.get("tools") or []]
    system = body.get("system")
    if isinstance(system, list):
        segments += [piece(block) for block in system]
    elif system:
        segments.append(piece(system))
    for message in body.get("messages") or []:
        content = message.get("content")
        role = f"{message.get('role')}:"
        if isinstance(content, list):
            segments += [piece(block, role) for block in content]
        else:
            segments.append(piece(content, role))
    return segments


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


def _validate_body(body: dict[str, Any]) -> str | None:
    """The first reason the real API would reject ``body``, or None."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: field required (a non-empty string)"
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: field required (an integer >= 1)"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: field required (a non-empty list)"
    if body.get("stream"):
        return (
            "FakeAnthropic does not support streaming; call messages.create() without stream=True"
        )
    return None


#: Top-level request fields the Messages API knows (the SDK's ``messages.create`` arguments,
#: the sampling parameters it no longer exposes, the beta-only ones, and the transitional
#: ``output_format``); anything else is "Extra inputs are not permitted".
KNOWN_FIELDS: Final[frozenset[str]] = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        "cache_control",
        "metadata",
        "stop_sequences",
        "stream",
        "service_tier",
        "temperature",
        "top_p",
        "top_k",
        "container",
        "inference_geo",
        "speed",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
        "context_management",
        "mcp_servers",
    }
)
_THINKING_TYPES = ("enabled", "disabled", "adaptive", "between_tools")
_THINKING_DISPLAYS = ("summarized", "omitted", "updates")
_TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")
_MAX_CACHE_BREAKPOINTS = 4


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _take_queued(queue: list[list[Any]], wanted: str) -> Fault | None:
    """The first queued ``[fault, times, scope]`` entry whose scope is None or ``wanted``,
    used once (removed when its times are spent); None if none applies."""
    for entry in queue:
        fault, remaining, scope = entry
        if scope is None or scope == wanted:
            if remaining <= 1:
                queue.remove(entry)
            else:
                entry[1] = remaining - 1
            return cast(Fault, fault)
    return None


def _verdict_schema(request: FakeRequest) -> Mapping[str, Any]:
    """The JSON schema a where-request asks its verdicts in: the structured-output schema, or
    the ``record_verdicts`` tool's input schema."""
    if request.verdict_channel == "structured":
        fmt = request.output_format or {}
        return fmt.get("schema") or {}
    for tool in request.body.get("tools") or []:
        if isinstance(tool, dict) and tool.get("name") == WHERE_TOOL_NAME:
            return tool.get("input_schema") or {}
    return {}


def shape_verdicts(request: FakeRequest, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """``verdicts`` (``{"id", "match", "reason"}`` items, malformed ones included) in the shape
    the where-request ``request`` asks for: for ``where_reply=`` callables that script a reply
    (a wrong or incomplete one) whatever verdict format the request uses."""
    return verdicts_in_schema(verdicts, _verdict_schema(request))


def verdicts_in_schema(verdicts: list[dict[str, Any]], schema: Mapping[str, Any]) -> dict[str, Any]:
    """The judge's verdicts in the shape ``schema`` asks for, as the real API's constrained
    output would be: ``{"verdicts": [...]}``, or ``{"matches": [...], "non_matches": [...]}``
    with reasons on matches when the schema's match items are objects, else bare ids."""
    properties = schema.get("properties") or {}
    if "verdicts" in properties or "matches" not in properties:
        return {"verdicts": verdicts}
    with_reasons = (properties["matches"].get("items") or {}).get("type") == "object"
    return {
        "matches": [
            {"id": v["id"], "reason": v["reason"]} if with_reasons else v["id"]
            for v in verdicts
            if v["match"]
        ],
        "non_matches": [v["id"] for v in verdicts if not v["match"]],
    }


def _output_format(body: Mapping[str, Any]) -> Any:
    """``output_config.format``, else the transitional top-level ``output_format``."""
    config = body.get("output_config")
    if isinstance(config, dict) and config.get("format") is not None:
        return config["format"]
    return body.get("output_format")


def _effort(body: Mapping[str, Any]) -> str | None:
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    return effort if isinstance(effort, str) else None


def _thinking(body: Mapping[str, Any]) -> dict[str, Any] | None:
    thinking = body.get("thinking")
    return thinking if isinstance(thinking, dict) else None


def _forced_tool_choice(body: Mapping[str, Any]) -> str | None:
    """The forcing ``tool_choice.type`` (``"any"`` / ``"tool"``), or None."""
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    return kind if kind in ("any", "tool") else None


def _count_cache_breakpoints(body: Mapping[str, Any]) -> int:
    def marked(blocks: Any) -> int:
        if not isinstance(blocks, list):
            return 0
        count = 0
        for block in blocks:
            if isinstance(block, dict):
                count += "cache_control" in block
                if block.get("type") == "tool_result":
                    count += marked(block.get("content"))
        return count

    count = 1 if body.get("cache_control") else 0  # automatic caching takes one slot
    count += marked(body.get("tools")) + marked(body.get("system"))
    for message in body.get("messages") or []:
        if isinstance(message, dict):
            count += marked(message.get("content"))
    return count


def _open_object(schema: Any, path: str = "schema") -> str | None:
    """The path of the first object schema without ``"additionalProperties": false``."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            if found := _open_object(item, f"{path}[{i}]"):
                return found
        return None
    if not isinstance(schema, dict):
        return None
    kinds = schema.get("type")
    is_object = kinds == "object" or (isinstance(kinds, list) and "object" in kinds)
    if (is_object or "properties" in schema) and schema.get("additionalProperties") is not False:
        return path
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        children = schema.get(key)
        if isinstance(children, dict):
            for name, child in children.items():
                if found := _open_object(child, f"{path}.{key}.{name}"):
                    return found
    for key in ("items", "prefixItems", "anyOf", "allOf", "oneOf", "not"):
        if key in schema and (found := _open_object(schema[key], f"{path}.{key}")):
            return found
    return None


def _generic_problem(body: Mapping[str, Any]) -> str | None:
    """The first reason the real API rejects ``body`` whatever the model (strict mode)."""
    for name in body:
        if name not in KNOWN_FIELDS:
            return f"{name}: Extra inputs are not permitted"
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in message:
            return f"messages.{i}.content: Field required"
    breakpoints = _count_cache_breakpoints(body)
    if breakpoints > _MAX_CACHE_BREAKPOINTS:
        return (
            f"A maximum of {_MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {breakpoints}."
        )
    tools = _tool_names(body.get("tools"))
    if "tool_choice" in body:
        choice = body["tool_choice"]
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in _TOOL_CHOICE_TYPES:
            return f"tool_choice.type: Input should be one of {', '.join(_TOOL_CHOICE_TYPES)}"
        if not tools:
            return "tool_choice: tool_choice may only be specified while providing tools."
        if kind == "tool" and choice.get("name") not in tools:
            return (
                f"tool_choice.name: tool {choice.get('name')!r} is not one of the provided "
                f"tools ({', '.join(tools)})"
            )
    for param, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        value = body.get(param)
        if value is not None and (not _is_number(value) or not low <= value <= high):
            return f"{param}: Input should be a number between {low:g} and {high:g}"
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        return "top_k: Input should be an integer >= 0"
    if "thinking" in body:
        thinking = body["thinking"]
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in _THINKING_TYPES:
            return f"thinking.type: Input should be one of {', '.join(_THINKING_TYPES)}"
        assert isinstance(thinking, dict)
        display = thinking.get("display")
        if display is not None and display not in _THINKING_DISPLAYS:
            return f"thinking.{kind}.display: Input should be 'summarized' or 'omitted'"
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not isinstance(budget, int) or isinstance(budget, bool):
                return "thinking.enabled.budget_tokens: Field required"
            if budget < 1024:
                return (
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
                )
            if budget >= body["max_tokens"]:
                return "max_tokens: `max_tokens` must be greater than `thinking.budget_tokens`"
    if "output_config" in body:
        config = body["output_config"]
        if not isinstance(config, dict):
            return "output_config: Input should be an object"
        for key in config:
            if key not in ("effort", "format"):
                return f"output_config.{key}: Extra inputs are not permitted"
        effort = config.get("effort")
        if effort is not None and effort not in EFFORT_LEVELS:
            return f"output_config.effort: Input should be one of {', '.join(EFFORT_LEVELS)}"
    fmt = _output_format(body)
    if fmt is not None:
        where = "output_config.format" if "output_config" in body else "output_format"
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return f"{where}.type: Input should be 'json_schema'"
        if not isinstance(fmt.get("schema"), dict):
            return f"{where}.schema: Field required (a JSON schema object)"
        if path := _open_object(fmt["schema"]):
            return (
                f"{where}.schema: For 'object' type, 'additionalProperties' must be explicitly "
                f"set to false (at {path})"
            )
    return None


def _model_problem(body: Mapping[str, Any], rules: ModelRules) -> str | None:
    """The first reason the real API rejects ``body`` for a model of family ``rules``."""
    model = body["model"]
    if body["max_tokens"] > rules.max_output_tokens:
        return (
            f"max_tokens: {body['max_tokens']} > {rules.max_output_tokens}, which is the maximum "
            f"allowed number of output tokens for {model}"
        )
    forced = _forced_tool_choice(body)
    if forced and not rules.forced_tool_choice:
        return (
            f'tool_choice: forced tool use (tool_choice {{"type": "{forced}"}}) is not supported '
            f'with {model}; use tool_choice {{"type": "auto"}} and ask for the tool in the prompt'
        )
    thinking = _thinking(body)
    kind = thinking.get("type") if thinking else None
    if kind is not None and kind not in rules.thinking_types:
        accepted = ", ".join(f'"{t}"' for t in sorted(rules.thinking_types))
        if rules.thinking_types == _MANUAL:
            hint = 'use {"type": "enabled", "budget_tokens": N} or {"type": "disabled"}'
        elif "between_tools" in rules.thinking_types and kind == "disabled":
            hint = 'use "thinking.type.between_tools" to turn off up-front thinking'
        else:
            hint = 'use "thinking.type.adaptive" and "output_config.effort" to control thinking behavior'
        return (
            f'thinking.type: "thinking.type.{kind}" is not supported for this model ({model} '
            f"accepts {accepted}); {hint}"
        )
    effort = _effort(body)
    if effort is not None and not rules.effort_levels:
        return (
            f"output_config.effort: {model} does not support the effort parameter; remove "
            "output_config.effort"
        )
    if effort is not None and effort not in rules.effort_levels:
        return (
            f"output_config.effort: effort {effort!r} is not supported by {model} (supported: "
            f"{', '.join(rules.effort_levels)})"
        )
    used_effort = effort or rules.default_effort
    ceiling = rules.thinking_off_max_effort
    if (
        kind in ("disabled", "between_tools")
        and ceiling is not None
        and used_effort is not None
        and EFFORT_LEVELS.index(used_effort) > EFFORT_LEVELS.index(ceiling)
    ):
        return (
            f'thinking.type: "{kind}" can only be combined with effort low, medium or high on '
            f'{model}; effort "{used_effort}" needs adaptive thinking (omit the thinking field)'
        )
    thinks = kind in ("adaptive", "enabled") or (kind is None and rules.thinks_by_default)
    if forced and thinks:
        off = sorted(rules.thinking_types - {"adaptive", "enabled"})
        hint = f'send thinking {{"type": "{off[0]}"}} or ' if off else ""
        return (
            "tool_choice: Thinking may not be enabled when tool_choice forces tool use "
            f"({model} {'thinks by default' if kind is None else 'was asked to think'}); "
            f'{hint}use tool_choice {{"type": "auto"}}'
        )
    messages = body["messages"]
    prefill = isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    if prefill and not rules.prefill:
        return (
            f"messages: {model} does not support assistant message prefill. The conversation "
            "must end with a user message."
        )
    if prefill and kind == "enabled":
        return "messages: assistant message prefill is not supported with extended thinking"
    sampling = {p: body.get(p) for p in ("temperature", "top_p", "top_k")}
    set_params = [p for p, v in sampling.items() if v is not None]
    if rules.sampling == "default_only":
        for param in set_params:
            value = sampling[param]
            if param == "top_k" or value != 1:
                return (
                    f"{param}: `{param}` is deprecated for this model ({model} rejects "
                    "non-default sampling parameters); remove it and use output_config.effort"
                )
    if rules.sampling == "temperature_or_top_p" and {"temperature", "top_p"} <= set(set_params):
        return "top_p: `temperature` and `top_p` cannot both be specified for this model."
    if kind == "enabled":
        if sampling["temperature"] not in (None, 1):
            return "temperature: `temperature` may only be set to 1 when thinking is enabled."
        if sampling["top_k"] is not None:
            return "top_k: `top_k` may not be set when thinking is enabled."
        top_p = sampling["top_p"]
        if top_p is not None and top_p < 0.95:
            return "top_p: `top_p` must be between 0.95 and 1 when thinking is enabled."
    if _output_format(body) is not None and not rules.structured_outputs:
        return f"output_config.format: structured outputs are not supported by {model}"
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive connections
    # socketserver's default backlog of 5 drops a burst of new connections, which the client's
    # TCP then retries a whole second later: concurrent clients open dozens at once.
    request_queue_size = 1024
    fake: FakeAnthropic

    def __init__(self, address: tuple[str, int], fake: FakeAnthropic) -> None:
        self.fake = fake
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (or stop() closing their connections) is normal here.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeAnthropic/1.0"
    disable_nagle_algorithm = True  # headers and body are separate writes: avoid 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        arrived = time.monotonic()  # the request line and headers are in: latency runs from here
        body = self._read_body()
        fake = cast(_Server, self.server).fake
        out = fake._dispatch(method, self.path, dict(self.headers.items()), body, arrived)
        self.send_response(out.status)
        self.send_header("Content-Type", out.content_type)
        self.send_header("Content-Length", str(len(out.body)))
        for name, value in out.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(out.body)
        self.wfile.flush()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


# --------------------------------------------------------------------------- the server


class FakeAnthropic:
    """A fake Anthropic Messages API server on ``127.0.0.1`` (see the module docstring).

    Args:
        root: the root model's script — a list of replies consumed in order (each a ``str``,
            :class:`FakeReply`, :class:`ToolUse`, raw ``dict`` body, :class:`Fault`, or a
            callable ``(FakeRequest) -> one of those``), or a single callable answering every
            root turn. When a list runs out the fake answers HTTP 400
            ``"fake root script exhausted after N replies"`` (not retried by the SDK).
        sub: answers plain sub-calls (``kind == "sub"``): a callable ``(FakeRequest) ->
            reply`` or a constant string.
        where: the semantic-filter judge, ``(predicate, row) -> bool | (bool, reason)``.
        where_reply: overrides ``where`` for where-requests with a whole reply (e.g. a
            :class:`ToolUse` with malformed verdicts).
        handler: when given, answers every ``/v1/messages`` request (full override).
        root_model: requests whose ``model`` equals this are root turns.
        latency_s, latency_per_output_token_s: simulated latency of every answered request,
            counted from the request's arrival (headers read) to its answer: the fake's own
            processing is part of it, so a burst of requests is answered on time.
        max_concurrency: more requests in flight than this are answered 429 with
            ``retry-after = rate_limit_retry_after_s``.
        fault_rate, fault_statuses, seed: random fault injection; each request faults with
            probability ``fault_rate`` (status drawn from ``fault_statuses``, retry-after
            ``rate_limit_retry_after_s``). Deterministic for a given seed and arrival order.
        prompt_caching, cache_min_tokens: simulate Anthropic's prompt caching. The prefix up to
            each ``cache_control`` breakpoint (tools, then system, then messages) that a
            previous request already had is billed as ``cache_read_input_tokens``; newly marked
            content as ``cache_creation_input_tokens``; prefixes shorter than the minimum are
            not cached, as with the real API. ``cache_min_tokens=None`` (the default) uses the
            model family's documented minimum (:attr:`ModelRules.min_cache_tokens`), else 1024.
        strict: validate every request against the API's documented rules (see the module
            docstring): generic ones for any model, and the per-model ones of
            :data:`MODEL_RULES` for a model id the table knows. A rejected request is answered
            HTTP 400 ``invalid_request_error`` and its message kept in :attr:`rejections`.
            ``strict=False`` only checks the basics (model, max_tokens, messages, no stream).
        thinking_tokens: thinking tokens a thinking reply spends per effort level (the
            request's ``output_config.effort``, else the model's default effort, else
            ``"high"``); defaults to :data:`DEFAULT_THINKING_TOKENS`. Missing levels use the
            defaults.
        batch_delay_s: how long a message batch stays ``in_progress`` before it ends (read
            whenever a batch is looked at: set it to 0 to end the batches already submitted).
        batch_error_rate: each batch request (valid params) comes back ``errored`` with this
            probability, as ``api_error`` or ``overloaded_error`` (deterministic per seed).
        batch_outcome: ``(FakeRequest) -> BatchOutcome`` choosing, per batch request (its
            ``custom_id`` set), an ``errored`` result of that error type, ``"expired"``, or
            None for a normal answer; overrides ``batch_error_rate``.
        max_batch_requests, max_batch_bytes: a create with more requests (400) or a larger
            body (413) is refused, as the real API does past 100,000 requests / 256 MB.
        port: TCP port to listen on (0 picks a free one).

    Faults queued with :meth:`inject` take precedence over random faults. A faulted request
    does not consume a root-script entry. User callables that raise get the request answered
    with a 400 naming the exception (kept in :attr:`errors`), so tests fail fast.
    """

    def __init__(
        self,
        root: Sequence[RootEntry] | Callable[[FakeRequest], HandlerResult] | None = None,
        sub: Callable[[FakeRequest], HandlerResult] | str = _default_sub,
        where: WhereJudge | None = None,
        *,
        where_reply: Callable[[FakeRequest], HandlerResult] | None = None,
        handler: Callable[[FakeRequest], HandlerResult] | None = None,
        root_model: str = "fake-root",
        latency_s: float = 0.0,
        latency_per_output_token_s: float = 0.0,
        max_concurrency: int | None = None,
        rate_limit_retry_after_s: float = 0.05,
        fault_rate: float = 0.0,
        fault_statuses: Iterable[int] = (429, 529, 500),
        seed: int = 0,
        prompt_caching: bool = True,
        cache_min_tokens: int | None = None,
        strict: bool = True,
        thinking_tokens: Mapping[str, int] | None = None,
        batch_delay_s: float = 0.0,
        batch_error_rate: float = 0.0,
        batch_outcome: Callable[[FakeRequest], BatchOutcome] | None = None,
        max_batch_requests: int = MAX_BATCH_REQUESTS,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        port: int = 0,
    ) -> None:
        if isinstance(root, str | bytes):
            raise TypeError(
                "root= must be a list of replies or a callable, not a string; wrap it: root=[...]"
            )
        self._root_fn: Callable[[FakeRequest], HandlerResult] | None = None
        self._script: list[RootEntry] | None = None
        if root is None:
            pass
        elif callable(root):
            self._root_fn = root
        elif isinstance(root, Sequence):
            self._script = list(root)
        else:
            raise TypeError(
                f"root= must be a list of replies or a callable, got {type(root).__name__}"
            )
        if not (callable(sub) or isinstance(sub, str)):
            raise TypeError(f"sub= must be a callable or a string, got {type(sub).__name__}")
        for name, fn in (
            ("where", where),
            ("where_reply", where_reply),
            ("handler", handler),
            ("batch_outcome", batch_outcome),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}= must be a callable, got {type(fn).__name__}")
        for name, value in (
            ("latency_s", latency_s),
            ("latency_per_output_token_s", latency_per_output_token_s),
            ("rate_limit_retry_after_s", rate_limit_retry_after_s),
            ("batch_delay_s", batch_delay_s),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {fault_rate}")
        if not 0.0 <= batch_error_rate <= 1.0:
            raise ValueError(f"batch_error_rate must be within [0, 1], got {batch_error_rate}")
        if max_batch_requests < 1 or max_batch_bytes < 1:
            raise ValueError("max_batch_requests and max_batch_bytes must be >= 1")
        statuses = tuple(fault_statuses)
        if fault_rate > 0 and not statuses:
            raise ValueError("fault_statuses must not be empty when fault_rate > 0")
        for status in statuses:
            Fault(status=status)  # validates the status range
        if cache_min_tokens is not None and cache_min_tokens < 0:
            raise ValueError(f"cache_min_tokens must be >= 0 or None, got {cache_min_tokens}")
        spent = dict(DEFAULT_THINKING_TOKENS)
        for level, tokens in (thinking_tokens or {}).items():
            if level not in EFFORT_LEVELS:
                raise ValueError(
                    f"thinking_tokens keys must be effort levels {EFFORT_LEVELS}, got {level!r}"
                )
            if not isinstance(tokens, int) or tokens < 0:
                raise ValueError(f"thinking_tokens[{level!r}] must be an int >= 0, got {tokens!r}")
            spent[level] = tokens

        self._sub = sub
        self._where = where
        self._where_reply = where_reply
        self._handler = handler
        self.root_model = root_model
        self.latency_s = latency_s
        self.latency_per_output_token_s = latency_per_output_token_s
        self.max_concurrency = max_concurrency
        self.rate_limit_retry_after_s = rate_limit_retry_after_s
        self.fault_rate = fault_rate
        self.fault_statuses = statuses
        self._rng = random.Random(seed)
        self._port = port
        self.prompt_caching = prompt_caching
        self.cache_min_tokens = cache_min_tokens
        self.strict = strict
        self.thinking_tokens: Mapping[str, int] = MappingProxyType(spent)
        self._prefixes: set[str] = set()
        self.batch_delay_s = batch_delay_s
        self.batch_error_rate = batch_error_rate
        self._batch_outcome = batch_outcome
        self.max_batch_requests = max_batch_requests
        self.max_batch_bytes = max_batch_bytes
        self._batch_rng = random.Random(seed)
        # Batches and their processing; an RLock, as processing calls user callables.
        self._batch_lock = threading.RLock()
        self._batches: dict[str, _Batch] = {}
        self._batch_calls: list[FakeBatchCall] = []
        self._batch_faults: list[list[Any]] = []  # [fault, remaining, operation]

        self._lock = threading.Lock()
        self._requests: list[FakeRequest] = []
        self._faults: list[list[Any]] = []  # [fault, remaining, kind]
        self._errors: list[BaseException] = []
        self._rejections: list[str] = []
        self._script_pos = 0
        self._inflight = 0
        self._peak_inflight = 0
        self._serial = 0

        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeAnthropic:
        """Start serving in a daemon thread (idempotent); returns ``self``."""
        with self._lifecycle:
            if self._server is not None:
                return self
            server = _Server(("127.0.0.1", self._port), self)
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"FakeAnthropic-{server.server_address[1]}",
                daemon=True,
            )
            thread.start()
            self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Shut the server down, close open connections and join its thread (idempotent)."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is currently serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        server = self._server
        if server is None:
            raise RuntimeError(
                "FakeAnthropic is not running; call start() or use it as a context manager"
            )
        return int(server.server_address[1])

    @property
    def base_url(self) -> str:
        """``"http://127.0.0.1:PORT"`` — pass it to ``anthropic.Anthropic(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}"

    def __repr__(self) -> str:
        where = self.base_url if self.running else "stopped"
        return f"<FakeAnthropic {where} requests={len(self._requests)}>"

    # ------------------------------------------------------------------ test API

    def inject(self, fault: Fault, times: int = 1, kind: Kind | None = None) -> None:
        """Apply ``fault`` to the next ``times`` requests of ``kind`` (None: of any kind).

        Queued faults are used in the order they were injected.
        """
        if not isinstance(fault, Fault):
            raise TypeError(f"inject() takes a Fault, got {type(fault).__name__}")
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        self._check_kind(kind)
        with self._lock:
            self._faults.append([fault, times, kind])

    @property
    def requests(self) -> list[FakeRequest]:
        """The requests received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions raised by user callables (each answered with HTTP 400), a copy."""
        with self._lock:
            return list(self._errors)

    @property
    def rejections(self) -> list[str]:
        """Messages of the requests the fake's validation answered HTTP 400 (strict-mode rule
        violations and malformed bodies), in arrival order (a copy)."""
        with self._lock:
            return list(self._rejections)

    @property
    def pending_faults(self) -> int:
        """How many injected fault applications are still queued."""
        with self._lock:
            return sum(entry[1] for entry in self._faults)

    @property
    def in_flight(self) -> int:
        """Requests being answered right now (not counting ones rejected by max_concurrency)."""
        with self._lock:
            return self._inflight

    @property
    def peak_in_flight(self) -> int:
        """The most requests that were being answered at once since start (or reset())."""
        with self._lock:
            return self._peak_inflight

    @property
    def script_position(self) -> int:
        """How many root-script entries have been consumed."""
        with self._lock:
            return self._script_pos

    def count(self, kind: Kind | None = None, *, include_faulted: bool = False) -> int:
        """Number of requests of ``kind`` (None: all); faulted ones only if ``include_faulted``."""
        self._check_kind(kind)
        with self._lock:
            return sum(
                1
                for r in self._requests
                if (kind is None or r.kind == kind) and (include_faulted or not r.faulted)
            )

    # ------------------------------------------------------------------ message batches (test API)

    @property
    def batches(self) -> list[FakeBatch]:
        """Every message batch created so far (deleted ones excluded), oldest first. Looking
        at them advances their processing, as a client's retrieve would."""
        with self._batch_lock:
            return [self._batch_snapshot(batch) for batch in self._batches.values()]

    @property
    def batch_calls(self) -> list[FakeBatchCall]:
        """The calls to the batch endpoints so far, in arrival order (a copy)."""
        with self._batch_lock:
            return list(self._batch_calls)

    def inject_batch_fault(
        self, fault: Fault, times: int = 1, operation: str | None = None
    ) -> None:
        """Apply ``fault`` to the next ``times`` calls to a batch endpoint (``operation``:
        ``"create"``, ``"retrieve"``, ``"results"``, ``"cancel"``, ``"list"``, ``"delete"``;
        None: any). A faulted create makes no batch."""
        if not isinstance(fault, Fault):
            raise TypeError(f"inject_batch_fault() takes a Fault, got {type(fault).__name__}")
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        operations = ("create", "retrieve", "results", "cancel", "list", "delete")
        if operation is not None and operation not in operations:
            raise ValueError(f"operation must be one of {operations} or None, got {operation!r}")
        with self._batch_lock:
            self._batch_faults.append([fault, times, operation])

    def reset(self) -> None:
        """Forget recorded requests, errors, rejections, queued faults, batch calls and the
        in-flight peak.

        The root script keeps its place, and message batches stay (they are server state).
        """
        with self._lock:
            self._peak_inflight = self._inflight
            self._requests.clear()
            self._faults.clear()
            self._errors.clear()
            self._rejections.clear()
        with self._batch_lock:
            self._batch_calls.clear()
            self._batch_faults.clear()

    @staticmethod
    def _check_kind(kind: str | None) -> None:
        if kind is not None and kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS} or None, got {kind!r}")

    # ------------------------------------------------------------------ request handling

    def _dispatch(
        self,
        method: str,
        raw_path: str,
        headers: dict[str, str],
        body: bytes,
        arrived: float | None = None,
    ) -> _Out:
        path = urlsplit(raw_path).path.rstrip("/") or "/"
        if path == "/health":
            if method != "GET":
                return _error_out(
                    405, f"{method} {path} is not allowed; use GET", "invalid_request_error"
                )
            return _Out(200, b"ok", "text/plain; charset=utf-8")
        if path.startswith("/v1/messages/batches"):
            return self._batch_endpoint(method, raw_path, path, headers, body)
        if path in ("/v1/messages", "/v1/messages/count_tokens"):
            if method != "POST":
                return _error_out(
                    405, f"{method} {path} is not allowed; use POST", "invalid_request_error"
                )
            if path.endswith("count_tokens"):
                return self._count_tokens(body)
            return self._messages(headers, body, time.monotonic() if arrived is None else arrived)
        return _error_out(404, f"FakeAnthropic does not serve {method} {path}", "not_found_error")

    def _count_tokens(self, raw: bytes) -> _Out:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return _error_out(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error_out(400, "request body must be a JSON object")
        return _Out(200, _json_bytes({"input_tokens": self._input_tokens(body)}))

    @staticmethod
    def _input_tokens(body: dict[str, Any]) -> int:
        parts = [body[key] for key in ("system", "messages", "tools") if key in body]
        return max(
            1, _estimate_tokens(json.dumps(parts, ensure_ascii=False, separators=(",", ":")))
        )

    def _cache_minimum(self, model: str) -> int:
        if self.cache_min_tokens is not None:
            return self.cache_min_tokens
        rules = rules_for(model)
        if rules is not None and rules.min_cache_tokens is not None:
            return rules.min_cache_tokens
        return 1024

    def _cache_usage(self, body: dict[str, Any]) -> tuple[int, int, int]:
        """(uncached input, cache-write, cache-read) tokens of a request."""
        total = self._input_tokens(body)
        if not self.prompt_caching:
            return total, 0, 0
        digest = hashlib.sha256()
        tokens = 0
        # Every block boundary can hit (the API looks back from each breakpoint); only the
        # prefixes at breakpoints are written.
        boundaries: list[tuple[str, int, bool]] = []
        segments = _cache_segments(body)
        if body.get("cache_control") and segments:  # automatic caching: the last block
            segments[-1] = (segments[-1][0], True)
        for segment, marked in segments:
            digest.update(segment.encode("utf-8"))
            tokens += _estimate_tokens(segment)
            boundaries.append((digest.copy().hexdigest(), min(tokens, total), marked))
        minimum = self._cache_minimum(str(body.get("model", "")))
        marks = [(h, n) for h, n, marked in boundaries if marked and n >= minimum]
        if not marks:
            return total, 0, 0
        with self._lock:
            read = next((n for h, n, _ in reversed(boundaries) if h in self._prefixes), 0)
            self._prefixes.update(h for h, _ in marks)
        written = max(0, marks[-1][1] - read)
        return max(0, total - read - written), written, read

    def _next_serial(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def _classify(
        self, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[dict[str, Any], str | None]:
        """The :class:`FakeRequest` fields of a Messages request body (its kind, parsed filter
        input and options) and the first reason the API would reject it (None: valid). Shared
        by ``POST /v1/messages`` and the requests of a message batch."""
        model = body["model"] if isinstance(body.get("model"), str) else ""
        rules = rules_for(model)
        system = _content_text(body.get("system", ""))
        last_user = _last_user_text(body.get("messages"))
        fmt = _output_format(body)
        output_format = fmt if isinstance(fmt, dict) else None
        found = _PREDICATE_RE.search(system)
        kind: Kind
        predicate: str | None = None
        rows: list[tuple[int, dict[str, Any]]] | None = None
        channel: VerdictChannel | None = None
        if WHERE_TOOL_NAME in _tool_names(body.get("tools")):
            kind = "where"
            if output_format is not None:
                channel = "structured"
            else:
                channel = "forced_tool" if _forced_tool_choice(body) else "tool"
        elif output_format is not None and found and not body.get("tools"):
            kind, channel = "where", "structured"
        elif model == self.root_model:
            kind = "root"
        else:
            kind = "sub"
        if kind == "where":
            predicate = found.group(1).strip() if found else None
            rows = _parse_rows(last_user)
        problem = _validate_body(body)
        if problem is None and self.strict:
            problem = _generic_problem(body)
            if problem is None and rules is not None:
                problem = _model_problem(body, rules)
        fields = {
            "kind": kind,
            "model": model,
            "body": body,
            "headers": headers,
            "system": system,
            "last_user_text": last_user,
            "predicate": predicate,
            "rows": rows,
            "family": rules.family if rules else None,
            "thinking": _thinking(body),
            "effort": _effort(body),
            "output_format": output_format,
            "verdict_channel": channel,
        }
        return fields, problem

    def _messages(self, raw_headers: dict[str, str], raw: bytes, arrived: float) -> _Out:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return _error_out(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error_out(400, "request body must be a JSON object")

        fields, problem = self._classify(body, _redacted(raw_headers))
        kind: Kind = fields["kind"]
        with self._lock:
            fault: Fault | None = None
            rejected = (
                not problem
                and self.max_concurrency is not None
                and self._inflight >= self.max_concurrency
            )
            if rejected:
                fault = Fault(
                    status=429,
                    retry_after_s=self.rate_limit_retry_after_s,
                    message=(
                        f"fake rate limit: {self._inflight} requests in flight, "
                        f"max_concurrency={self.max_concurrency}"
                    ),
                )
            elif not problem:
                fault = self._pick_fault(kind)
            if not rejected:
                self._inflight += 1
                self._peak_inflight = max(self._peak_inflight, self._inflight)
            status = 400 if problem else (fault.status if fault else None)
            request = FakeRequest(
                index=len(self._requests),
                fault=fault,
                status=status,
                rejection=problem,
                **fields,
            )
            self._requests.append(request)
            if problem:
                self._rejections.append(problem)

        if rejected:
            assert fault is not None
            return self._fault_out(fault)
        try:
            if problem:
                return _error_out(400, problem)
            if fault is not None:
                if fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault.status is not None:
                    return self._fault_out(fault)
            try:
                result = self._answer(request)
                if isinstance(result, Fault):
                    if result.status is None:
                        raise _UserCodeError(
                            "a Fault returned by a handler or script needs a status; for a slow "
                            "normal reply use fake.inject(Fault(delay_s=...)) instead"
                        )
                    self._finish(request, result.status, result)
                    if result.delay_s:
                        time.sleep(result.delay_s)
                    return self._fault_out(result)
                payload, output_tokens = self._render(request, result)
            except _UserCodeError as exc:
                self._finish(request, 400)
                return _error_out(400, str(exc))
            # The modelled latency is the request's whole time in the server: the fake's own
            # work (parsing, validating, judging) happens inside it, not on top of it.
            delay = self.latency_s + self.latency_per_output_token_s * output_tokens
            remaining = arrived + delay - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
            self._finish(request, 200)
            return _Out(
                200,
                _json_bytes(payload),
                headers=[("request-id", f"req_fake_{self._next_serial()}")],
            )
        finally:
            with self._lock:
                self._inflight -= 1

    def _pick_fault(self, kind: Kind) -> Fault | None:
        """Called with the lock held: the queued fault for this request, else a random one."""
        queued = _take_queued(self._faults, kind)
        if queued is not None:
            return queued
        if self.fault_rate > 0 and self._rng.random() < self.fault_rate:
            status = self._rng.choice(self.fault_statuses)
            return Fault(
                status=status,
                retry_after_s=self.rate_limit_retry_after_s,
                message=f"fake random fault ({status})",
            )
        return None

    def _finish(self, request: FakeRequest, status: int, fault: Fault | None = None) -> None:
        """Record the final HTTP status (and a handler-returned fault) of ``request``."""
        with self._lock:
            pos = request.index
            if pos < len(self._requests) and self._requests[pos] is request:
                self._requests[pos] = dataclasses.replace(
                    request, status=status, fault=fault or request.fault
                )

    def _fault_out(self, fault: Fault) -> _Out:
        assert fault.status is not None
        message = fault.message or f"fake {fault.error_type} (injected HTTP {fault.status})"
        out = _error_out(fault.status, message, fault.error_type)
        out.headers.append(("request-id", f"req_fake_{self._next_serial()}"))
        if fault.retry_after_s is not None:
            # The SDK reads retry-after-ms first (precise), then retry-after as float seconds.
            out.headers.append(("retry-after", _fmt_seconds(fault.retry_after_s)))
            out.headers.append(("retry-after-ms", _fmt_seconds(fault.retry_after_s * 1000)))
        return out

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            with self._lock:
                self._errors.append(exc)
            raise _UserCodeError(f"fake {what} raised {type(exc).__name__}: {exc}") from exc

    def _answer(self, request: FakeRequest) -> Any:
        if self._handler is not None:
            return self._call("handler", self._handler, request)
        if request.kind == "where":
            return self._answer_where(request)
        if request.kind == "root":
            return self._answer_root(request)
        if isinstance(self._sub, str):
            return self._sub
        return self._call("sub", self._sub, request)

    def _answer_root(self, request: FakeRequest) -> Any:
        if self._root_fn is not None:
            return self._call("root", self._root_fn, request)
        if self._script is None:
            raise _UserCodeError(
                f"fake got a root request (model={request.model!r}) but no root= script was given"
            )
        with self._lock:
            pos = self._script_pos
            exhausted = pos >= len(self._script)
            if not exhausted:
                self._script_pos += 1
        if exhausted:
            raise _UserCodeError(
                f"fake root script exhausted after {len(self._script)} replies; "
                "add entries to root=[...] or pass a callable"
            )
        entry = self._script[pos]
        if callable(entry):
            return self._call(f"root script entry #{pos}", entry, request)
        return entry

    def _answer_where(self, request: FakeRequest) -> Any:
        if self._where_reply is not None:
            return self._call("where_reply", self._where_reply, request)
        if self._where is None:
            asked = (
                "output_config.format"
                if request.verdict_channel == "structured"
                else "tool 'record_verdicts'"
            )
            raise _UserCodeError(
                f"fake got a semantic-filter request ({asked}) but no judge; "
                "pass where=lambda predicate, row: ... to FakeAnthropic"
            )
        if request.predicate is None:
            raise _UserCodeError(
                "semantic-filter request has no <predicate>...</predicate> in its system prompt"
            )
        verdicts = []
        refused = False
        for row_id, row in request.rows or []:
            verdict = self._call("where judge", self._where, request.predicate, row)
            if verdict is REFUSE:
                refused = True
                continue
            match, reason = verdict if isinstance(verdict, tuple) else (verdict, "")
            if not isinstance(match, bool) or not isinstance(reason, str):
                raise _UserCodeError(
                    "fake where judge must return bool, (bool, str) or REFUSE, got "
                    f"{verdict!r} for row {row_id}"
                )
            verdicts.append({"id": row_id, "match": match, "reason": reason})
        if refused:
            return REFUSE
        answer = verdicts_in_schema(verdicts, _verdict_schema(request))
        if request.verdict_channel == "structured":
            return FakeReply(text=json.dumps(answer, ensure_ascii=False))
        return ToolUse(name=WHERE_TOOL_NAME, input=answer)

    def _thinking_spend(self, request: FakeRequest) -> tuple[int, str] | None:
        """(thinking tokens, thinking text) when the model thinks for ``request``, else None."""
        rules = rules_for(request.model)
        thinking = request.thinking or {}
        kind = thinking.get("type")
        if kind is None:
            thinks = rules is not None and rules.thinks_by_default
        else:
            thinks = kind in ("adaptive", "enabled")
        if not thinks:
            return None
        level = request.effort or (rules.default_effort if rules else None) or "high"
        tokens = self.thinking_tokens.get(level, DEFAULT_THINKING_TOKENS["high"])
        budget = thinking.get("budget_tokens")
        if kind == "enabled" and isinstance(budget, int):
            tokens = min(tokens, budget)
        display = thinking.get("display") or (rules.default_display if rules else "summarized")
        text = f"Fake thinking ({tokens} tokens)." if display == "summarized" else ""
        return tokens, text

    def _render(self, request: FakeRequest, result: Any) -> tuple[dict[str, Any], int]:
        """The response body for ``result`` and its (billed) output tokens."""
        if isinstance(result, dict):
            return result, max(1, _estimate_tokens(json.dumps(result)))
        if result is REFUSE:
            result = FakeReply(stop_reason="refusal")
        elif isinstance(result, str):
            result = FakeReply(text=result)
        elif isinstance(result, ToolUse):
            result = FakeReply(tool_use=result)
        if not isinstance(result, FakeReply):
            raise _UserCodeError(
                f"fake {request.kind} reply must be str, FakeReply, ToolUse, dict, REFUSE or "
                f"Fault, got {type(result).__name__}: {result!r}"
            )
        refusal = result.stop_reason == "refusal"
        if (
            request.output_format is not None
            and request.kind != "where"
            and not refusal
            and (result.text or result.tool_use is None)
        ):
            try:
                json.loads(result.text)
            except ValueError as exc:
                raise _UserCodeError(
                    f"the {request.kind} request asks for structured output "
                    "(output_config.format), so the fake model must answer JSON, but the "
                    f"scripted reply is not valid JSON ({exc}): {result.text[:200]!r}"
                ) from exc
        serial = self._next_serial()
        text, tool = result.text, result.tool_use
        stop_reason = result.stop_reason or ("tool_use" if tool else "end_turn")
        spend = None if refusal else self._thinking_spend(request)
        thinking_tokens = spend[0] if spend else 0

        def reply_tokens() -> int:
            body = text + (json.dumps(tool.input, ensure_ascii=False) if tool else "")
            return _estimate_tokens(body)

        room = request.body["max_tokens"] - thinking_tokens
        cut = spend is not None and reply_tokens() > room
        if cut:
            # Thinking counts against max_tokens: what is left of it cuts the answer short.
            stop_reason, tool = "max_tokens", None
            if room <= 0:
                thinking_tokens, text = request.body["max_tokens"], ""
            else:
                text = text[: room * 4]
        content: list[dict[str, Any]] = []
        if spend is not None:
            content.append(
                {"type": "thinking", "thinking": spend[1], "signature": f"fake-signature-{serial}"}
            )
        if text or (tool is None and not refusal and not cut):
            content.append({"type": "text", "text": text})
        if tool is not None:
            content.append(
                {
                    "type": "tool_use",
                    "id": tool.id or f"toolu_fake_{serial}",
                    "name": tool.name,
                    "input": tool.input,
                }
            )
        uncached, written, read = self._cache_usage(request.body)
        usage: dict[str, Any] = {
            "input_tokens": uncached,
            "output_tokens": max(1, thinking_tokens + reply_tokens()),
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
        }
        if spend is not None:
            usage["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
        usage.update(result.usage or {})
        stop_details = None
        if refusal:
            stop_details = result.stop_details or {
                "type": "refusal",
                "category": None,
                "explanation": "fake refusal",
            }
        payload = {
            "id": f"msg_fake_{serial}",
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "stop_details": stop_details,
            "usage": usage,
        }
        return payload, int(usage["output_tokens"])

    # ------------------------------------------------------------------ message batches

    def _batch_endpoint(
        self, method: str, raw_path: str, path: str, headers: dict[str, str], body: bytes
    ) -> _Out:
        found = _BATCH_PATH_RE.match(path)
        batch_id = found.group("id") if found else None
        op = found.group("op") if found else None
        operation = {
            ("POST", False, None): "create",
            ("GET", False, None): "list",
            ("GET", True, None): "retrieve",
            ("DELETE", True, None): "delete",
            ("GET", True, "results"): "results",
            ("POST", True, "cancel"): "cancel",
        }.get((method, batch_id is not None, op))
        if found is None:
            return _error_out(404, f"FakeAnthropic does not serve {method} {path}")
        if operation is None:
            return _error_out(405, f"{method} {path} is not allowed", "invalid_request_error")
        with self._batch_lock:
            fault = self._pick_batch_fault(operation)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status is not None:
            out = self._fault_out(fault)
        elif operation == "create":
            out, batch_id = self._create_batch(headers, body)
        elif operation == "list":
            out = self._list_batches(parse_qs(urlsplit(raw_path).query))
        else:
            assert batch_id is not None
            out = self._batch_operation(operation, batch_id)
        with self._batch_lock:
            self._batch_calls.append(FakeBatchCall(operation, batch_id, out.status))
        return out

    def _pick_batch_fault(self, operation: str) -> Fault | None:
        """Called with the batch lock held: the queued fault for this batch call, if any."""
        return _take_queued(self._batch_faults, operation)

    def _create_batch(self, raw_headers: dict[str, str], raw: bytes) -> tuple[_Out, str | None]:
        if len(raw) > self.max_batch_bytes:
            return _error_out(
                413,
                f"Message batch request body is {len(raw):,} bytes; the limit is "
                f"{self.max_batch_bytes:,} bytes. Split the requests into smaller batches.",
            ), None
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return _error_out(400, f"request body is not valid JSON: {exc}"), None
        problem = self._batch_problem(body)
        if problem is not None:
            return _error_out(400, problem), None
        with self._batch_lock:
            batch_id = f"msgbatch_fake_{self._next_serial():06d}"
            batch = _Batch(
                id=batch_id,
                requests=[(r["custom_id"], r["params"]) for r in body["requests"]],
                headers=_redacted(raw_headers),
                created=time.time(),
                created_mono=time.monotonic(),
            )
            self._batches[batch_id] = batch
            return _Out(200, _json_bytes(self._batch_json(batch))), batch_id

    def _batch_problem(self, body: Any) -> str | None:
        """Why the API refuses a create outright (the envelope; each request's params are
        validated later, into an ``errored`` result)."""
        if not isinstance(body, dict):
            return "request body must be a JSON object"
        for name in body:
            if name != "requests":
                return f"{name}: Extra inputs are not permitted"
        requests = body.get("requests")
        if not isinstance(requests, list):
            return "requests: Field required (a list of {custom_id, params} objects)"
        if not requests:
            return "requests: List should have at least 1 item after validation, not 0"
        if len(requests) > self.max_batch_requests:
            return (
                f"requests: List should have at most {self.max_batch_requests} items after "
                f"validation, not {len(requests)}"
            )
        seen: dict[str, int] = {}
        for i, item in enumerate(requests):
            if not isinstance(item, dict):
                return f"requests.{i}: Input should be an object"
            for name in item:
                if name not in ("custom_id", "params"):
                    return f"requests.{i}.{name}: Extra inputs are not permitted"
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str):
                return f"requests.{i}.custom_id: Field required (a string)"
            if not _CUSTOM_ID_RE.match(custom_id):
                return (
                    f"requests.{i}.custom_id: String should match pattern '{_CUSTOM_ID_RE.pattern}'"
                )
            if custom_id in seen:
                return (
                    f"requests.{i}.custom_id: custom_id {custom_id!r} is also used by "
                    f"requests.{seen[custom_id]}; each request in a batch needs a unique custom_id"
                )
            seen[custom_id] = i
            if not isinstance(item.get("params"), dict):
                return f"requests.{i}.params: Field required (an object)"
        return None

    def _batch_operation(self, operation: str, batch_id: str) -> _Out:
        with self._batch_lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                return _error_out(404, f"message batch {batch_id!r} not found")
            self._advance(batch)
            ended = batch.results is not None
            if operation == "retrieve":
                return _Out(200, _json_bytes(self._batch_json(batch)))
            if operation == "cancel":
                if not ended and batch.cancel_mono is None:
                    now = time.monotonic()
                    batch.cancel_mono, batch.cancel_wall = now, time.time()
                    batch.cancel_processed = self._processed_by(batch, now)
                return _Out(200, _json_bytes(self._batch_json(batch)))
            if operation == "delete":
                if not ended:
                    return _error_out(
                        400,
                        f"Message batch {batch_id} is still processing: it can be deleted once "
                        "it has ended. Cancel it first.",
                    )
                del self._batches[batch_id]
                return _Out(200, _json_bytes({"id": batch_id, "type": "message_batch_deleted"}))
            assert operation == "results"
            if batch.results is None:
                return _error_out(
                    400,
                    f"Message batch {batch_id} has not ended yet (processing_status "
                    f"{self._status(batch)}); its results are available once it has.",
                )
            lines = list(batch.results.items())
            self._batch_rng.shuffle(lines)  # the real API keeps no order either
        text = "".join(
            json.dumps({"custom_id": cid, "result": result}, ensure_ascii=False) + "\n"
            for cid, result in lines
        )
        return _Out(200, text.encode("utf-8"), "application/x-jsonl")

    def _list_batches(self, query: dict[str, list[str]]) -> _Out:
        try:
            limit = int(query.get("limit", ["20"])[0])
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            return _error_out(400, "limit: Input should be an integer between 1 and 1000")
        with self._batch_lock:
            newest_first = list(reversed(self._batches.values()))
            ids = [b.id for b in newest_first]
            after, before = query.get("after_id", [None])[0], query.get("before_id", [None])[0]
            for cursor in (after, before):
                if cursor is not None and cursor not in ids:
                    return _error_out(404, f"message batch {cursor!r} not found")
            if after is not None:
                page = newest_first[ids.index(after) + 1 :]
                has_more = len(page) > limit
                page = page[:limit]
            elif before is not None:
                older = newest_first[: ids.index(before)]
                has_more = len(older) > limit
                page = older[-limit:]
            else:
                has_more = len(newest_first) > limit
                page = newest_first[:limit]
            for batch in page:
                self._advance(batch)
            data = [self._batch_json(batch) for batch in page]
        payload = {
            "data": data,
            "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
        }
        return _Out(200, _json_bytes(payload))

    def _processed_by(self, batch: _Batch, now: float) -> int:
        """How many of ``batch``'s requests (in order) are processed at ``now``: they finish
        evenly over ``batch_delay_s``."""
        total = len(batch.requests)
        if self.batch_delay_s <= 0:
            return total
        share = (now - batch.created_mono) / self.batch_delay_s
        return max(0, min(total, math.floor(total * share)))

    def _advance(self, batch: _Batch) -> None:
        """Called with the batch lock held: end ``batch`` if its time has come (processing
        every request it processed), so that each request is answered exactly once."""
        if batch.results is not None:
            return
        now = time.monotonic()
        if batch.cancel_mono is not None:
            if now > batch.cancel_mono:  # "canceling" lasts until the next look
                self._end(batch, batch.cancel_processed)
        elif now >= batch.created_mono + self.batch_delay_s:
            self._end(batch, len(batch.requests))

    def _end(self, batch: _Batch, processed: int) -> None:
        batch.results = {
            custom_id: (
                self._batch_result(batch, custom_id, params)
                if i < processed
                else {"type": "canceled"}
            )
            for i, (custom_id, params) in enumerate(batch.requests)
        }
        batch.ended = time.time()

    def _batch_result(
        self, batch: _Batch, custom_id: str, params: dict[str, Any]
    ) -> dict[str, Any]:
        """The result of one batch request: what ``/v1/messages`` would have answered, unless
        ``batch_outcome`` / ``batch_error_rate`` decide otherwise."""
        fields, problem = self._classify(params, batch.headers)
        request = FakeRequest(
            index=-1,
            status=400 if problem else None,
            rejection=problem,
            batch_id=batch.id,
            custom_id=custom_id,
            **fields,
        )
        outcome: Any = None
        if problem is None:
            try:
                outcome = self._pick_batch_outcome(request)
            except _UserCodeError as exc:
                problem = str(exc)
                request = dataclasses.replace(request, status=400)
        if outcome == "expired":  # never reached the model: not logged as a request
            return {"type": "expired"}
        with self._lock:
            request = dataclasses.replace(request, index=len(self._requests))
            self._requests.append(request)
            if problem and request.rejection:
                self._rejections.append(problem)
        if problem:
            return _errored("invalid_request_error", problem)
        if outcome is not None:
            fault = Fault(status=_ERROR_STATUS[outcome], message=f"fake batch {outcome}")
            self._finish(request, _ERROR_STATUS[outcome], fault)
            return _errored(outcome, f"fake {outcome} (batch_outcome / batch_error_rate)")
        try:
            result = self._answer(request)
            if isinstance(result, Fault):
                if result.status is None:
                    raise _UserCodeError(
                        "a Fault returned by a handler or script needs a status in a batch too"
                    )
                self._finish(request, result.status, result)
                message = result.message or f"fake {result.error_type} (HTTP {result.status})"
                return _errored(result.error_type, message)
            payload, _ = self._render(request, result)
        except _UserCodeError as exc:
            self._finish(request, 400)
            return _errored("invalid_request_error", str(exc))
        self._finish(request, 200)
        return {"type": "succeeded", "message": payload}

    def _pick_batch_outcome(self, request: FakeRequest) -> BatchOutcome:
        if self._batch_outcome is not None:
            outcome = self._call("batch_outcome", self._batch_outcome, request)
            if outcome is not None and outcome != "expired" and outcome not in _ERROR_STATUS:
                raise _UserCodeError(
                    "fake batch_outcome must return None, 'expired' or an API error type "
                    f"({', '.join(sorted(_ERROR_STATUS))}), got {outcome!r}"
                )
            return cast(BatchOutcome, outcome)
        # Called with the batch lock held, which guards the batch rng.
        if self.batch_error_rate > 0 and self._batch_rng.random() < self.batch_error_rate:
            return self._batch_rng.choice(("api_error", "overloaded_error"))
        return None

    def _status(self, batch: _Batch) -> str:
        if batch.results is not None:
            return "ended"
        return "canceling" if batch.cancel_mono is not None else "in_progress"

    def _counts(self, batch: _Batch) -> dict[str, int]:
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if batch.results is None:  # the real API counts outcomes only once the batch ends
            counts["processing"] = len(batch.requests)
        else:
            for result in batch.results.values():
                counts[result["type"]] += 1
        return counts

    def _batch_json(self, batch: _Batch) -> dict[str, Any]:
        ended = batch.results is not None
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": self._status(batch),
            "request_counts": self._counts(batch),
            "ended_at": _rfc3339(batch.ended),
            "created_at": _rfc3339(batch.created),
            "expires_at": _rfc3339(batch.created + _BATCH_EXPIRY_S),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(batch.cancel_wall),
            "results_url": (
                f"{self.base_url}/v1/messages/batches/{batch.id}/results" if ended else None
            ),
        }

    def _batch_snapshot(self, batch: _Batch) -> FakeBatch:
        self._advance(batch)
        return FakeBatch(
            id=batch.id,
            custom_ids=tuple(cid for cid, _ in batch.requests),
            params=tuple(params for _, params in batch.requests),
            headers=dict(batch.headers),
            processing_status=self._status(batch),
            request_counts=self._counts(batch),
            cancel_requested=batch.cancel_mono is not None,
            results=None if batch.results is None else dict(batch.results),
        )
