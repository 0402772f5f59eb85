"""Uncertainty for the audit: bootstrap intervals over questions, paired tests, per-question transitions.

Every number the report states is a statistic over a few hundred test questions, so it comes with a 95%
interval and every comparison of two models on the same questions with a paired test:

    bootstrap_ci        percentile bootstrap over questions (Efron & Tibshirani 1993, ch. 13): resample the N
                        questions with replacement n_boot times, take the statistic of each resample, report its
                        (1 - level)/2 and (1 + level)/2 quantiles
    paired_bootstrap    the same, with one index draw shared by both models, of diff = stat(b) - stat(a);
                        two-sided p = min(1, 2 (1 + #{diff* <= 0 or >= 0, the smaller side}) / (n_boot + 1))
    mcnemar             greedy pass@1 of two models on the same questions (McNemar 1947): only the discordant
                        questions count, n01 (a wrong, b right) and n10 (a right, b wrong), n = n01 + n10;
                        n < EXACT_BELOW: exact binomial, p = min(1, 2 * sum_{i <= min(n01, n10)} C(n, i) / 2^n);
                        otherwise chi-square with continuity correction, X = (|n01 - n10| - 1)^2 / n, 1 d.o.f.,
                        p = erfc(sqrt(X / 2))
    transitions         the questions gained and lost between two models' greedy verdicts
    verdict             "shown" when p < alpha, else "within noise" ("cannot tell" when no test could be made)

Resampling is vectorised: one [n_boot, N] index matrix from numpy's PCG64 seeded with `seed`, so the same seed
gives the same intervals on any machine. With fewer than MIN_QUESTIONS questions no interval or bootstrap test is
given: the resamples then take too few distinct values for a 95% percentile interval to mean anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

ALPHA = 0.05  # significance level of every test in the report (two-sided)
LEVEL = 0.95  # interval level
N_BOOT = 5000  # resamples; 5000 x 300 questions take about 20 ms
EXACT_BELOW = 25  # McNemar: exact binomial below this many discordant questions, chi-square from there on
MIN_QUESTIONS = 10  # fewer questions: no bootstrap interval or test (None)


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] question indices, drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def percentile_interval(reps: np.ndarray, level: float = LEVEL) -> list[float]:
    """[lo, hi]: the (1 - level)/2 and (1 + level)/2 quantiles of bootstrap replicates (numpy's linear rule)."""
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def bootstrap_ci(values: Sequence[float], *, stat: Callable[..., Any] = np.mean, n_boot: int = N_BOOT,
                 seed: int = 0, level: float = LEVEL) -> list[float] | None:
    """[lo, hi]: the percentile bootstrap interval of stat(values) over resampled questions; None if N < MIN_QUESTIONS.

    values[i] is question i's value (a verdict as 0/1, a per-question pass@k, a diversity); `stat(x, axis=1)`
    reduces a [n_boot, N] array of resampled values to n_boot statistics (numpy reductions do).
    For stat = mean of 0/1 values, N * mean* is exactly Binomial(N, mean), so the interval converges to the
    binomial quantiles divided by N (tests/test_stats.py checks this).
    """
    _check(n_boot, level)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"bootstrap_ci needs one value per question, got shape {x.shape}")
    if len(x) < MIN_QUESTIONS:
        return None
    reps = stat(x[_indices(len(x), n_boot, seed)], axis=1)  # [n_boot]
    return percentile_interval(reps, level)


def bootstrap_p(reps: np.ndarray) -> float:
    """Two-sided p of "the difference is zero" from bootstrap replicates of the difference.

    p = min(1, 2 * (1 + k) / (n_boot + 1)) with k the number of replicates on the far side of zero (<= 0 or >= 0,
    whichever is fewer), so p < alpha when 0 lies outside the percentile interval at level 1 - alpha (up to the +1,
    which keeps p above zero with finitely many replicates, and the interpolation between replicates).
    """
    k = min(int(np.sum(reps <= 0)), int(np.sum(reps >= 0)))
    return float(min(1.0, 2 * (1 + k) / (len(reps) + 1)))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, stat: Callable[..., Any] = np.mean,
                     n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> dict:
    """Paired bootstrap of diff = stat(b) - stat(a) for two models on the same N questions (a[i], b[i] pair up).

    Returns {"a": stat(a), "b": stat(b), "diff", "ci": [lo, hi] of the diff, "p": two-sided (bootstrap_p), "n": N,
    "test": "paired bootstrap"}; with N < MIN_QUESTIONS "ci" and "p" are None. Resampling questions, not models,
    keeps each question's difficulty in both arms, which is what makes the test paired: a constant shift
    b = a + c gives a zero-width interval at c however much the questions differ.
    """
    _check(n_boot, level)
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-D sequences, got {xa.shape} and {xb.shape}")
    out = {"a": None, "b": None, "diff": None, "ci": None, "p": None, "n": len(xa), "test": "paired bootstrap"}
    if len(xa) == 0:
        return out
    sa, sb = float(stat(xa[None], axis=1)[0]), float(stat(xb[None], axis=1)[0])
    out.update(a=sa, b=sb, diff=sb - sa)
    if len(xa) < MIN_QUESTIONS:
        return out
    idx = _indices(len(xa), n_boot, seed)
    reps = stat(xb[idx], axis=1) - stat(xa[idx], axis=1)  # [n_boot]
    out.update(ci=percentile_interval(reps, level), p=bootstrap_p(reps))
    return out


def mcnemar(a: Sequence[bool], b: Sequence[bool], *, exact_below: int = EXACT_BELOW) -> dict:
    """McNemar's test of equal accuracy for paired binary verdicts (formulas in the module docstring).

    Returns {"n01": a wrong and b right, "n10": a right and b wrong, "discordant": n01 + n10, "statistic": X or
    None for the exact test, "p", "test": "exact binomial" | "chi-square, continuity corrected"}.
    No discordant question gives p = 1 (nothing tells the models apart).
    """
    xa, xb = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"mcnemar needs two equal-length verdict lists, got {xa.shape} and {xb.shape}")
    n01, n10 = int(np.sum(~xa & xb)), int(np.sum(xa & ~xb))
    n = n01 + n10
    out = {"n01": n01, "n10": n10, "discordant": n, "statistic": None}
    if n < exact_below:
        tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1))  # exact integers
        out.update(p=min(1.0, 2 * tail / 2 ** n), test="exact binomial")
    else:
        x = (abs(n01 - n10) - 1) ** 2 / n
        out.update(statistic=x, p=math.erfc(math.sqrt(x / 2)), test="chi-square, continuity corrected")
    return out


def transitions(ids: Sequence[Any], before: Sequence[bool], after: Sequence[bool]) -> dict:
    """{"gained": ids right after and wrong before, "lost": ids right before and wrong after}, in question order."""
    if not len(ids) == len(before) == len(after):
        raise ValueError(f"transitions: {len(ids)} ids, {len(before)} verdicts before, {len(after)} after")
    return {"gained": [q for q, x, y in zip(ids, before, after) if y and not x],
            "lost": [q for q, x, y in zip(ids, before, after) if x and not y]}


def verdict(comparison: dict | None, alpha: float = ALPHA) -> str:
    """The significance verdict: "shown" when p < alpha, "within noise" when p >= alpha, "cannot tell" with no p."""
    p = comparison.get("p") if isinstance(comparison, dict) else None
    if p is None:
        return "cannot tell"
    return "shown" if p < alpha else "within noise"
