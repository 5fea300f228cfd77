"""Hide key-shaped strings before text reaches trajectories, logs or metadata.

    >>> redact("key=sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123456789")
    'key=[REDACTED]'
    >>> redact("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig")
    'Authorization: Bearer [REDACTED]'
    >>> redact("max_tokens=100000 and 42 tickets")
    'max_tokens=100000 and 42 tickets'

Model-written code never holds a secret (see the README's "Security model"), so this is a
last line of defence for what the host writes down: a key pasted into a question, a
credential inside warehouse data that a cell printed, a provider error echoing a header.
It recognises credentials by their shape (Anthropic, OpenAI-style, AWS, GitHub, Slack,
Google keys, JWTs, bearer tokens, private-key blocks, URL passwords, and values after
``api_key=``, ``token:``, ``password=`` ...), not by knowing the secrets themselves.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact"]

REDACTED = "[REDACTED]"

# Every pattern starts at a literal or a word boundary and has no unbounded prefix before
# its keyword, so matching stays linear on long runs of identifier characters (a model can
# print a gigabyte of "x").
_SECRET_NAME = (
    r"(?:api[_-]?key|apikey|secret[_-]?key|secret|token|passwd|password|pwd|access[_-]?key|"
    r"private[_-]?key|credentials?|auth)"
)
# Whole-string shapes of well-known credentials.
_SHAPES = re.compile(
    "|".join(
        [
            r"\bsk-ant-[A-Za-z0-9_\-]{8,}",  # Anthropic
            r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{20,}",  # OpenAI-style and Stripe
            r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b",  # AWS key ids
            r"\bgh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
            r"\bgithub_pat_[A-Za-z0-9_]{30,}",
            r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
            r"\bAIza[0-9A-Za-z_\-]{30,}",  # Google API keys
            r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWTs
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)",
        ]
    ),
    re.S,
)
_BEARER = re.compile(
    r"(?i)\b(bearer|basic)([ \t]{1,8})(?=[A-Za-z0-9\-._~+/]{0,256}?[0-9=+/])"
    r"[A-Za-z0-9\-._~+/]{8,}=*"
)
_HEADER = re.compile(
    r"(?i)\b(x-api-key|api-key|authorization|proxy-authorization)(\"?[ \t]{0,8}[:=][ \t]{0,8}\"?)"
    r"(?!(?:bearer|basic)\b|\[REDACTED\])[^\s\"',;]{6,}"
)
_URL_PASSWORD = re.compile(r"(?i)(?<![a-z0-9+.\-])([a-z][a-z0-9+.\-]*+://[^\s:/@]++:)[^\s@/]++(@)")
# name=value, name: value, "name": "value" where the name says it is a secret. A value that
# is only digits (max_tokens=100000) is a count, not a secret.
_ASSIGNMENT = re.compile(
    rf"(?i)({_SECRET_NAME}[\"']?[ \t]{{0,8}}[:=][ \t]{{0,8}}[\"']?)"
    rf"(?!\d{{1,512}}\b|\[REDACTED\])([^\s\"',;&)}}\]]{{6,512}})"
)
# key=<long hex or base64>: a bare "key" is too common a word to hide anything shorter.
_KEY_VALUE = re.compile(
    r"(?i)(key[\"']?[ \t]{0,8}[:=][ \t]{0,8}[\"']?)"
    r"(?=[A-Za-z0-9+/=_\-]{0,256}?\d)(?=[A-Za-z0-9+/=_\-]{0,256}?[A-Za-z])"
    r"([A-Za-z0-9+/=_\-]{16,256})"
)


def redact(text: str) -> str:
    """``text`` with every key-shaped substring replaced by ``[REDACTED]``.

    >>> redact("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    'AWS_ACCESS_KEY_ID=[REDACTED]'
    >>> redact("postgres://app:hunter2@db:5432/x")
    'postgres://app:[REDACTED]@db:5432/x'
    """
    if not text:
        return text
    text = _SHAPES.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(2)}", text)
    text = _ASSIGNMENT.sub(lambda m: m.group(1) + REDACTED, text)
    return _KEY_VALUE.sub(lambda m: m.group(1) + REDACTED, text)
