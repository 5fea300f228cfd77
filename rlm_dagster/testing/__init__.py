"""Test helpers for rlm_dagster pipelines: a fake Anthropic Messages API server.

    >>> from rlm_dagster.testing import FakeAnthropic
    >>> with FakeAnthropic(root=["FINAL('done')"]) as fake:
    ...     fake.base_url.startswith("http://127.0.0.1:")
    True

The fake is strict by default: requests a real Claude model would reject are answered HTTP 400
(see :data:`MODEL_RULES`). See :mod:`rlm_dagster.testing.fake_server` for the full guide.
"""

from rlm_dagster.testing.fake_server import (
    DEFAULT_THINKING_TOKENS,
    EFFORT_LEVELS,
    MODEL_RULES,
    REFUSE,
    FakeAnthropic,
    FakeReply,
    FakeRequest,
    Fault,
    HandlerResult,
    Kind,
    ModelRules,
    RefuseType,
    Reply,
    RootEntry,
    ToolUse,
    VerdictChannel,
    WhereJudge,
    rules_for,
    shape_verdicts,
)

__all__ = [
    "DEFAULT_THINKING_TOKENS",
    "EFFORT_LEVELS",
    "MODEL_RULES",
    "REFUSE",
    "FakeAnthropic",
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
]
