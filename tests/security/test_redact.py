"""Key-shaped strings never reach trajectories, logs or metadata."""

from __future__ import annotations

import time

import pytest

from rlm_dagster.engine.loop import Turn, render_trajectory
from rlm_dagster.redact import REDACTED, redact
from rlm_dagster.repl.host import CellResult

SECRETS = [
    ("sk-ant-api03-Xy9_abcdefghijklmnopqrstuvwxyz0123456789-AAAA", "{}"),
    ("sk-proj-abcdefghijklmnopqrstuvwxyz012345", "OPENAI_API_KEY={}"),
    ("AKIAIOSFODNN7EXAMPLE", "aws id {} here"),
    ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "aws_secret_access_key = {}"),
    ("ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token {}"),
    ("xoxb-1234567890-abcdefghij", "slack: {}"),
    ("AIzaSyA-abcdefghijklmnopqrstuvwxyz0123456", "google {}"),
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abcdefghijklmnop", "jwt {}"),
    ("abc123def456ghi789", '{{"api_key": "{}"}}'),
    ("hunter2hunter2", "password={}"),
    ("correct-horse-battery", "DB_PASSWORD: {}"),
    ("s3cr3t-t0k3n-value", "Authorization: Bearer {}"),
    ("dXNlcjpwYXNzd29yZDEyMw==", "Authorization: Basic {}"),
    ("abcdef0123456789abcdef", "x-api-key: {}"),
    ("3f9a8b7c6d5e4f3a2b1c0d9e", "key={}"),
    ("pa55word", "postgres://app:{}@db.internal:5432/warehouse"),
    (
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC",
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
    ),
]


@pytest.mark.parametrize(("secret", "template"), SECRETS, ids=[t for _, t in SECRETS])
def test_key_shaped_strings_are_redacted(secret: str, template: str) -> None:
    text = "before " + template.format(secret) + " after"
    out = redact(text)
    assert secret not in out
    assert REDACTED in out
    assert out.startswith("before ") and out.endswith(" after")


@pytest.mark.parametrize(
    "text",
    [
        "max_tokens=100000, total_tokens: 4096",
        "Password reset request from customer 42",
        "author: Jane Doe",
        "primary_key: customer_id",
        "The key is to ship fast; tokens are cheap.",
        "https://example.com/docs/sk-learn",
        "Bearer of bad news",
        "a basic understanding of SQL",
        "SELECT count(*) AS n FROM tickets WHERE body ILIKE '%refund%'",
        "iteration 3/20: ran 2 cell(s), 14 lines of code; spend so far $0.0123",
    ],
)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert redact(text) == text


@pytest.mark.parametrize(
    "text",
    ["x" * 200_000, "a." * 100_000, "key=" * 50_000, "token=" * 30_000, "http" * 50_000],
    ids=["identifier-run", "dotted", "key-run", "token-run", "scheme-run"],
)
def test_long_adversarial_text_is_redacted_in_linear_time(text: str) -> None:
    # A quadratic pattern takes minutes on these (the first version did): a model can print
    # anything, and the host redacts every trajectory.
    started = time.monotonic()
    redact(text)
    assert time.monotonic() - started < 5.0


def test_trajectory_is_redacted() -> None:
    key = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789"
    cell = CellResult(code=f"key = '{key}'", output=f"{key}\n", error=None, seconds=0.1)
    turn = Turn(iteration=1, reply=f"I found {key}.", cells=[cell], note=f"note {key}")
    markdown = render_trajectory([turn])
    assert key not in markdown
    assert markdown.count(REDACTED) == 4


def test_run_metadata_and_logs_are_redacted() -> None:
    from rlm_dagster.dagster.metadata import run_metadata
    from rlm_dagster.dagster.resource import log_event
    from rlm_dagster.engine.budget import Limits
    from rlm_dagster.engine.events import IterationDone, RunWarning
    from rlm_dagster.engine.loop import Answer, RLMResult
    from rlm_dagster.models.client import Accounting

    key = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789"
    result = RLMResult(
        question=f"Is {key} valid?",
        answer=Answer(text="no"),
        turns=[],
        accounting=Accounting(),
        duration_s=1.0,
        limits=Limits(),
    )
    meta = run_metadata(result)
    assert key not in str(meta)
    assert meta["rlm/question"] == f"Is {REDACTED} valid?"

    logged: list[str] = []

    class Log:
        def info(self, message: str) -> None:
            logged.append(message)

        warning = info

    class Context:
        log = Log()

    iteration = IterationDone(
        run_id="r0",
        depth=0,
        iteration=1,
        max_iterations=3,
        cells=1,
        code_lines=1,
        output_chars=0,
        errors=0,
        sub_calls=0,
        cost_usd=0.0,
        final=False,
        note=f"key {key}",
    )
    log_event(Context(), iteration)  # type: ignore[arg-type]
    log_event(Context(), RunWarning(f"where {key}"))  # type: ignore[arg-type]
    assert len(logged) == 2 and all(key not in m for m in logged)


def test_the_trajectory_table_keeps_everything_the_markdown_clips_and_redacts_keys() -> None:
    from rlm_dagster.engine.budget import Limits
    from rlm_dagster.engine.loop import Answer, RLMResult
    from rlm_dagster.models.client import Accounting

    key = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789"
    long_output = "x" * 10_000 + f" {key} the end"
    cell = CellResult(code="print(big)", output=long_output, error=None, seconds=0.1)
    result = RLMResult(
        question="q",
        answer=Answer(text="done"),
        turns=[Turn(iteration=1, reply="Let me look.", cells=[cell])],
        accounting=Accounting(),
        duration_s=1.0,
        limits=Limits(),
    )
    assert "more chars: see the trajectory table" in result.trajectory_markdown()
    rows = result.trajectory_table().to_pylist()
    kinds = [(r["turn"], r["cell"], r["kind"]) for r in rows]
    assert kinds == [(1, None, "reply"), (1, 1, "code"), (1, 1, "output"), (None, None, "answer")]
    output = rows[2]["text"]
    assert output.endswith(f"{REDACTED} the end") and len(output) > 10_000
    assert key not in str(rows)
