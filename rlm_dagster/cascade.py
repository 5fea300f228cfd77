"""Sub-linear ``llm_where``: a cheap proxy judges most values, with a stated recall.

    >>> import numpy as np
    >>> from rlm_dagster.cascade import CascadeTargets, plan_cascade
    >>> truth = np.arange(5_000) % 10 == 0                                  # 10% match
    >>> scores = truth + np.random.default_rng(1).normal(0.0, 0.3, 5_000)  # a proxy's scores
    >>> plan = plan_cascade(scores, CascadeTargets(recall=0.9, sample_size=600))
    >>> decision = plan.decide(truth[plan.sample])          # the oracle judges the sample
    >>> decision.action, decision.oracle_calls < 5_000 // 2
    ('cascade', True)
    >>> bool(decision.certified_recall >= 0.9)
    True

The flow (the caller holds the values; everything here is index-based):

1. a :class:`Proxy` scores all ``n`` distinct values (higher = more likely to match);
2. :func:`plan_cascade` draws a seeded random sample, ``plan.sample``, for the configured
   ("oracle") model to judge;
3. ``plan.decide(labels)`` turns those verdicts into a :class:`CascadeDecision`: which values
   the oracle must still judge (``to_oracle``), which the proxy decides as non-matches
   (``rejected``) or, with a precision target, as matches (``accepted``) — or, when the
   sample cannot certify the target, ``fallback`` (judge everything) or ``fail``, as the
   user chose in ``on_miss``; never a silent quality drop;
4. :func:`estimate_cascade` prices the cascade against judging everything for a dry-run
   plan, before any verdict exists.

**The guarantee.** Relative to the verdicts the oracle would give, with probability at least
``1 - delta`` over the sample draw: recall ≥ ``recall`` and, when a precision target is set,
precision ≥ ``precision`` (``delta`` is then split evenly between the two). It holds for any
proxy, however bad, and any data: a bad proxy costs oracle calls, never quality.

*Recall.* The sample is ``m`` independent draws with replacement (uniform, or proportional to
``weights`` for a guarantee over rows instead of distinct values), so the matching draws are
i.i.d. draws from the matching values. Let ``k`` of them match and ``s_(1) ≤ … ≤ s_(k)`` be
their scores; the threshold is ``t = s_(j)`` and values scoring below ``t`` are declared
non-matches. The fraction of matches scoring below ``s_(j)`` exceeds ``q = 1 - recall`` only
if fewer than ``j`` draws landed in the lowest-scoring set of matches holding at least a
``q`` share: probability ``P(Binomial(k, q) ≤ j - 1)`` at most. We take the largest ``j``
with that probability ≤ ``delta`` — the one-sided distribution-free bound on a quantile,
equivalent to Clopper–Pearson; exact at every ``k``, with no normal approximation, and valid
with ties (values *at* ``t`` go to the oracle). When no ``j ≥ 1`` qualifies (fewer than
:func:`required_positives` matches in the sample) the target cannot be certified: a miss.
Sampled values whose verdict failed count as matches scoring ``-inf``, which can only lower
``t``; a proxy's ``NaN`` score (it could not judge) counts as ``+inf``: always sent on.

*Precision.* Candidate thresholds are fixed before any verdict, from the proxy's scores
alone: the top score regions holding a growing (×1.2) share of the draws' expected mass.
They are tested from the highest down with an exact one-sided binomial (Clopper–Pearson)
test of "precision in the region < target" on the draws in it (each level ``delta``), and
testing stops at the first that fails — fixed-sequence testing, whose family-wise error is
``delta`` whatever the correlation. Values at or above the lowest certified threshold are
accepted unjudged; if none is certified, nobody is. The output's precision is at least the
region's (its unsampled non-matches are the only false positives anywhere).

Why not what LOTUS and SUPG ship: they bound recall with a normal approximation from the
sample's mean and standard deviation after importance sampling — valid only asymptotically,
so at the small match counts where it matters nothing bounds how often it misses. Uniform
sampling sees fewer matches when they are rare (so it falls back sooner; importance
sampling with an exact bound, as BARGAIN does with betting confidence sequences, is the
next step), but what it certifies is exact.

**Proxies.** :class:`EmbeddingProxy` is WordLlama (``pip install 'rlm-dagster[proxy]'``):
a static token-embedding model distilled from an LLM's embedding table, MIT-licensed, whose
wheel ships its 16 MB of weights, so it never downloads at run time: it loads in ~0.7 s
and embeds ~7,000 ticket-length texts a CPU-second (20,000 in under 3 s), with no GPU and
no torch. A smaller Claude model as proxy (:class:`ModelProxy`) ranks better — it reads
negation and context, which an average of token embeddings cannot — but every value is a
paid call again: with Haiku as the configured model there is no cheaper Claude, and even a
score-only reply pays each value's input, about 40% of judging it at Haiku 4.5 prices. The
embedding proxy costs nothing per value, so it is the one to try first; the guarantee does
not depend on which proxy is used, only the savings do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from rlm_dagster.errors import CascadeTargetMissed, ConfigError

if TYPE_CHECKING:
    from wordllama.inference import WordLlamaInference

OnMiss = Literal["fallback", "fail"]
Action = Literal["cascade", "fallback", "fail"]
Indices = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float64]

# Candidate precision regions grow by this factor; finer costs power (more tests that must
# all pass in sequence), coarser wastes acceptances.
_PRECISION_GRID_GROWTH = 1.2
_PRECISION_START = 1.5
_BISECTION_STEPS = 60
INSTALL_PROXY = "pip install 'rlm-dagster[proxy]'"


# -- targets -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadeTargets:
    """What the cascade must guarantee and what it may spend learning how.

        >>> print(CascadeTargets(recall=0.95, delta=0.05).guarantee())
        recall >= 0.95 with probability >= 0.95 (relative to the oracle's verdicts)

    ``sample_size`` is the number of draws (with replacement) the oracle judges first; the
    distinct values among them are what it pays for. ``max_oracle_fraction``: a cascade that
    would still send more than this share of the values to the oracle is a miss too — judging
    everything costs little more and gives recall 1. ``seed`` makes the sample reproducible
    (and the verdict cache warm on a rerun); the guarantee is over its draw, so do not
    re-run with new seeds until one passes.
    """

    recall: float = 0.9
    precision: float | None = None
    delta: float = 0.05
    sample_size: int = 1_000
    on_miss: OnMiss = "fallback"
    max_oracle_fraction: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.recall < 1.0:
            raise ConfigError(
                f"cascade recall must be in (0, 1), got {self.recall}: a sample cannot "
                "certify recall 1; judge everything instead (no cascade)"
            )
        if self.precision is not None and not 0.0 < self.precision < 1.0:
            raise ConfigError(f"cascade precision must be in (0, 1) or None, got {self.precision}")
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(
                f"cascade delta (failure probability) must be in (0, 1), got {self.delta}"
            )
        if self.sample_size < 1:
            raise ConfigError(f"cascade sample_size must be at least 1, got {self.sample_size}")
        if self.on_miss not in ("fallback", "fail"):
            raise ConfigError(f"cascade on_miss must be 'fallback' or 'fail', got {self.on_miss!r}")
        if not 0.0 < self.max_oracle_fraction <= 1.0:
            raise ConfigError(
                f"cascade max_oracle_fraction must be in (0, 1], got {self.max_oracle_fraction}"
            )

    @property
    def recall_delta(self) -> float:
        """The failure probability spent on recall (half of ``delta`` with a precision target)."""
        return self.delta / 2 if self.precision is not None else self.delta

    @property
    def precision_delta(self) -> float:
        return self.delta / 2

    def guarantee(self) -> str:
        what = f"recall >= {self.recall:.2f}"
        if self.precision is not None:
            what += f" and precision >= {self.precision:.2f}"
        return (
            f"{what} with probability >= {1 - self.delta:.2f} (relative to the oracle's verdicts)"
        )


def required_positives(recall: float, delta: float) -> int:
    """The fewest matching draws that can certify ``recall`` at failure probability ``delta``.

    >>> required_positives(0.9, 0.05), required_positives(0.95, 0.05)
    (29, 59)
    """
    return math.ceil(math.log(delta) / math.log(recall) - 1e-12)


# -- proxies -------------------------------------------------------------------------------------


class Proxy(Protocol):
    """Scores values for a predicate: higher means more likely to match. Only the order of
    the scores matters; ``NaN`` means the proxy could not score that value (it then always
    goes to the oracle)."""

    name: str

    def score(self, predicate: str, values: Sequence[str]) -> list[float]: ...


@functools.lru_cache(maxsize=2)
def _load_wordllama(dim: int) -> WordLlamaInference:
    import logging

    # wordllama calls logging.basicConfig(level=INFO) when imported: that would put every
    # INFO line of every library (HTTP requests included) on the host's stderr. Undo it.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as e:
        raise ConfigError(
            f"EmbeddingProxy needs the wordllama package, which is not installed: {INSTALL_PROXY}"
        ) from e
    finally:
        root.setLevel(level)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
    from pathlib import Path

    # WordLlama.load() looks for the shipped tokenizer under wordllama/tokenizer/ while the
    # wheel puts it in wordllama/tokenizers/, then downloads it from the Hugging Face hub.
    # Pointing the cache at the package itself finds both shipped files; no network, ever.
    shipped = Path(wordllama.__file__).parent
    return WordLlama.load(cache_dir=shipped, dim=dim, disable_download=True)


class EmbeddingProxy:
    """Cosine similarity between the predicate and each value under WordLlama embeddings.

        >>> proxy = EmbeddingProxy()                                   # doctest: +SKIP
        >>> proxy.score("threatens to cancel", ["we will cancel our plan", "thanks!"])  # doctest: +SKIP
        [0.65..., -0.12...]

    The model loads once per process, on first use. Values are embedded ``batch_size`` at a
    time, so memory stays flat whatever ``n``. An empty value scores ``NaN`` (to the oracle).
    """

    name = "wordllama"

    def __init__(self, *, batch_size: int = 4_096, dim: int = 256) -> None:
        self.batch_size = batch_size
        self.dim = dim

    def score(self, predicate: str, values: Sequence[str]) -> list[float]:
        model = _load_wordllama(self.dim)
        query = _unit_rows(model.embed([predicate]))[0]
        out: list[float] = []
        for start in range(0, len(values), self.batch_size):
            chunk = [str(v) for v in values[start : start + self.batch_size]]
            out.extend((_unit_rows(model.embed(chunk)) @ query).tolist())
        return out


def _unit_rows(vectors: Any) -> npt.NDArray[np.float64]:
    array = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    # A value with no known token embeds to zero: NaN, so it is sent to the oracle.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, array / norms, np.nan)


ScoreFn = Callable[[str, Sequence[str]], Sequence[float | None]]


class ModelProxy:
    """A cheaper model's 0–100 likelihood per value, through ``score_fn(predicate, values)``.

        >>> proxy = ModelProxy(lambda predicate, values: [90 if "cancel" in v else 5 for v in values])
        >>> proxy.score("threatens to cancel", ["I will cancel", "hello"])
        [90.0, 5.0]

    ``score_fn`` is the caller's wiring to the LM (packing, concurrency, retries, cost): it
    returns one number per value, in order; ``None`` (or a non-finite number) where the
    model gave none — such a value always goes to the oracle. Scores are clipped to 0–100.
    """

    def __init__(self, score_fn: ScoreFn, *, name: str = "model") -> None:
        self.score_fn = score_fn
        self.name = name

    def score(self, predicate: str, values: Sequence[str]) -> list[float]:
        raw = list(self.score_fn(predicate, values))
        if len(raw) != len(values):
            raise ConfigError(
                f"ModelProxy's score_fn returned {len(raw)} scores for {len(values)} values; "
                "it must return one score (or None) per value, in order"
            )
        out: list[float] = []
        for r in raw:
            x = math.nan if r is None else float(r)
            out.append(min(100.0, max(0.0, x)) if math.isfinite(x) else math.nan)
        return out


# -- binomial tails (exact, in log space: k reaches 10^4 and more) ------------------------------


def _log_pmfs(k: int, p: float) -> npt.NDArray[np.float64]:
    """``log P(Binomial(k, p) = i)`` for i = 0..k, by the ratio of successive terms."""
    if p <= 0.0 or p >= 1.0:
        out = np.full(k + 1, -np.inf)
        out[0 if p <= 0.0 else k] = 0.0
        return out
    i = np.arange(k, dtype=np.float64)
    steps = np.log(k - i) - np.log(i + 1) + (math.log(p) - math.log1p(-p))
    first = k * math.log1p(-p)
    return np.concatenate(([first], first + np.cumsum(steps)))


def binom_cdf(c: int, k: int, p: float) -> float:
    """``P(Binomial(k, p) <= c)``.

    >>> round(binom_cdf(4, 100, 0.1), 4)
    0.0237
    """
    if c < 0:
        return 0.0
    if c >= k:
        return 1.0
    return min(1.0, math.exp(float(np.logaddexp.reduce(_log_pmfs(k, p)[: c + 1]))))


def binom_sf(y: int, k: int, p: float) -> float:
    """``P(Binomial(k, p) >= y)``.

    >>> round(binom_sf(30, 30, 0.9), 4)
    0.0424
    """
    if y <= 0:
        return 1.0
    if y > k:
        return 0.0
    return min(1.0, math.exp(float(np.logaddexp.reduce(_log_pmfs(k, p)[y:]))))


def _max_count_below(k: int, q: float, delta: float) -> int:
    """The largest ``c`` with ``P(Binomial(k, q) <= c) <= delta``; -1 when even ``c = 0``
    is too likely."""
    cdf = np.logaddexp.accumulate(_log_pmfs(k, q))
    return int(np.searchsorted(cdf, math.log(delta), side="right")) - 1


def _upper_bound(c: int, k: int, delta: float) -> float:
    """One-sided Clopper–Pearson upper bound on a proportion, ``c`` of ``k`` observed."""
    if c >= k:
        return 1.0
    lo, hi = 0.0, 1.0  # binom_cdf(c, k, p) falls as p grows: find where it crosses delta
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom_cdf(c, k, mid) > delta else (lo, mid)
    return hi


def _lower_bound(y: int, k: int, delta: float) -> float:
    """One-sided Clopper–Pearson lower bound on a proportion, ``y`` of ``k`` observed."""
    if y <= 0:
        return 0.0
    lo, hi = 0.0, 1.0  # binom_sf(y, k, p) grows with p
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binom_sf(y, k, mid) <= delta else (lo, mid)
    return lo


# -- the plan and the decision -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CascadeDecision:
    """What to do with every value after the oracle judged the sample.

    Index arrays are positions in the ``scores`` given to :func:`plan_cascade`, disjoint
    from each other and from ``plan.sample`` (whose verdicts stand as judged):

    - ``to_oracle``: judge these with the configured model;
    - ``rejected``: non-matches decided by the proxy (``decided_by='proxy'``);
    - ``accepted``: matches decided by the proxy (only with a precision target).

    ``action`` is ``"cascade"``; or ``"fallback"`` (``to_oracle`` is every unsampled value,
    nothing is decided by the proxy, recall is 1); or ``"fail"`` (nothing more to judge:
    call :meth:`raise_if_failed`). ``reason`` says why when it is not ``"cascade"``.
    """

    action: Action
    reason: str
    targets: CascadeTargets
    n: int
    sample_calls: int
    to_oracle: Indices
    rejected: Indices
    accepted: Indices
    sample_positives: int  # matching draws (failed verdicts counted as matches)
    recall_threshold: float  # values scoring below it are rejected (-inf: none)
    accept_threshold: float | None  # values scoring at or above it are accepted
    certified_recall: float | None  # a 1 - delta lower bound on recall; 1.0 on fallback
    certified_precision: float | None  # a 1 - delta lower bound, with a precision target
    sample_recall: float | None  # share of matching draws at or above recall_threshold

    @property
    def oracle_calls(self) -> int:
        """Values the oracle judges in all: the sample's distinct values and ``to_oracle``."""
        return self.sample_calls + len(self.to_oracle)

    def guarantee(self) -> str:
        if self.action == "fallback":
            return "every value judged by the oracle (recall 1)"
        if self.action == "fail":
            return "none: the target could not be certified"
        return self.targets.guarantee()

    def describe(self) -> str:
        calls = (
            f"{self.oracle_calls:,} of {self.n:,} values judged by the oracle "
            f"({self.sample_calls:,} sample + {len(self.to_oracle):,})"
        )
        if self.action != "cascade":
            return f"cascade {self.action}: {self.reason}; {calls}"
        certified = f"certified recall >= {self.certified_recall:.3f}"
        if self.certified_precision is not None:
            certified += f", precision >= {self.certified_precision:.3f}"
        return (
            f"cascade: {calls}; {len(self.rejected):,} rejected and {len(self.accepted):,} "
            f"accepted by the proxy; {certified} (guarantee: {self.guarantee()})"
        )

    def raise_if_failed(self) -> None:
        """Raise :class:`CascadeTargetMissed` when ``action == "fail"``."""
        if self.action == "fail":
            raise CascadeTargetMissed(
                f"llm_where cascade could not certify {self.targets.guarantee()}: "
                f"{self.reason}. Raise sample_size, lower the target, raise delta, or set "
                "on_miss='fallback' to judge every value instead",
                decision=self,
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "n": self.n,
            "oracle_calls": self.oracle_calls,
            "sample_calls": self.sample_calls,
            "to_oracle": len(self.to_oracle),
            "rejected": len(self.rejected),
            "accepted": len(self.accepted),
            "sample_positives": self.sample_positives,
            "recall_threshold": _finite_or_none(self.recall_threshold),
            "accept_threshold": _finite_or_none(self.accept_threshold),
            "certified_recall": self.certified_recall,
            "certified_precision": self.certified_precision,
            "sample_recall": self.sample_recall,
            "guarantee": self.guarantee(),
            "summary": self.describe(),
        }


def _finite_or_none(x: float | None) -> float | None:
    """JSON (and Dagster metadata) has no infinities."""
    return x if x is not None and math.isfinite(x) else None


@dataclass(frozen=True, eq=False)
class CascadePlan:
    """The proxy's scores and the sample drawn for the oracle; see :func:`plan_cascade`.

    ``draws`` are the ``sample_size`` draws with replacement (the statistics count each);
    ``sample`` their distinct values, sorted — the values the oracle judges first.
    """

    targets: CascadeTargets
    scores: Scores
    weights: Scores | None
    draws: Indices
    sample: Indices

    @property
    def n(self) -> int:
        return len(self.scores)

    def describe(self) -> str:
        return (
            f"cascade sample: {len(self.sample):,} of {self.n:,} values to the oracle first "
            f"({len(self.draws):,} draws, seed {self.targets.seed}); target: "
            f"{self.targets.guarantee()}"
        )

    def decide(self, labels: Sequence[bool | None] | npt.NDArray[Any]) -> CascadeDecision:
        """Route every value, given the oracle's verdicts on ``sample`` (same order).

        A verdict of ``None`` (the oracle failed or refused) is treated as the worst case
        for each guarantee: a match the proxy ranks lowest for recall, a non-match for
        precision.
        """
        codes = _label_codes(labels, len(self.sample))
        targets = self.targets
        n = self.n
        draw_codes = codes[np.searchsorted(self.sample, self.draws)]
        draw_scores = self.scores[self.draws]

        # Recall: the (c+1)-th lowest score among matching draws.
        matching = draw_codes != 0
        recall_scores = np.where(np.isnan(draw_scores), np.inf, draw_scores)[matching]
        recall_scores = np.where(draw_codes[matching] < 0, -np.inf, recall_scores)
        k = len(recall_scores)
        q = 1.0 - targets.recall
        c = _max_count_below(k, q, targets.recall_delta)

        accept_threshold, certified_precision = self._precision_threshold(draw_scores, draw_codes)

        if c < 0:
            need = required_positives(targets.recall, targets.recall_delta)
            return self._miss(
                _too_few_matches(k, len(self.draws), need, targets),
                k,
                accept_threshold=None,
                certified_precision=None,
            )
        threshold = float(np.partition(recall_scores, c)[c])
        known = recall_scores[draw_codes[matching] > 0]
        sample_recall = float(np.mean(known >= threshold)) if len(known) else None
        certified_recall = 1.0 - _upper_bound(c, k, targets.recall_delta)

        in_sample = np.zeros(n, dtype=bool)
        in_sample[self.sample] = True
        scored = ~np.isnan(self.scores)
        accept = np.zeros(n, dtype=bool)
        if accept_threshold is not None:
            accept = scored & (self.scores >= accept_threshold) & ~in_sample
        reject = scored & (self.scores < threshold) & ~accept & ~in_sample
        to_oracle = ~in_sample & ~accept & ~reject
        calls = len(self.sample) + int(to_oracle.sum())
        if calls > targets.max_oracle_fraction * n:
            return self._miss(
                f"the certified threshold still sends {calls:,} of {n:,} values "
                f"({calls / max(n, 1):.0%}) to the oracle, more than max_oracle_fraction="
                f"{targets.max_oracle_fraction:.2f}: the proxy separates matches too poorly",
                k,
                accept_threshold=None,
                certified_precision=None,
            )
        return CascadeDecision(
            action="cascade",
            reason="",
            targets=targets,
            n=n,
            sample_calls=len(self.sample),
            to_oracle=np.flatnonzero(to_oracle).astype(np.int64),
            rejected=np.flatnonzero(reject).astype(np.int64),
            accepted=np.flatnonzero(accept).astype(np.int64),
            sample_positives=k,
            recall_threshold=threshold,
            accept_threshold=accept_threshold,
            certified_recall=certified_recall,
            certified_precision=certified_precision,
            sample_recall=sample_recall,
        )

    def _precision_threshold(
        self, draw_scores: Scores, draw_codes: npt.NDArray[np.int8]
    ) -> tuple[float | None, float | None]:
        """The lowest candidate threshold certified by fixed-sequence testing, and its
        precision lower bound; ``(None, None)`` when none is (or there is no target)."""
        target = self.targets.precision
        if target is None:
            return None, None
        delta = self.targets.precision_delta
        certified: tuple[float, int, int] | None = None  # threshold, draws, matching draws
        for tau in self._precision_candidates():
            in_region = ~np.isnan(draw_scores) & (draw_scores >= tau)
            x = int(in_region.sum())
            y = int((draw_codes[in_region] > 0).sum())
            if x == 0 or binom_sf(y, x, target) > delta:
                break
            certified = (tau, x, y)
        if certified is None:
            return None, None
        tau, x, y = certified
        return tau, _lower_bound(y, x, delta)

    def _precision_candidates(self) -> list[float]:
        """Thresholds from the highest down, from the scores, weights and sample size only
        (never the verdicts): that is what makes testing them in sequence valid."""
        target = self.targets.precision
        assert target is not None
        m = len(self.draws)
        scored = np.flatnonzero(~np.isnan(self.scores))
        if m == 0 or len(scored) == 0:
            return []
        order = scored[np.argsort(-self.scores[scored], kind="stable")]
        mass = np.ones(len(order)) if self.weights is None else self.weights[order]
        total = float(mass.sum()) if self.weights is None else float(self.weights.sum())
        share = np.cumsum(mass) / total  # of all draws' probability, top region first
        # The first region expects _PRECISION_START times the fewest draws that could certify
        # the target were they all matches: with fewer, only a perfect region passes.
        fewest = math.log(self.targets.precision_delta) / math.log(target)
        start = _PRECISION_START * fewest / m
        candidates: list[float] = []
        f = start
        while True:
            pos = min(int(np.searchsorted(share, f)), len(order) - 1)
            tau = float(self.scores[order[pos]])
            if not candidates or tau < candidates[-1]:
                candidates.append(tau)
            if f >= share[-1]:
                return candidates
            f = min(f * _PRECISION_GRID_GROWTH, float(share[-1]))

    def _miss(
        self,
        reason: str,
        positives: int,
        *,
        accept_threshold: float | None,
        certified_precision: float | None,
    ) -> CascadeDecision:
        empty = np.zeros(0, dtype=np.int64)
        fallback = self.targets.on_miss == "fallback"
        rest = np.ones(self.n, dtype=bool)
        rest[self.sample] = False
        return CascadeDecision(
            action=self.targets.on_miss,
            reason=reason,
            targets=self.targets,
            n=self.n,
            sample_calls=len(self.sample),
            to_oracle=np.flatnonzero(rest).astype(np.int64) if fallback else empty,
            rejected=empty,
            accepted=empty,
            sample_positives=positives,
            recall_threshold=-math.inf,
            accept_threshold=accept_threshold,
            certified_recall=1.0 if fallback else None,
            certified_precision=certified_precision,
            sample_recall=None,
        )


def _label_codes(
    labels: Sequence[bool | None] | npt.NDArray[Any], size: int
) -> npt.NDArray[np.int8]:
    """1 match, 0 non-match, -1 unknown (the oracle gave no verdict)."""
    if len(labels) != size:
        raise ConfigError(
            f"decide() got {len(labels)} verdicts for a sample of {size} values; pass one "
            "verdict (True, False or None) per value of plan.sample, in its order"
        )
    return np.array([-1 if v is None else 1 if bool(v) else 0 for v in labels], dtype=np.int8)


def _too_few_matches(k: int, m: int, need: int, targets: CascadeTargets) -> str:
    said = (
        f"the sample's {m:,} draws held {k:,} matches; certifying recall >= {targets.recall:.2f} "
        f"at delta={targets.recall_delta:g} needs at least {need:,}"
    )
    if k == 0:
        return (
            said + " (the predicate may match (almost) nothing: only judging every value can tell)"
        )
    return said + f" (about sample_size={math.ceil(need * m / k * 1.5):,} at this match rate)"


def plan_cascade(
    scores: Sequence[float] | npt.NDArray[Any],
    targets: CascadeTargets,
    *,
    weights: Sequence[float] | npt.NDArray[Any] | None = None,
) -> CascadePlan:
    """Draw the sample the oracle judges first.

        >>> plan = plan_cascade([0.1, 0.9, 0.5, 0.7], CascadeTargets(sample_size=3, seed=7))
        >>> plan.sample.tolist() == sorted(set(plan.draws.tolist()))
        True

    ``scores``: the proxy's score per distinct value (``NaN``: unscored). ``weights``: how
    many rows each value stands for, to make recall and precision hold over rows rather
    than distinct values (a value of many rows is then drawn more often, and judged once).
    """
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = len(array)
    weight_array: Scores | None = None
    rng = np.random.default_rng(targets.seed)
    if weights is not None:
        weight_array = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(weight_array) != n:
            raise ConfigError(f"plan_cascade got {len(weight_array)} weights for {n} scores")
        if n and (
            not np.all(np.isfinite(weight_array))
            or np.any(weight_array < 0)
            or weight_array.sum() <= 0
        ):
            raise ConfigError("plan_cascade weights must be finite, >= 0, and not all 0")
    if n == 0:
        draws = np.zeros(0, dtype=np.int64)
    elif weight_array is None:
        draws = rng.integers(0, n, size=targets.sample_size, dtype=np.int64)
    else:
        p = weight_array / weight_array.sum()
        draws = rng.choice(n, size=targets.sample_size, replace=True, p=p).astype(np.int64)
    return CascadePlan(
        targets=targets,
        scores=array,
        weights=weight_array,
        draws=draws,
        sample=np.unique(draws),
    )


# -- the dry-run estimate ------------------------------------------------------------------------


@dataclass(frozen=True)
class CascadeEstimate:
    """Oracle calls of the cascade against judging every value, before any verdict exists.

    The sample is known; what follows it is not, so the estimate is a range: ``best_calls``
    assumes a perfect proxy (every match ranked above every non-match) at the assumed
    ``positive_rate``; ``worst_calls`` is the fallback, every value. The decision after the
    sample gives the exact count, before any further call is made.
    """

    n: int
    targets: CascadeTargets
    sample_calls: int
    best_calls: int | None
    worst_calls: int
    needed_positives: int
    expected_sample_positives: float | None

    @property
    def likely_miss(self) -> bool:
        """The assumed match rate puts fewer matches in the sample than certification needs."""
        expected = self.expected_sample_positives
        return expected is not None and expected < self.needed_positives

    def describe(self, usd_per_value: float | None = None) -> str:
        def calls(count: int) -> str:
            if usd_per_value is None:
                return f"{count:,}"
            return f"{count:,} (${count * usd_per_value:.4f})"

        best = (
            f"{calls(self.best_calls)} with a perfect proxy"
            if self.best_calls is not None
            else f"at least {calls(self.sample_calls)} (match rate unknown)"
        )
        text = (
            f"cascade ({self.targets.guarantee()}): {calls(self.sample_calls)} sample values "
            f"judged first, then {best}, up to {calls(self.worst_calls)} on fallback; "
            f"judging everything: {calls(self.n)}"
        )
        if self.likely_miss:
            text += (
                f"; at the assumed match rate the sample holds ~{self.expected_sample_positives:.0f} "
                f"matches, fewer than the {self.needed_positives} needed: expect a miss "
                f"({self.targets.on_miss})"
            )
        return text

    def as_dict(self, usd_per_value: float | None = None) -> dict[str, Any]:
        return {
            "n": self.n,
            "sample_calls": self.sample_calls,
            "best_calls": self.best_calls,
            "worst_calls": self.worst_calls,
            "needed_positives": self.needed_positives,
            "expected_sample_positives": self.expected_sample_positives,
            "likely_miss": self.likely_miss,
            "summary": self.describe(usd_per_value),
        }


def estimate_cascade(
    n: int, targets: CascadeTargets, *, positive_rate: float | None = None
) -> CascadeEstimate:
    """A dry-run range for the cascade's oracle calls over ``n`` distinct values.

        >>> e = estimate_cascade(20_000, CascadeTargets(sample_size=1_000), positive_rate=0.1)
        >>> e.sample_calls, e.best_calls, e.worst_calls, e.likely_miss
        (975, 2975, 20000, False)

    ``sample_calls`` is the expected number of distinct values in a uniform sample (fewer
    with row weights); ``positive_rate`` is the caller's prior on the match rate (``None``:
    unknown), used only for the optimistic end and the likely-miss warning.
    """
    m = targets.sample_size
    sample_calls = round(n * -math.expm1(m * math.log1p(-1.0 / n))) if n > 1 else min(n, m)
    best = None
    expected = None
    if positive_rate is not None:
        best = min(n, sample_calls + round(positive_rate * n))
        expected = positive_rate * m
    return CascadeEstimate(
        n=n,
        targets=targets,
        sample_calls=sample_calls,
        best_calls=best,
        worst_calls=n,
        needed_positives=required_positives(targets.recall, targets.recall_delta),
        expected_sample_positives=expected,
    )


__all__ = [
    "CascadeDecision",
    "CascadeEstimate",
    "CascadePlan",
    "CascadeTargetMissed",
    "CascadeTargets",
    "EmbeddingProxy",
    "ModelProxy",
    "Proxy",
    "estimate_cascade",
    "plan_cascade",
    "required_positives",
]
