"""The cascade's guarantees hold over many seeds, it says so when it cannot meet them, and
its proxies score as documented (rlm_dagster/cascade.py)."""

from __future__ import annotations

import doctest
import math
import os
from collections.abc import Callable
from dataclasses import replace
from statistics import NormalDist

import numpy as np
import numpy.typing as npt
import pytest

import rlm_dagster.cascade as cascade_module
from rlm_dagster.cascade import (
    CascadeDecision,
    CascadePlan,
    CascadeTargetMissed,
    CascadeTargets,
    EmbeddingProxy,
    ModelProxy,
    binom_cdf,
    binom_sf,
    estimate_cascade,
    plan_cascade,
    required_positives,
)
from rlm_dagster.errors import ConfigError, RLMError

RUNS = 200
Truth = npt.NDArray[np.bool_]
Scores = npt.NDArray[np.float64]


def slack_bound(delta: float, runs: int = RUNS) -> float:
    """The most failures a valid procedure shows over ``runs`` seeds, but for 3 sigma."""
    return delta + 3 * math.sqrt(delta * (1 - delta) / runs)


def labelled(n: int, rate: float, disagree: float, seed: int) -> tuple[Truth, Scores]:
    """``n`` values, ``rate`` of them matching, and a proxy that, thresholded at its midpoint,
    disagrees with the truth on ``disagree`` of the matches and of the non-matches."""
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < rate
    gap = 2 * NormalDist().inv_cdf(1 - disagree)
    return truth, rng.normal(0.0, 1.0, n) + gap * truth


def outcome(plan: CascadePlan, decision: CascadeDecision, truth: Truth) -> tuple[float, float]:
    """Recall and precision of the cascade's output against the truth (the oracle)."""
    found = np.zeros(len(truth), dtype=bool)
    found[plan.sample] = truth[plan.sample]
    found[decision.to_oracle] = truth[decision.to_oracle]
    found[decision.accepted] = True
    hits = int((found & truth).sum())
    return hits / max(int(truth.sum()), 1), hits / max(int(found.sum()), 1)


def failure_rate(
    truth: Truth,
    scores: Scores,
    targets: CascadeTargets,
    failed: Callable[[float, float], bool],
    weights: Scores | None = None,
) -> tuple[float, int]:
    """Over RUNS seeds: the share of runs where ``failed(recall, precision)``, and how many
    ran the cascade (not a fallback)."""
    failures = cascades = 0
    for seed in range(RUNS):
        plan = plan_cascade(scores, replace(targets, seed=seed), weights=weights)
        decision = plan.decide(truth[plan.sample])
        cascades += decision.action == "cascade"
        failures += failed(*outcome(plan, decision, truth))
    return failures / RUNS, cascades


# -- the guarantees ------------------------------------------------------------------------------


@pytest.mark.parametrize("disagree", [0.05, 0.15, 0.30])
def test_recall_meets_its_target_in_at_least_1_minus_delta_of_runs(disagree: float) -> None:
    truth, scores = labelled(4_000, rate=0.15, disagree=disagree, seed=1)
    targets = CascadeTargets(recall=0.9, delta=0.1, sample_size=600, max_oracle_fraction=1.0)
    rate, cascades = failure_rate(truth, scores, targets, lambda r, p: r < 0.9)
    assert cascades == RUNS  # every run certified a threshold, so every run was at risk
    assert rate <= slack_bound(0.1)


def test_a_point_estimate_threshold_fails_the_same_check() -> None:
    """The check above has teeth: the empirical 10% quantile of the sampled matches' scores
    (no confidence bound) misses recall 0.9 in about half the runs."""
    truth, scores = labelled(4_000, rate=0.15, disagree=0.15, seed=1)
    misses = 0
    for seed in range(RUNS):
        draws = np.random.default_rng(seed).integers(0, len(truth), 600)
        matched = scores[draws][truth[draws]]
        threshold = np.quantile(matched, 0.1)
        misses += float(np.mean(scores[truth] >= threshold)) < 0.9
    assert misses / RUNS > slack_bound(0.1)


