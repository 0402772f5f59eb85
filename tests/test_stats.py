"""The audit's statistics against closed forms: binomial quantiles, McNemar's formula, hand-built transitions."""

import itertools
import math
import time
from statistics import NormalDist

import numpy as np
import pytest

from minisirev import stats
from minisirev.stats import bootstrap_ci, bootstrap_p, mcnemar, paired_bootstrap, transitions, verdict


def _binom_quantile(n: int, p: float, q: float) -> int:
    """Smallest j with P(Binomial(n, p) <= j) >= q, from exact terms C(n, i) p^i (1-p)^(n-i)."""
    cdf = 0.0
    for j in range(n + 1):
        cdf += math.comb(n, j) * p ** j * (1 - p) ** (n - j)
        if cdf >= q:
            return j
    return n


def test_constant_values_give_a_zero_width_interval():
    assert bootstrap_ci([0.25] * 40, seed=3) == [0.25, 0.25]
    assert bootstrap_ci([1.0] * 300) == [1.0, 1.0]


@pytest.mark.parametrize("n,c", [(200, 80), (300, 27), (50, 45)])
def test_bernoulli_interval_matches_binomial_quantiles(n, c):
    # N * (resampled mean of c ones among N) is exactly Binomial(N, c/N): the percentile interval tends to its
    # 2.5% and 97.5% quantiles over N. 20000 resamples put the sample quantile within a fraction of one grid
    # step 1/N of the exact one (its standard error is about 0.15 steps at these N), so one step is the tolerance.
    values = [1.0] * c + [0.0] * (n - c)
    lo, hi = bootstrap_ci(values, n_boot=20000, seed=0)
    exact_lo, exact_hi = _binom_quantile(n, c / n, 0.025) / n, _binom_quantile(n, c / n, 0.975) / n
    assert abs(lo - exact_lo) <= 1 / n + 1e-12 and abs(hi - exact_hi) <= 1 / n + 1e-12, (lo, hi, exact_lo, exact_hi)
    # and the normal approximation p +- 1.96 sqrt(p(1-p)/N) is close at these sizes (within two grid steps)
    p = c / n
    half = NormalDist().inv_cdf(0.975) * math.sqrt(p * (1 - p) / n)
    assert abs(lo - (p - half)) <= 2 / n and abs(hi - (p + half)) <= 2 / n


def test_bootstrap_is_seeded_and_needs_enough_questions():
    x = np.random.default_rng(0).random(100)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)
    assert bootstrap_ci(x[:stats.MIN_QUESTIONS - 1]) is None
    assert bootstrap_ci(x[:stats.MIN_QUESTIONS]) is not None
    lo, hi = bootstrap_ci(x, stat=np.median, seed=1)
    assert lo <= np.median(x) <= hi
    with pytest.raises(ValueError):
        bootstrap_ci(x, level=1.0)
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones((10, 2)))


