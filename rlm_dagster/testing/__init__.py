"""Test helpers for rlm_dagster pipelines: a fake Anthropic Messages API server.

    >>> from rlm_dagster.testing import FakeAnthropic
    >>> with FakeAnthropic(root=["FINAL('done')"]) as fake:
    ...     fake.base_url.startswith("http://127.0.0.1:")
    True

See :mod:`rlm_dagster.testing.fake_server` for the full guide.
"""

from rlm_dagster.testing.fake_server import (
    FakeAnthropic,
    FakeReply,
    FakeRequest,
    Fault,
    HandlerResult,
    Kind,
    Reply,
    RootEntry,
    ToolUse,
    WhereJudge,
)

__all__ = [
    "FakeAnthropic",
    "FakeReply",
    "FakeRequest",
    "Fault",
    "HandlerResult",
    "Kind",
    "Reply",
    "RootEntry",
    "ToolUse",
    "WhereJudge",
]