def test_precision_meets_its_target_and_the_proxy_accepts_values() -> None:
    # Every value scoring 0.8 or more matches, none below 0.4, and the match rate ramps in
    # between: regions down to about 0.63 have precision >= 0.9, larger ones do not.
    rng = np.random.default_rng(2)
    scores = rng.random(6_000)
    truth = rng.random(6_000) < np.clip((scores - 0.4) * 2.5, 0.0, 1.0)
    targets = CascadeTargets(
        recall=0.8, precision=0.9, delta=0.1, sample_size=1_500, max_oracle_fraction=1.0
    )
    accepted = []
    failures = 0
    for seed in range(RUNS):
        plan = plan_cascade(scores, replace(targets, seed=seed))
        decision = plan.decide(truth[plan.sample])
        accepted.append(len(decision.accepted))
        recall, precision = outcome(plan, decision, truth)
        failures += precision < 0.9 or recall < 0.8
        if decision.certified_precision is not None:
            assert decision.certified_precision >= 0.9
    assert np.median(accepted) > 1_000  # acceptance is exercised, not vacuous
    assert failures / RUNS <= slack_bound(0.1)


def test_recall_holds_over_rows_when_values_carry_row_weights() -> None:
    truth, scores = labelled(3_000, rate=0.2, disagree=0.15, seed=3)
    # Heavy values are the matches the proxy ranks lowest: missing them costs many rows.
    weights = np.ones(len(truth))
    weights[truth & (scores < np.quantile(scores[truth], 0.3))] = 20.0
    targets = CascadeTargets(recall=0.9, delta=0.1, sample_size=800, max_oracle_fraction=1.0)
    failures = 0
    for seed in range(RUNS):
        plan = plan_cascade(scores, replace(targets, seed=seed), weights=weights)
        decision = plan.decide(truth[plan.sample])
        lost = np.zeros(len(truth), dtype=bool)
        lost[decision.rejected] = True
        row_recall = 1 - weights[lost & truth].sum() / weights[truth].sum()
        failures += row_recall < 0.9
    assert failures / RUNS <= slack_bound(0.1)


def test_a_failed_sample_verdict_only_makes_the_threshold_more_cautious() -> None:
    truth, scores = labelled(3_000, rate=0.2, disagree=0.15, seed=4)
    plan = plan_cascade(scores, CascadeTargets(recall=0.9, sample_size=600))
    labels: list[bool | None] = [bool(x) for x in truth[plan.sample]]
    known = plan.decide(labels)
    for i in range(0, len(labels), 7):
        labels[i] = None
    unsure = plan.decide(labels)
    assert unsure.recall_threshold <= known.recall_threshold
    assert set(unsure.rejected.tolist()) <= set(known.rejected.tolist())


def test_unscored_values_always_go_to_the_oracle() -> None:
    truth, scores = labelled(3_000, rate=0.2, disagree=0.05, seed=5)
    scores[:100] = np.nan
    targets = CascadeTargets(recall=0.9, precision=0.8, sample_size=800)
    plan = plan_cascade(scores, targets)
    decision = plan.decide(truth[plan.sample])
    assert decision.action == "cascade" and len(decision.accepted) > 0
    judged = set(decision.to_oracle.tolist()) | set(plan.sample.tolist())
    assert set(range(100)) <= judged


def test_every_value_is_routed_exactly_once() -> None:
    truth, scores = labelled(3_000, rate=0.2, disagree=0.05, seed=6)
    plan = plan_cascade(scores, CascadeTargets(recall=0.9, precision=0.8, sample_size=800))
    d = plan.decide(truth[plan.sample])
    parts = [plan.sample, d.to_oracle, d.rejected, d.accepted]
    together = np.concatenate(parts)
    assert len(together) == len(set(together.tolist())) == len(truth)
    assert d.oracle_calls == len(plan.sample) + len(d.to_oracle) < len(truth)
    assert (scores[d.rejected] < d.recall_threshold).all()
    assert d.accept_threshold is not None and (scores[d.accepted] >= d.accept_threshold).all()


# -- when the target cannot be met --------------------------------------------------------------