def test_bootstrap_p_counts_the_far_side_of_zero():
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * (1 + 1) / 5)
    assert bootstrap_p(np.array([0.5] * 9)) == pytest.approx(2 / 10)  # all above zero: the smallest p 9 allow
    assert bootstrap_p(np.zeros(9)) == 1.0  # zero on both sides
    assert bootstrap_p(np.array([-1.0, 0.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(2 * (1 + 2) / 7)  # 0 on both sides
    assert bootstrap_p(np.array([-2.0, -1.0, 0.0, 4.0])) == 1.0  # capped at 1


def test_paired_bootstrap_is_the_bootstrap_of_the_differences():
    rng = np.random.default_rng(1)
    a, b = rng.random(120), rng.random(120) + 0.05
    got = paired_bootstrap(a, b, seed=7)
    # one index draw for both arms: for the mean, resampled diff of means == resampled mean of diffs
    assert got["ci"] == pytest.approx(bootstrap_ci(b - a, seed=7), abs=1e-12)
    assert got["diff"] == pytest.approx(b.mean() - a.mean()) and got["a"] == pytest.approx(a.mean())
    assert got["n"] == 120 and got["test"] == "paired bootstrap"


def test_paired_bootstrap_closed_cases():
    a = np.random.default_rng(2).random(50)
    shift = paired_bootstrap(a, a + 0.1, n_boot=999)
    # a constant shift: every resample differs by exactly 0.1, however different the questions are
    assert shift["ci"] == pytest.approx([0.1, 0.1]) and shift["p"] == pytest.approx(2 / 1000)
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0] and same["p"] == 1.0
    few = paired_bootstrap(a[:3], a[:3] + 1)
    assert few["diff"] == pytest.approx(1.0) and few["ci"] is None and few["p"] is None
    with pytest.raises(ValueError):
        paired_bootstrap(a, a[:-1])


def test_paired_bootstrap_interval_matches_normal_theory():
    # Large N: the paired interval is diff +- 1.96 sd(d) / sqrt(N) to within a few percent of its half-width.
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, 2000)
    b = a + rng.normal(0.2, 0.5, 2000)
    got = paired_bootstrap(a, b, n_boot=10000, seed=0)
    d = b - a
    half = 1.96 * d.std(ddof=0) / math.sqrt(len(d))
    assert got["ci"][0] == pytest.approx(d.mean() - half, abs=0.05 * half)
    assert got["ci"][1] == pytest.approx(d.mean() + half, abs=0.05 * half)


def _mcnemar_exact_enumerated(n01: int, n10: int) -> float:
    """P(a split at least as uneven as the observed one), enumerating all 2^n signs of the discordant pairs."""
    n = n01 + n10
    observed = abs(n01 - n10)
    hits = sum(abs(2 * sum(s) - n) >= observed for s in itertools.product([0, 1], repeat=n))
    return hits / 2 ** n


def _verdicts(n01: int, n10: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [False] * n01 + [True] * n10 + [True] * both + [False] * neither
    b = [True] * n01 + [False] * n10 + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize("n01,n10", [(9, 1), (1, 9), (3, 3), (0, 5), (7, 4), (12, 0)])
def test_mcnemar_exact_matches_enumeration(n01, n10):
    a, b = _verdicts(n01, n10, both=30, neither=20)
    got = mcnemar(a, b)
    assert got["test"] == "exact binomial" and (got["n01"], got["n10"]) == (n01, n10)
    assert got["p"] == pytest.approx(_mcnemar_exact_enumerated(n01, n10), abs=1e-15)
    if (n01, n10) == (9, 1):
        assert got["p"] == pytest.approx(2 * (1 + 10) / 1024)  # by hand: 2 * (C(10,0) + C(10,1)) / 2^10


def test_mcnemar_chi_square_formula():
    # Agresti (2002, sec. 10.1), presidential approval: 150 approve -> disapprove, 86 the other way.
    a, b = _verdicts(86, 150, both=794, neither=570)
    got = mcnemar(a, b)
    x = (abs(150 - 86) - 1) ** 2 / (150 + 86)
    assert got["test"] == "chi-square, continuity corrected" and got["statistic"] == pytest.approx(x)
    assert x == pytest.approx(16.8178, abs=1e-4)
    # chi-square with 1 d.o.f. is a squared standard normal: p = 2 (1 - Phi(sqrt(X)))
    assert got["p"] == pytest.approx(2 * (1 - NormalDist().cdf(math.sqrt(x))), rel=1e-9)
    assert mcnemar(*_verdicts(0, 0, 5, 5))["p"] == 1.0  # no discordant question
    # the switch: 24 discordant questions are tested exactly, 25 by chi-square
    assert mcnemar(*_verdicts(16, 8, 0, 0))["test"] == "exact binomial"
    assert mcnemar(*_verdicts(17, 8, 0, 0))["test"] == "chi-square, continuity corrected"


def test_transitions_hand_built():
    ids = ["q0", "q1", "q2", "q3", "q4", "q5"]
    before = [True, False, True, False, True, False]
    after = [True, True, False, False, False, True]
    assert transitions(ids, before, after) == {"gained": ["q1", "q5"], "lost": ["q2", "q4"]}
    assert transitions(ids, after, after) == {"gained": [], "lost": []}
    with pytest.raises(ValueError):
        transitions(ids[:-1], before, after)


def test_verdict():
    assert verdict({"p": 0.01}) == "shown"
    assert verdict({"p": 0.05}) == "within noise"  # p < alpha, strictly
    assert verdict({"p": 0.2}) == "within noise"
    assert verdict({"p": None}) == "cannot tell" and verdict(None) == "cannot tell"
    assert verdict({"p": 0.08}, alpha=0.1) == "shown"


def test_resampling_is_fast():
    x = np.random.default_rng(0).random(200) < 0.4
    y = np.random.default_rng(1).random(200) < 0.45
    t0 = time.perf_counter()
    bootstrap_ci(x, n_boot=10000)
    paired_bootstrap(x, y, n_boot=10000)
    assert time.perf_counter() - t0 < 1.0  # typically 0.05 s on a laptop core
