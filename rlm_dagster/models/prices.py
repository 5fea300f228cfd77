"""USD prices per million tokens, kept in one place.

    >>> from rlm_dagster.models.client import Usage
    >>> cost_usd("claude-haiku-4-5", Usage(input_tokens=1_000_000, output_tokens=0))
    1.0
    >>> cost_usd("my-local-llama", Usage(input_tokens=10)) is None
    True

Anthropic's list prices for standard (non-batch) requests, as published in November 2026.
Prompt-cache writes (5-minute TTL) cost 1.25x input; cache reads cost ``cache_read`` x input
(0.10 for most models, less for the newest). Models priced by prompt length (Haiku 5.5) bill
every token of a request at the long-prompt rates once its prompt (input + cache reads +
cache writes) exceeds the threshold. A dated id (``claude-sonnet-4-5-20250929``) is priced as
its undated family. A model not listed here (a local endpoint's name, or a release newer
than this table) has an unknown cost: ``cost_usd`` returns ``None`` and callers report it as
unknown instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlm_dagster.models.client import Usage

_DATED = re.compile(r"^(?P<family>.+)-\d{8}$")


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cache_read: float = 0.10  # multiplier of ``input``
    long_prompt_threshold: int | None = None
    long_input: float = 0.0
    long_output: float = 0.0


PRICES: dict[str, Price] = {
    "claude-fable-5-2": Price(8.0, 40.0, cache_read=0.025),
    "claude-mythos-5-2": Price(8.0, 40.0, cache_read=0.025),
    "claude-fable-5-1": Price(10.0, 50.0, cache_read=0.025),
    "claude-mythos-5-1": Price(10.0, 50.0, cache_read=0.025),
    "claude-fable-5": Price(10.0, 50.0),
    "claude-mythos-5": Price(10.0, 50.0),
    "claude-opus-5-5": Price(4.0, 20.0, cache_read=0.05),
    "claude-opus-5": Price(5.0, 25.0),
    "claude-opus-4-8": Price(5.0, 25.0),
    "claude-opus-4-7": Price(5.0, 25.0),
    "claude-opus-4-6": Price(5.0, 25.0),
    "claude-opus-4-5": Price(5.0, 25.0),
    "claude-opus-4-1": Price(15.0, 75.0),
    "claude-opus-4": Price(15.0, 75.0),
    "claude-sonnet-5-5": Price(2.0, 10.0, cache_read=0.05),
    "claude-sonnet-5": Price(2.0, 10.0),
    "claude-sonnet-4-6": Price(3.0, 15.0),
    "claude-sonnet-4-5": Price(3.0, 15.0),
    "claude-sonnet-4": Price(3.0, 15.0),
    "claude-3-7-sonnet": Price(3.0, 15.0),
    "claude-haiku-5-5": Price(
        0.10, 0.50, long_prompt_threshold=100_000, long_input=0.50, long_output=2.50
    ),
    "claude-haiku-4-5": Price(1.0, 5.0),
    "claude-3-5-haiku": Price(0.8, 4.0),
    "claude-3-haiku": Price(0.25, 1.25),
    # The offline demo model (a scripted fake server) costs nothing; listed so that demo
    # runs report $0 rather than "unknown".
    "demo-root": Price(0.0, 0.0),
    "demo-sub": Price(0.0, 0.0),
}


def price_for(model: str) -> Price | None:
    """The price of ``model`` (a dated id falls back to its family), or ``None``."""
    if model in PRICES:
        return PRICES[model]
    dated = _DATED.match(model)
    return PRICES.get(dated.group("family")) if dated else None


def cost_usd(model: str, usage: Usage) -> float | None:
    """USD cost of one call, or ``None`` when the model's price is unknown."""
    price = price_for(model)
    return None if price is None else price_cost(price, usage)


def price_cost(price: Price, usage: Usage) -> float:
    """USD cost of one call's ``usage`` at ``price``; the long-prompt tier applies to the whole
    request when its prompt (input + cache reads + cache writes) passes the threshold."""
    prompt = usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    long = price.long_prompt_threshold is not None and prompt > price.long_prompt_threshold
    input_rate = price.long_input if long else price.input
    output_rate = price.long_output if long else price.output
    return (
        usage.input_tokens * input_rate
        + usage.output_tokens * output_rate
        + usage.cache_creation_input_tokens * input_rate * 1.25
        + usage.cache_read_input_tokens * input_rate * price.cache_read
    ) / 1_000_000


#: What a request sent in a message batch costs, as a share of its standard price. Per
#: Anthropic's batch-processing page, "all usage is charged at 50% of the standard API prices"
#: (input, output, prompt-cache writes and reads alike: the discounts stack).
BATCH_PRICE_FACTOR = 0.5