def test_too_few_matches_in_the_sample_falls_back_to_judging_everything() -> None:
    truth, scores = labelled(5_000, rate=0.005, disagree=0.05, seed=7)
    plan = plan_cascade(scores, CascadeTargets(recall=0.9, sample_size=500))
    decision = plan.decide(truth[plan.sample])
    assert decision.action == "fallback"
    assert "needs at least 29" in decision.reason
    assert len(decision.rejected) == len(decision.accepted) == 0
    assert decision.oracle_calls == len(truth) and decision.certified_recall == 1.0
    assert outcome(plan, decision, truth) == (1.0, 1.0)
    decision.raise_if_failed()  # a fallback is not a failure


def test_too_few_matches_fails_loudly_when_the_user_chose_fail() -> None:
    truth, scores = labelled(5_000, rate=0.005, disagree=0.05, seed=7)
    plan = plan_cascade(scores, CascadeTargets(recall=0.9, sample_size=500, on_miss="fail"))
    decision = plan.decide(truth[plan.sample])
    assert decision.action == "fail" and decision.oracle_calls == len(plan.sample)
    with pytest.raises(CascadeTargetMissed, match="needs at least 29") as caught:
        decision.raise_if_failed()
    assert isinstance(caught.value, RLMError) and not caught.value.retryable
    assert "on_miss='fallback'" in str(caught.value)
    assert caught.value.decision is decision


def test_a_proxy_that_separates_nothing_is_a_miss_not_a_cascade() -> None:
    rng = np.random.default_rng(8)
    truth = rng.random(5_000) < 0.2
    scores = rng.random(5_000)  # independent of the truth
    plan = plan_cascade(scores, CascadeTargets(recall=0.9, sample_size=800))
    decision = plan.decide(truth[plan.sample])
    assert decision.action == "fallback"
    assert "max_oracle_fraction" in decision.reason


def test_no_matches_at_all_is_a_miss() -> None:
    plan = plan_cascade(np.linspace(0, 1, 1_000), CascadeTargets(sample_size=200))
    decision = plan.decide([False] * len(plan.sample))
    assert decision.action == "fallback" and "may match (almost) nothing" in decision.reason


# -- determinism, inputs ------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_plan_and_decision() -> None:
    truth, scores = labelled(3_000, rate=0.2, disagree=0.15, seed=9)
    targets = CascadeTargets(recall=0.9, precision=0.8, sample_size=700, seed=42)
    a = plan_cascade(scores, targets)
    b = plan_cascade(scores, targets)
    assert np.array_equal(a.draws, b.draws)
    da, db = a.decide(truth[a.sample]), b.decide(truth[b.sample])
    assert da.as_dict() == db.as_dict()
    for field in ("to_oracle", "rejected", "accepted"):
        assert np.array_equal(getattr(da, field), getattr(db, field))
    other = plan_cascade(scores, replace(targets, seed=43))
    assert not np.array_equal(a.draws, other.draws)


def test_weights_draw_heavy_values_more_often() -> None:
    weights = np.ones(1_000)
    weights[0] = 1_000.0  # half of all rows
    plan = plan_cascade(np.zeros(1_000), CascadeTargets(sample_size=400), weights=weights)
    assert 150 < int((plan.draws == 0).sum()) < 250
    assert len(plan.sample) < 400


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recall": 1.0},
        {"recall": 0.0},
        {"precision": 1.5},
        {"delta": 0.0},
        {"sample_size": 0},
        {"on_miss": "ignore"},
        {"max_oracle_fraction": 0.0},
    ],
)
def test_targets_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CascadeTargets(**kwargs)  # type: ignore[arg-type]


def test_decide_refuses_verdicts_that_do_not_match_the_sample() -> None:
    plan = plan_cascade(np.arange(100.0), CascadeTargets(sample_size=30))
    with pytest.raises(ConfigError, match="one verdict"):
        plan.decide([True])
    with pytest.raises(ConfigError, match="weights"):
        plan_cascade(np.arange(3.0), CascadeTargets(), weights=[1.0, -1.0, 1.0])


# -- the statistics' building blocks ------------------------------------------------------------


