"""The sub-linear llm_where cascade on labelled tickets: oracle calls, cost, achieved quality.

    python bench/cascade_bench.py            # 20,000 tickets, 100 seeds a row (~20 s)
    python bench/cascade_bench.py --quick    # 5,000 tickets, 30 seeds a row

Data: distinct support-ticket texts from a seeded generator (a topic sentence with slots,
optional hard negatives that say "cancel", "renew" or name a competitor without threatening
to leave, greetings and sign-offs), about 10% of which add one of many paraphrases of a
churn threat. The predicate is ``PREDICATE``; the generator's label is the ground truth and
stands in for the oracle (the fake's judge): a cascade's result is scored against it.

Proxies: "noisy f" scores a value N(0, 1) plus 2·z(1-f) if it matches, so that thresholded
at the midpoint it disagrees with the truth on a fraction f of the matches and of the
non-matches alike (5%, 15%, 30%); its noise is fixed per dataset. "wordllama" is
:class:`rlm_dagster.cascade.EmbeddingProxy` on the texts (real, local, no network).

Each row runs ``SEEDS`` cascades (seeds 0..SEEDS-1 draw the sample) and reports the mean of
the oracle calls (sample + to_oracle, distinct values) and its share of n, the USD those
calls cost, the achieved recall and precision against the truth (mean and worst over the
seeds; a fallback judges everything, so counts as recall 1), the failure rate (a run whose
recall, or precision when targeted, is below target) against delta, and the fallbacks.
"judge all" is the baseline: every value to the oracle.

Cost: claude-haiku-4-5 list prices ($1 / $5 per million input / output tokens), 40 values a
request, each request ``SYSTEM_TOKENS`` of system prompt and tool definition (no prompt-cache
discount) plus 8 + chars/4 tokens a value in, and 25 tokens a verdict + 30 a request out —
the estimates llm_where's planner uses. The sample and the rest are packed separately.
The WordLlama proxy's cost is CPU only (its seconds are printed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlm_dagster.cascade import (  # noqa: E402
    CascadeTargets,
    EmbeddingProxy,
    estimate_cascade,
    plan_cascade,
)
from rlm_dagster.models.client import Usage  # noqa: E402
from rlm_dagster.models.prices import cost_usd  # noqa: E402

PREDICATE = "The customer threatens to cancel, not renew, or leave for a competitor"
MODEL = "claude-haiku-4-5"
ROWS_PER_REQUEST = 40
SYSTEM_TOKENS = 700
OUTPUT_TOKENS_PER_ROW = 25
OUTPUT_TOKENS_PER_REQUEST = 30
MATCH_RATE = 0.10

# -- the ticket generator -----------------------------------------------------------------------

PRODUCTS = [
    "the dashboard",
    "the API",
    "SSO",
    "the mobile app",
    "the CSV export",
    "webhooks",
    "the reporting module",
    "the billing portal",
    "the Slack integration",
    "search",
]
COMPETITORS = ["Zendesk", "Freshdesk", "HubSpot", "Intercom", "a competitor", "another vendor"]
NAMES = [
    "Ana",
    "Ben",
    "Chloe",
    "Dev",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jonas",
    "Kara",
    "Liam",
    "Mei",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Raj",
    "Sofia",
    "Tom",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
OPENERS = [
    "",
    "Hi team, ",
    "Hello, ",
    "Hi support, ",
    "Dear support team, ",
    "Hey, ",
    "Good morning, ",
    "Hi {name} here. ",
]
SIGNOFFS = [
    "",
    " Thanks.",
    " Thanks, {name}",
    " Regards, {name}",
    " Cheers",
    " Best, {name}",
    " Sent from my phone",
    " Ticket ref {n}.",
]
TOPICS = [
    "{product} has been timing out since {month} {day}.",
    "We were charged twice on invoice #{n}; please refund the duplicate.",
    "Our users cannot log in with SSO since the update on {month} {day}.",
    "Can you add a dark mode to {product}? Our team would love it.",
    "The export of {n} rows from {product} stops at 10,000.",
    "How do I add {small} more seats to our workspace?",
    "{product} shows the wrong time zone for our EU office.",
    "The invoice for {month} lists the old billing address.",
    "Password reset emails are not arriving for {small} of our users.",
    "Is there a way to schedule reports from {product} weekly?",
    "We see error 502 when calling {product} about {small} times an hour.",
    "Please update our VAT number on the account, invoice #{n} is wrong.",
    "The onboarding checklist in {product} is stuck at step {small}.",
    "Our admin left; please transfer ownership to {name}.",
    "{product} is very slow when we filter more than {n} records.",
    "Could you explain the difference between the Team and Business plans?",
    "Data from {month} is missing in {product}.",
    "The mobile app crashes when uploading photos larger than {small} MB.",
]
HARD_NEGATIVES = [
    "How do I cancel a scheduled export in {product}?",
    "I accidentally cancelled order #{n}; can you restore it?",
    "We renewed in {month}; where can I download the receipt?",
    "We are very happy with the product and plan to renew next year.",
    "Before our renewal we would like to add {small} seats.",
    "Our CFO asked how your pricing compares to {competitor} for the annual review.",
    "We migrated from {competitor} last year and need help importing old tickets.",
    "Please cancel the duplicate invoice #{n}, we already paid the other one.",
    "Can we pause notifications without cancelling the integration?",
]
THREATS = [
    "If this is not fixed by {month} {day} we will cancel our subscription.",
    "Honestly, we won't be renewing when our contract ends in {month}.",
    "We are seriously considering moving to {competitor}.",
    "This is the third outage this month; our CFO wants to terminate the agreement.",
    "Please treat this as notice that we intend to end our contract.",
    "Unless we get a credit for the downtime, we will take our business elsewhere.",
    "We are evaluating alternatives and will most likely not renew.",
    "I'm done. Close our account at the end of the term.",
    "Leadership asked me to start the cancellation process.",
    "{competitor} offered us a better deal and we are inclined to switch.",
    "Fix it this week or we cancel, simple as that.",
    "We're paying for {small} seats that can't log in; we will not extend the contract.",
    "Our renewal is on hold and will be dropped unless this gets resolved.",
    "At this point we're planning to leave for {competitor} next quarter.",
    "Consider this our final warning before we cancel.",
    "We'll be switching providers if support keeps ignoring us.",
]


def _fill(template: str, rng: np.random.Generator) -> str:
    return template.format(
        product=PRODUCTS[rng.integers(len(PRODUCTS))],
        competitor=COMPETITORS[rng.integers(len(COMPETITORS))],
        name=NAMES[rng.integers(len(NAMES))],
        month=MONTHS[rng.integers(12)],
        day=int(rng.integers(1, 29)),
        n=int(rng.integers(1_000, 99_999)),
        small=int(rng.integers(2, 40)),
    )


def make_tickets(n: int, seed: int = 0) -> tuple[list[str], npt.NDArray[np.bool_]]:
    """``n`` distinct ticket texts and whether each threatens churn (~10% do)."""
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[bool] = []
    seen: set[str] = set()
    while len(texts) < n:
        match = bool(rng.random() < MATCH_RATE)
        parts = [_fill(TOPICS[rng.integers(len(TOPICS))], rng)]
        if rng.random() < 0.3:
            parts.append(_fill(HARD_NEGATIVES[rng.integers(len(HARD_NEGATIVES))], rng))
        if match:
            parts.insert(
                int(rng.integers(0, len(parts) + 1)),
                _fill(THREATS[rng.integers(len(THREATS))], rng),
            )
        text = (
            _fill(OPENERS[rng.integers(len(OPENERS))], rng)
            + " ".join(parts)
            + _fill(SIGNOFFS[rng.integers(len(SIGNOFFS))], rng)
        )
        if text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(match)
    return texts, np.array(labels)


def noisy_scores(
    truth: npt.NDArray[np.bool_], disagree: float, seed: int
) -> npt.NDArray[np.float64]:
    """A proxy that, thresholded at the midpoint, disagrees with ``truth`` on ``disagree`` of
    the matches and of the non-matches."""
    gap = 2 * NormalDist().inv_cdf(1 - disagree)
    return np.random.default_rng(seed).normal(0.0, 1.0, len(truth)) + gap * truth


# -- running one configuration over many seeds --------------------------------------------------


@dataclass
class Row:
    proxy: str
    target: str
    sample_size: int
    calls: float
    usd: float
    recall_mean: float
    recall_worst: float
    precision_mean: float
    precision_worst: float
    failures: int
    fallbacks: int
    seeds: int
    delta: float


def usd_for(values: int, avg_chars: float) -> float:
    """What judging ``values`` values costs, packed ROWS_PER_REQUEST to a request."""
    requests = math.ceil(values / ROWS_PER_REQUEST)
    if requests == 0:
        return 0.0
    usage = Usage(
        input_tokens=round(requests * SYSTEM_TOKENS + values * (8 + avg_chars / 4)),
        output_tokens=values * OUTPUT_TOKENS_PER_ROW + requests * OUTPUT_TOKENS_PER_REQUEST,
    )
    cost = cost_usd(MODEL, usage)
    assert cost is not None
    return cost


def run(
    proxy: str,
    scores: npt.NDArray[np.float64],
    truth: npt.NDArray[np.bool_],
    targets: CascadeTargets,
    seeds: int,
    avg_chars: float,
) -> Row:
    n = len(truth)
    calls, usds, recalls, precisions = [], [], [], []
    failures = fallbacks = 0
    for seed in range(seeds):
        plan = plan_cascade(scores, replace(targets, seed=seed))
        decision = plan.decide(truth[plan.sample])
        found = np.zeros(n, dtype=bool)  # the cascade's output: oracle verdicts + accepted
        found[plan.sample] = truth[plan.sample]
        found[decision.to_oracle] = truth[decision.to_oracle]
        found[decision.accepted] = True
        recall = float((found & truth).sum() / truth.sum())
        precision = float((found & truth).sum() / max(found.sum(), 1))
        fallbacks += decision.action != "cascade"
        failures += recall < targets.recall or (
            targets.precision is not None and precision < targets.precision
        )
        calls.append(decision.oracle_calls)
        usds.append(
            usd_for(decision.sample_calls, avg_chars) + usd_for(len(decision.to_oracle), avg_chars)
        )
        recalls.append(recall)
        precisions.append(precision)
    target = f"R>={targets.recall:.2f}"
    if targets.precision is not None:
        target += f" P>={targets.precision:.2f}"
    return Row(
        proxy=proxy,
        target=target,
        sample_size=targets.sample_size,
        calls=float(np.mean(calls)),
        usd=float(np.mean(usds)),
        recall_mean=float(np.mean(recalls)),
        recall_worst=float(np.min(recalls)),
        precision_mean=float(np.mean(precisions)),
        precision_worst=float(np.min(precisions)),
        failures=failures,
        fallbacks=fallbacks,
        seeds=seeds,
        delta=targets.delta,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 tickets, 30 seeds a row")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cascade_bench.txt"))
    args = parser.parse_args()
    n, seeds = (5_000, 30) if args.quick else (20_000, 100)
    sample_size = 1_000

    texts, truth = make_tickets(n)
    avg_chars = float(np.mean([len(t) for t in texts]))
    started = time.perf_counter()
    cpu_started = time.process_time()
    wordllama = np.array(EmbeddingProxy().score(PREDICATE, texts))
    proxy_s = time.perf_counter() - started
    proxy_cpu_s = time.process_time() - cpu_started

    proxies = {
        f"noisy {f:.0%}": noisy_scores(truth, f, seed=i) for i, f in enumerate((0.05, 0.15, 0.30))
    }
    proxies["wordllama"] = wordllama
    goals = [
        CascadeTargets(recall=0.90, delta=0.05, sample_size=sample_size),
        CascadeTargets(recall=0.95, delta=0.05, sample_size=sample_size),
        CascadeTargets(recall=0.90, precision=0.90, delta=0.05, sample_size=sample_size),
    ]
    rows = [run(name, s, truth, g, seeds, avg_chars) for name, s in proxies.items() for g in goals]
    # The sample size trade-off, on the middle proxy: a bigger sample buys a tighter threshold.
    for m in (500, 2_000, 4_000):
        rows.append(
            run(
                "noisy 15%",
                proxies["noisy 15%"],
                truth,
                replace(goals[0], sample_size=m),
                seeds,
                avg_chars,
            )
        )

    estimate = estimate_cascade(n, goals[0], positive_rate=MATCH_RATE)
    lines = [
        f"{dt.date.today().isoformat()} on {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}): "
        f"python bench/cascade_bench.py{' --quick' if args.quick else ''}",
        f"{n:,} distinct tickets, {int(truth.sum()):,} matches ({truth.mean():.1%}), avg "
        f"{avg_chars:.0f} chars; predicate: {PREDICATE!r}",
        f"wordllama proxy: {proxy_s:.2f} s wall, {proxy_cpu_s:.2f} s CPU for all {n:,} values "
        f"(load included); AUC {auc(wordllama, truth):.3f} (noisy 5/15/30%: "
        + ", ".join(f"{auc(proxies[k], truth):.3f}" for k in ("noisy 5%", "noisy 15%", "noisy 30%"))
        + ")",
        f"oracle = ground truth; USD: {MODEL} list prices, {ROWS_PER_REQUEST} values a request "
        f"(${usd_for(n, avg_chars) / n * 1000:.3f} per 1,000 values); delta = 0.05; "
        f"{seeds} seeds a row (a valid method fails at most delta = 5% of runs in expectation; "
        f"over {seeds} runs up to {100 * slack(0.05, seeds):.0f}% is within 3 sigma); m = sample draws",
        f"dry-run estimate at m={sample_size:,}, prior match rate 10%: {estimate.describe(usd_for(n, avg_chars) / n)}",
        "",
        "| proxy | target | m | oracle calls | % of n | USD | recall mean | recall worst "
        "| precision mean | precision worst | failures (≤ δ) | fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| judge all | - | - | {n:,} | 100.0% | {usd_for(n, avg_chars):.3f} | 1.000 | 1.000 "
        "| 1.000 | 1.000 | - | - |",
    ]
    for r in rows:
        lines.append(
            f"| {r.proxy} | {r.target} | {r.sample_size:,} | {r.calls:,.0f} | {r.calls / n:.1%} "
            f"| {r.usd:.3f} | {r.recall_mean:.3f} | {r.recall_worst:.3f} | {r.precision_mean:.3f} "
            f"| {r.precision_worst:.3f} | {r.failures / r.seeds:.0%} ({r.failures}/{r.seeds}) "
            f"| {r.fallbacks}/{r.seeds} |"
        )
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n")


def slack(delta: float, runs: int) -> float:
    return delta + 3 * math.sqrt(delta * (1 - delta) / runs)


def auc(scores: npt.NDArray[np.float64], truth: npt.NDArray[np.bool_]) -> float:
    """Probability that a random match outscores a random non-match (ties count half)."""
    ranks = np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1.0
    pos = int(truth.sum())
    neg = len(truth) - pos
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


if __name__ == "__main__":
    main()
