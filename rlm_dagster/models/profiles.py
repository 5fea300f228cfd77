"""What each model accepts: the capability profile of every model family, beside the prices.

    >>> profile = profile_for("claude-sonnet-5-5")
    >>> profile.forced_tool_choice, profile.verdict_channel, profile.default_effort
    (False, 'structured', 'high')
    >>> profile_for("claude-haiku-4-5-20251001").family
    'claude-haiku-4-5'
    >>> profile_for("my-local-llama").known
    False

Requests are built from the profile, never from special cases: a forced ``tool_choice``, an
``output_config.format`` (structured outputs), ``output_config.effort`` or a ``thinking``
value is sent only to a model whose profile accepts it. The facts come from Anthropic's model
pages and migration guides (Claude Sonnet 5.5, Haiku 5.5 and Opus 5.5 migration guides, the
thinking, effort, structured-outputs and prompt-caching pages; December 2026).

A model the table does not know (a local server's name, or a release newer than this table)
gets :data:`CONSERVATIVE`: nothing optional is sent (no effort, no thinking field, no
structured outputs), verdicts come through an offered tool with ``tool_choice`` auto, and
thinking blocks are still read correctly if they come. Declare a model's real profile with
``RLMResource(model_profiles={...})`` (see :class:`ModelCatalog`) instead of editing this file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rlm_dagster.errors import ConfigError
from rlm_dagster.models.prices import Price, price_cost, price_for

if TYPE_CHECKING:
    from rlm_dagster.models.client import Usage

EFFORTS = ("low", "medium", "high", "xhigh", "max")
THINKING_MODES = ("auto", "off")
VerdictChannel = Literal["structured", "forced_tool", "auto_tool"]
_DATED = re.compile(r"^(?P<family>.+)-\d{8}$")


@dataclass(frozen=True)
class ModelProfile:
    """What one model family accepts and how it thinks.

    ``thinks_by_default``: replies start with thinking blocks unless thinking is turned off.
    ``thinking_off``: the ``thinking`` value that turns up-front thinking off (``disabled``,
    or ``between_tools`` on Sonnet 5.5), or ``None`` where it cannot be turned off.
    ``thinking_off_max_effort``: the highest effort that may be combined with thinking off.
    ``min_cache_tokens``: prompts shorter than this are not cached (``None``: the endpoint
    does not cache at all).
    """

    family: str
    known: bool = True
    tools: bool = True
    forced_tool_choice: bool = True
    structured_outputs: bool = False
    sampling_params: bool = True
    prefill: bool = True
    thinks_by_default: bool = False
    thinking_off: Literal["disabled", "between_tools"] | None = "disabled"
    thinking_off_max_effort: str | None = None
    effort_levels: tuple[str, ...] = ()
    default_effort: str | None = None
    min_cache_tokens: int | None = 1024
    max_output_tokens: int = 64_000
    context_window: int = 200_000
    price: Price | None = field(default=None, compare=False)

    @property
    def verdict_channel(self) -> VerdictChannel | None:
        """How ``llm_where`` gets verdicts from this model: structured outputs, a forced
        ``record_verdicts`` tool, or the offered tool with ``tool_choice`` auto (validated and
        re-asked like the others). ``None``: the model has no way to return them."""
        if self.structured_outputs:
            return "structured"
        if self.tools and self.forced_tool_choice:
            return "forced_tool"
        if self.tools:
            return "auto_tool"
        return None

    @property
    def long_prompt_threshold(self) -> int | None:
        """Prompt tokens above which the whole request is billed at the long-prompt rate."""
        return self.price.long_prompt_threshold if self.price else None

    def effort(self, wanted: str | None) -> str | None:
        """The effort to send for ``wanted``: itself if accepted, else the nearest level below
        it (or the lowest); ``None`` (send nothing) when the model takes no effort.

        >>> profile_for("claude-sonnet-5-5").effort("low")
        'low'
        >>> profile_for("claude-haiku-4-5").effort("low") is None
        True
        """
        if wanted is None or not self.effort_levels:
            return None
        if wanted not in EFFORTS:
            raise ConfigError(f"effort must be one of {EFFORTS} or None, not {wanted!r}.")
        if wanted in self.effort_levels:
            return wanted
        below = [e for e in self.effort_levels if EFFORTS.index(e) < EFFORTS.index(wanted)]
        return below[-1] if below else self.effort_levels[0]

    def thinking_param(self, mode: str, effort: str | None) -> dict[str, str] | None:
        """The ``thinking`` field for ``mode``: ``"auto"`` leaves it out (the model's
        default); ``"off"`` turns up-front thinking off where the model allows it at this
        effort, and leaves the field out where it does not (Opus 5.5, Fable)."""
        if mode not in THINKING_MODES:
            raise ConfigError(f"thinking must be one of {THINKING_MODES}, not {mode!r}.")
        if mode == "off" and self.thinks_by_default and self.thinking_off is not None:
            ceiling = self.thinking_off_max_effort
            used = effort or self.default_effort
            if ceiling is None or used is None or EFFORTS.index(used) <= EFFORTS.index(ceiling):
                return {"type": self.thinking_off}
        return None

    def thinks(self, thinking: Mapping[str, Any] | None) -> bool:
        """Whether a request with this ``thinking`` field may think (and so needs room in
        ``max_tokens`` for it)."""
        if thinking is None:
            return self.thinks_by_default
        return thinking.get("type") in ("adaptive", "enabled")


_ADAPTIVE_EFFORTS = ("low", "medium", "high", "xhigh", "max")
THINKING_MODES = ("auto", "off")

# Profiles by family, newest first. Families are matched on the undated id.
_PROFILES: dict[str, dict[str, Any]] = {
    # 5.x: adaptive thinking on by default, billed as output and counted against max_tokens;
    # non-default sampling parameters, prefill and thinking budgets answer 400. Sonnet 5.5,
    # Opus 5.5 and Fable 5.1+ also refuse a forced tool choice; Opus 5.5 and Fable cannot turn
    # thinking off; Sonnet 5.5 turns it off with "between_tools", Haiku 5.5 and Opus 5 with
    # "disabled", each only at effort high or lower. Opus 5.5 and Haiku 5.5 default to medium.
    "claude-fable-5-2": dict(
        forced_tool_choice=False, thinking_off=None, default_effort="high", min_cache_tokens=1024
    ),
    "claude-fable-5-1": dict(
        forced_tool_choice=False, thinking_off=None, default_effort="high", min_cache_tokens=1024
    ),
    # Fable 5: structured outputs are not documented consistently, so verdicts use the
    # offered tool (auto), which every tool-capable model accepts.
    "claude-fable-5": dict(
        structured_outputs=False,
        forced_tool_choice=False,
        thinking_off=None,
        default_effort="high",
        min_cache_tokens=2048,
    ),
    "claude-opus-5-5": dict(forced_tool_choice=False, thinking_off=None, default_effort="medium"),
    "claude-sonnet-5-5": dict(
        forced_tool_choice=False,
        thinking_off="between_tools",
        thinking_off_max_effort="high",
        default_effort="high",
    ),
    "claude-haiku-5-5": dict(
        thinking_off="disabled", thinking_off_max_effort="high", default_effort="medium"
    ),  # 1M context, but a prompt over 100K tokens is billed at the long-prompt rate
    "claude-opus-5": dict(
        thinking_off="disabled", thinking_off_max_effort="high", default_effort="high"
    ),
    "claude-sonnet-5": dict(thinking_off="disabled", default_effort="high", min_cache_tokens=1024),
}
for _name in ("claude-mythos-5-2", "claude-mythos-5-1", "claude-mythos-5"):
    _PROFILES[_name] = _PROFILES[_name.replace("mythos", "fable")]
_FIVE = dict(
    structured_outputs=True,
    sampling_params=False,
    prefill=False,
    thinks_by_default=True,
    effort_levels=EFFORTS,
    min_cache_tokens=512,
    max_output_tokens=128_000,
    context_window=1_000_000,
)
for _name, _spec in _PROFILES.items():
    _PROFILES[_name] = {**_FIVE, **_spec}

# 4.x: thinking only when asked for; prefill refused from 4.6 on, sampling parameters from
# Opus 4.7 on. Structured outputs from the 4.5 generation on (not Opus 4.1 and older).
_OPUS_47 = dict(
    structured_outputs=True,
    sampling_params=False,
    prefill=False,
    effort_levels=EFFORTS,
    default_effort="high",
    max_output_tokens=128_000,
    context_window=1_000_000,
)
_PROFILES.update(
    {
        "claude-opus-4-8": {**_OPUS_47, "min_cache_tokens": 1024},
        "claude-opus-4-7": {**_OPUS_47, "min_cache_tokens": 2048},
        "claude-opus-4-6": dict(
            structured_outputs=True,
            prefill=False,
            effort_levels=("low", "medium", "high", "max"),
            default_effort="high",
            min_cache_tokens=4096,
            max_output_tokens=128_000,
            context_window=1_000_000,
        ),
        "claude-sonnet-4-6": dict(
            structured_outputs=True,
            prefill=False,
            effort_levels=("low", "medium", "high", "max"),
            default_effort="high",
            min_cache_tokens=2048,
            max_output_tokens=128_000,
            context_window=1_000_000,
        ),
        "claude-opus-4-5": dict(
            structured_outputs=True,
            effort_levels=("low", "medium", "high"),
            default_effort="high",
            min_cache_tokens=4096,
        ),
        "claude-sonnet-4-5": dict(structured_outputs=True, min_cache_tokens=1024),
        "claude-haiku-4-5": dict(structured_outputs=True, min_cache_tokens=4096),
        "claude-opus-4-1": dict(max_output_tokens=32_000),
        "claude-opus-4": dict(max_output_tokens=32_000),
        "claude-sonnet-4": dict(),
        "claude-3-7-sonnet": dict(),
        "claude-3-5-haiku": dict(max_output_tokens=8_192, min_cache_tokens=2048),
        "claude-3-haiku": dict(max_output_tokens=4_096, min_cache_tokens=2048),
    }
)

CONSERVATIVE = ModelProfile(
    family="(unknown model: conservative profile)",
    known=False,
    forced_tool_choice=False,
    structured_outputs=False,
    sampling_params=False,
    prefill=False,
    thinking_off=None,
    min_cache_tokens=None,
    max_output_tokens=4_096,
    context_window=32_768,
)
"""What a model nobody described gets: an offered tool with ``tool_choice`` auto for
verdicts, no optional request fields, and modest output and context sizes."""


def _family(model: str) -> str | None:
    if model in _PROFILES:
        return model
    dated = _DATED.match(model)
    return dated.group("family") if dated and dated.group("family") in _PROFILES else None


def profile_for(model: str) -> ModelProfile:
    """The built-in profile of ``model`` (a dated id is its family), else :data:`CONSERVATIVE`."""
    family = _family(model)
    if family is None:
        return dataclasses.replace(CONSERVATIVE, price=price_for(model))
    return ModelProfile(family=family, price=price_for(family), **_PROFILES[family])


_PROFILE_FIELDS = {f.name for f in dataclasses.fields(ModelProfile)} - {"family", "known", "price"}
_PRICE_FIELDS = {
    "input_usd_per_mtok": "input",
    "output_usd_per_mtok": "output",
    "cache_read_multiplier": "cache_read",
    "long_prompt_threshold": "long_prompt_threshold",
    "long_input_usd_per_mtok": "long_input",
    "long_output_usd_per_mtok": "long_output",
}


def declared_profile(model: str, spec: Mapping[str, Any]) -> ModelProfile:
    """A profile a user declared: ``like`` (a known family, default the conservative
    profile) plus the fields given, and optionally its prices in USD per million tokens.

    >>> p = declared_profile("qwen3-local", {"like": "claude-haiku-4-5", "input_usd_per_mtok": 0,
    ...                                      "output_usd_per_mtok": 0})
    >>> p.verdict_channel, p.price.input
    ('structured', 0)
    """
    spec = {k: v for k, v in spec.items() if v is not None}
    like = spec.pop("like", None)
    base = profile_for(like) if like else CONSERVATIVE
    if like and not base.known:
        raise ConfigError(
            f"model_profiles[{model!r}]: like={like!r} is not a model family rlm_dagster knows; "
            f"use one of {', '.join(sorted(_PROFILES))}, or leave it out for the conservative "
            "profile."
        )
    prices = {_PRICE_FIELDS[k]: spec.pop(k) for k in list(spec) if k in _PRICE_FIELDS}
    unknown = set(spec) - _PROFILE_FIELDS
    if unknown:
        raise ConfigError(
            f"model_profiles[{model!r}]: unknown field(s) {sorted(unknown)}; use "
            f"{sorted(_PROFILE_FIELDS | set(_PRICE_FIELDS) | {'like'})}."
        )
    if "effort_levels" in spec:
        spec["effort_levels"] = tuple(spec["effort_levels"])
        bad = [e for e in spec["effort_levels"] if e not in EFFORTS]
        if bad:
            raise ConfigError(f"model_profiles[{model!r}]: effort levels {bad} not in {EFFORTS}.")
    price = base.price
    if prices:
        if price is None and not {"input", "output"} <= set(prices):
            raise ConfigError(
                f"model_profiles[{model!r}]: give both input_usd_per_mtok and "
                "output_usd_per_mtok to price this model."
            )
        price = dataclasses.replace(price or Price(0.0, 0.0), **prices)
    return dataclasses.replace(base, family=f"{model} (declared)", known=True, price=price, **spec)


class ModelCatalog:
    """The profiles and prices one ``LM`` uses: the built-in table plus declared profiles.

    >>> catalog = ModelCatalog({"llama-local": {"tools": True, "input_usd_per_mtok": 0.0,
    ...                                          "output_usd_per_mtok": 0.0}})
    >>> catalog.profile("llama-local").verdict_channel
    'auto_tool'
    >>> catalog.profile("claude-opus-5-5").forced_tool_choice
    False
    """

    def __init__(self, declared: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._declared = {m: declared_profile(m, spec) for m, spec in (declared or {}).items()}

    def profile(self, model: str) -> ModelProfile:
        return self._declared.get(model) or profile_for(model)

    def cost_usd(self, model: str, usage: Usage) -> float | None:
        """USD cost of one call at the model's (declared or listed) price, or ``None``."""
        price = self.profile(model).price
        return None if price is None else price_cost(price, usage)

    def check_can_judge(self, model: str, what: str = "sub_model") -> None:
        """Raise :class:`ConfigError` if ``model`` cannot return ``llm_where`` verdicts."""
        if self.profile(model).verdict_channel is None:
            raise ConfigError(
                f"{what}={model!r} cannot return llm_where verdicts: its profile has neither "
                "structured outputs nor tools. Pick a model that has one of them, or declare "
                f"what it supports: RLMResource(model_profiles={{{model!r}: "
                "{'tools': True}})."
            )