def test_binomial_tails_match_the_definition() -> None:
    for k, p in [(1, 0.3), (17, 0.1), (60, 0.55), (200, 0.02)]:
        pmf = [math.comb(k, i) * p**i * (1 - p) ** (k - i) for i in range(k + 1)]
        for c in range(-1, k + 2):
            assert binom_cdf(c, k, p) == pytest.approx(sum(pmf[: max(c + 1, 0)]), abs=1e-12)
            assert binom_sf(c, k, p) == pytest.approx(sum(pmf[max(c, 0) :]), abs=1e-12)


def test_required_positives_is_where_a_threshold_first_exists() -> None:
    for recall, delta in [(0.9, 0.05), (0.95, 0.05), (0.8, 0.01)]:
        need = required_positives(recall, delta)
        assert (recall**need) <= delta < recall ** (need - 1)


# -- the dry-run estimate -----------------------------------------------------------------------


def test_the_estimate_brackets_the_cascade_and_warns_of_a_likely_miss() -> None:
    targets = CascadeTargets(recall=0.9, sample_size=1_000)
    estimate = estimate_cascade(20_000, targets, positive_rate=0.1)
    assert estimate.sample_calls <= 1_000
    assert estimate.best_calls == estimate.sample_calls + 2_000
    assert estimate.worst_calls == 20_000 and not estimate.likely_miss
    text = estimate.describe(usd_per_value=0.0002)
    assert "$4.0000" in text and "fallback" in text
    rare = estimate_cascade(20_000, targets, positive_rate=0.01)
    assert rare.likely_miss and "expect a miss" in rare.describe()
    unknown = estimate_cascade(20_000, targets)
    assert unknown.best_calls is None and "match rate unknown" in unknown.describe()
    truth, scores = labelled(20_000, rate=0.1, disagree=0.05, seed=10)
    plan = plan_cascade(scores, targets)
    decision = plan.decide(truth[plan.sample])
    assert estimate.best_calls <= decision.oracle_calls <= estimate.worst_calls


# -- proxies -------------------------------------------------------------------------------------


def test_model_proxy_passes_scores_through_and_marks_missing_ones() -> None:
    proxy = ModelProxy(lambda predicate, values: [80, None, 140, -3, float("nan")][: len(values)])
    scores = proxy.score("p", ["a", "b", "c", "d", "e"])
    assert scores[0] == 80.0 and scores[2] == 100.0 and scores[3] == 0.0
    assert math.isnan(scores[1]) and math.isnan(scores[4])
    with pytest.raises(ConfigError, match="one score"):
        proxy.score("p", ["a"] * 6)


def _wordllama_or_skip() -> None:
    try:
        import wordllama  # noqa: F401
    except ImportError:
        why = "wordllama is not installed: pip install -e '.[test]' (or '.[proxy]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the embedding proxy tests: {why}")
        pytest.skip(why)


def test_embedding_proxy_ranks_matching_tickets_above_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _wordllama_or_skip()
    import requests

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the embedding proxy must not touch the network")

    cascade_module._load_wordllama.cache_clear()
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    matches = [
        "If this is not fixed by Friday we will cancel our subscription.",
        "We are moving to a competitor and will not renew our contract.",
        "Please cancel my subscription, I am done with this service.",
        "Unless you refund us we will terminate our plan at the end of the month.",
    ]
    others = [
        "How do I reset my password?",
        "The invoice lists the wrong billing address.",
        "Can you add a dark mode to the dashboard?",
        "The export stops at 10,000 rows.",
        "Thanks for the quick help yesterday, everything works now.",
    ]
    scores = EmbeddingProxy(batch_size=3).score(
        "The customer threatens to cancel their subscription", matches + others + [""]
    )
    assert min(scores[: len(matches)]) > max(scores[len(matches) : -1])
    assert math.isnan(scores[-1])  # nothing to embed: sent to the oracle


def test_embedding_proxy_without_wordllama_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cascade_module._load_wordllama.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "wordllama", None)
    try:
        with pytest.raises(ConfigError, match=r"pip install 'rlm-dagster\[proxy\]'"):
            EmbeddingProxy().score("p", ["a"])
    finally:
        cascade_module._load_wordllama.cache_clear()


def test_the_module_doctests_run() -> None:
    result = doctest.testmod(cascade_module)
    assert result.failed == 0 and result.attempted >= 5
