"""Metrics against exact enumeration and hand-worked examples (formulas: minisirev/metrics.py docstring)."""

import itertools
import json
import math

import numpy as np
import pytest

from minisirev import metrics, stats
from minisirev.metrics import (
    coverage,
    default_ks,
    distinct_equations,
    distinct_n,
    distinct_n_avg,
    diversity,
    extract_equations,
    group_disparity,
    improvement_set,
    improvement_set_metrics,
    iteration_metrics,
    mean_pass_at_k,
    ood_metrics,
    pass_at_k,
    pass_at_k_curve,
    recommend,
    semantic_diversity,
)

# ----------------------------------------------------------------------------------------------- pass@k


def _pass_at_k_enumerated(n: int, c: int, k: int) -> float:
    """The definition: the fraction of k-subsets of the n samples holding at least one correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_enumerated(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0  # c = 0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0  # c = n
    assert pass_at_k(10, 3, 8) == 1.0  # k > n - c: every 8-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    for bad in [(5, 6, 1), (5, 2, 6), (5, 2, 0), (-1, 0, 1), (5, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_stable_for_large_n():
    # C(1000, 500) ~ 1e299 and C(2000, ...) overflows a float; the product form must stay exact.
    assert pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-12)
    assert pass_at_k(1000, 1, 10) == pytest.approx(10 / 1000, rel=1e-12)  # one correct: k / n
    assert pass_at_k(2000, 1000, 1) == pytest.approx(0.5, rel=1e-12)
    # 1 - C(n-c, k)/C(n, k) via log-gamma as an independent route.
    n, c, k = 1000, 7, 64
    log_ratio = (math.lgamma(n - c + 1) - math.lgamma(n - c - k + 1)) - (math.lgamma(n + 1) - math.lgamma(n - k + 1))
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.exp(log_ratio), rel=1e-9)
    vals = [pass_at_k(1000, 5, k) for k in default_ks(1000)]
    assert all(0 <= v <= 1 for v in vals) and vals == sorted(vals)


def test_curve_and_mean():
    counts = [(4, 0), (4, 1), (4, 4)]
    assert default_ks(4) == [1, 2, 4] and default_ks(6) == [1, 2, 4, 6] and default_ks(6, start=2) == [2, 4, 6]
    curve = pass_at_k_curve(counts)
    assert list(curve) == ["1", "2", "4"]
    assert curve["1"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert curve["4"] == pytest.approx(2 / 3)
    assert mean_pass_at_k(counts, 2) == pytest.approx((0 + 0.5 + 1) / 3)
    assert pass_at_k_curve(counts, ks=[2, 8]) == {"2": pytest.approx(0.5)}  # k = 8 > n left out
    assert pass_at_k_curve([]) == {}


# ------------------------------------------------------------------------------------- coverage, IS(t)


def test_coverage_and_recommendation():
    assert coverage([0, 5, 10, 5], 10) == pytest.approx(0.5)
    assert "favours iterative DPO or SFT-DPO" in recommend(0.627)
    assert "favours iterative SFT" in recommend(0.398)
    assert "0.398" in recommend(0.398)
    assert "unavailable" in recommend(None)
    with pytest.raises(ValueError):
        coverage([11], 10)


def test_improvement_set():
    m1 = [True, False, False, True, False]
    mt = [True, True, False, False, True]
    assert improvement_set(mt, m1) == [1, 4]
    m1_counts = [(4, 4), (4, 1), (4, 0), (4, 2), (4, 0)]
    got = improvement_set_metrics(mt, m1, m1_counts)
    assert got["size"] == 2
    # question 1: 1 of 4 correct, pass@2 = 1 - C(3,2)/C(4,2) = 0.5, pass@4 = 1; question 4: never correct
    assert got["m1_pass@k"] == {"2": pytest.approx(0.25), "4": pytest.approx(0.5)}
    assert improvement_set_metrics(m1, m1, m1_counts) == {"size": 0, "m1_pass@k": {}}


# ------------------------------------------------------------------------------------------- diversity


def test_distinct_n_hand_worked():
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 distinct of 7
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    # bigrams: (a b)(b a)(a b) + (a b)(b c) -> {ab, ba, bc} = 3 of 5; n-grams never cross texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # trigrams: (a b a)(b a b) + (a b c) -> 3 of 3
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(texts, 5) == 0.0  # no 5-gram at all: defined as 0
    assert distinct_n(["x  y\n x"], 1) == pytest.approx(2 / 3)  # whitespace tokens
    # average over n = 1..4 only (no 5-gram exists)
    assert distinct_n_avg(texts) == pytest.approx((3 / 7 + 3 / 5 + 1 + 1) / 4)
    assert distinct_n_avg(["same text here"] * 3) == pytest.approx(1 / 3)
    assert distinct_n_avg(["", ""]) == 0.0


def test_extract_equations_both_styles():
    gsm = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether <<48 + 24=72>>72.\n#### 72"
    assert extract_equations(gsm) == ("48/2=24", "48+24=72")  # annotations win over the text
    text = "She pays 3 * $4 = $12.\nThen 12 + 1,000 = 1,012 dollars, so x = 5.\n#### 1012"
    assert extract_equations(text) == ("3*4=12", "12+1000=1012")  # "x = 5" has no operator: not an equation
    assert extract_equations("(2 + 3) * 4 = 20 and 7 - 2 = 5.") == ("(2+3)*4=20", "7-2=5")
    assert extract_equations("The answer is 5.") == ()


def test_distinct_equations():
    texts = [
        "<<2+3=5>> then <<5*2=10>>",
        "<<2 + 3 = 5>> then <<5*2=10>>",  # same sequence after whitespace normalisation
        "<<3+2=5>> then <<5*2=10>>",  # another order: distinct
        "2 * 5 = 10",  # from text
        "no equations",
        "nothing here either",  # () again: same as the previous one
    ]
    assert distinct_equations(texts) == pytest.approx(4 / 6)


def test_group_disparity_hand_worked():
    assert group_disparity({"1": 0.8, "2": 0.6, "3": 0.5, "4": 0.3, "5": 0.2}) == pytest.approx(75.0)
    assert group_disparity({"5": 0.4, "1": 0.5}) == pytest.approx(20.0)  # keys compared as integers
    assert group_disparity({"1": 0.2, "5": 0.3}) == pytest.approx(-50.0)  # harder level better: negative
    assert math.isnan(group_disparity({"1": 0.0, "5": 0.1}))  # undefined at zero level-1 accuracy
    assert math.isnan(group_disparity({"1": 0.5}))


def test_ood_metrics():
    got = ood_metrics([1, 1, 2, 5, 5, 5], [True, True, False, True, False, False])
    assert got["levels"] == {"1": 1.0, "2": 0.0, "5": pytest.approx(1 / 3)}
    assert got["whole"] == pytest.approx(0.5)
    assert got["disparity"] == pytest.approx((1 - 1 / 3) * 100)
    assert ood_metrics([1, 5], [False, True])["disparity"] is None  # NaN is written as None (valid JSON)


class BagOfLetters:
    """A stand-in encoder: letter counts, so cosines are hand-computable."""

    def encode(self, texts):
        e = np.array([[t.count(ch) for ch in "abc"] for t in texts], dtype=float)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)  # no letter: zero vector


def test_semantic_diversity_with_stub_encoder():
    assert semantic_diversity(["a", "a", "aa"], BagOfLetters()) == pytest.approx(0.0, abs=1e-12)
    # pairs: (a,b) 0, (a,c) 0, (b,c) 0 -> 1 - 0
    assert semantic_diversity(["a", "b", "c"], BagOfLetters()) == pytest.approx(1.0)
    # "a" vs "ab": cos = 1/sqrt(2)
    assert semantic_diversity(["a", "ab"], BagOfLetters()) == pytest.approx(1 - 1 / math.sqrt(2))


def test_diversity_skips_and_counts():
    groups = [["a b", "a c"], ["b"], [], ["a", "a", "a"]]
    got = diversity(groups, BagOfLetters())
    assert got["questions"] == 2 and got["skipped"] == 2
    assert got["distinct_n"] == pytest.approx(np.mean([distinct_n_avg(groups[0]), distinct_n_avg(groups[3])]))
    assert got["semantic"] == pytest.approx(np.mean([1 - 1 / 2, 0.0]))  # cos("a b", "a c") = 1/2
    assert got["equations"] == pytest.approx(np.mean([1 / 2, 1 / 3]))
    assert "semantic_unavailable" not in got
    none = diversity([["x"], []], BagOfLetters())
    assert none["distinct_n"] is None and none["semantic"] is None and none["skipped"] == 2


def test_diversity_reports_missing_encoder(monkeypatch):
    from minisirev import embed

    def unavailable(src=None, **kw):
        raise embed.EncoderUnavailable("all-MiniLM-L6-v2 not found: test")

    monkeypatch.setattr(embed, "load_encoder", unavailable)
    monkeypatch.setattr(metrics, "_DEFAULT_ENCODER", [])
    got = diversity([["a b", "a c"]])
    assert got["semantic"] is None and "not found" in got["semantic_unavailable"]
    assert got["distinct_n"] is not None  # the other measures are still computed


def test_iteration_metrics_keys():
    texts = [["<<1+1=2>> #### 2", "<<2*1=2>> #### 2", "#### 3"], ["#### 1", "#### 4", "#### 5"]]
    verdicts = [[True, True, False], [False, False, True]]
    got = iteration_metrics(iter=2, step_method="dpo", greedy_correct=[True, True], sample_texts=texts,
                            sample_verdicts=verdicts, m1_greedy_correct=[True, False], m1_counts=[(3, 3), (3, 1)],
                            ood_levels=[1, 5], ood_correct=[True, False], encoder=BagOfLetters())
    assert set(got) == {"iter", "step_method", "pass@1", "pass@k", "coverage", "improvement_set", "diversity", "ood"}
    assert got["pass@1"] == 1.0 and list(got["pass@k"]) == ["1", "2", "3"]
    assert got["improvement_set"] == {"size": 1, "m1_pass@k": {"2": pytest.approx(2 / 3), "3": 1.0}}
    assert got["diversity"]["correct"]["questions"] == 1 and got["diversity"]["incorrect"]["questions"] == 1
    assert got["ood"]["disparity"] == pytest.approx(100.0)
    json.dumps(got, allow_nan=False)  # plain JSON: no numpy scalars, no NaN


def test_ood_metrics_with_unknown_levels():
    # MATH has a few "Level ?" records (level None): in "whole" and "no_level", in no per-level accuracy.
    got = ood_metrics([1, None, 1, 5, None, 5], [True, True, False, True, False, False])
    assert got["levels"] == {"1": 0.5, "5": 0.5}
    assert got["whole"] == pytest.approx(0.5) and got["no_level"] == 2
    assert got["disparity"] == pytest.approx(0.0)
    assert ood_metrics([None, None], [True, False]) == {"levels": {}, "whole": 0.5, "disparity": None, "no_level": 2}


# ------------------------------------------------------------------ per-question data, intervals, tests


class CountingEncoder(BagOfLetters):
    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return super().encode(texts)


def test_diversity_per_question_one_call_for_all_groups():
    enc = CountingEncoder()
    groups = {"correct": [["a", "ab"], ["a"], ["b", "c", "b"]], "incorrect": [["ab", "a"], [], ["c", "c"]]}
    got = metrics.diversity_per_question(groups, enc)
    assert len(enc.calls) == 1 and sorted(enc.calls[0]) == ["a", "ab", "b", "c"]  # each distinct text once
    assert got["correct"]["semantic"] == [pytest.approx(1 - 1 / math.sqrt(2)), None,
                                          pytest.approx(semantic_diversity(["b", "c", "b"], BagOfLetters()))]
    assert got["incorrect"]["semantic"][2] == pytest.approx(0.0) and got["incorrect"]["semantic"][1] is None
    assert got["correct"]["distinct_n"] == [distinct_n_avg(["a", "ab"]), None, distinct_n_avg(["b", "c", "b"])]
    capped = metrics.diversity_per_question(groups, BagOfLetters(), semantic_questions=1)
    assert capped["correct"]["semantic"][1:] == [None, None] and capped["correct"]["distinct_n"][2] is not None
    assert metrics.summarise_diversity(capped["correct"])["semantic_questions"] == 1
    # semantic_samples: the semantic value is over each question's first S texts; the other measures over all
    first2 = metrics.diversity_per_question(groups, BagOfLetters(), semantic_samples=2)
    assert first2["correct"]["semantic"][2] == pytest.approx(semantic_diversity(["b", "c"], BagOfLetters()))
    assert first2["correct"]["semantic"][2] != pytest.approx(got["correct"]["semantic"][2])
    assert first2["correct"]["distinct_n"] == got["correct"]["distinct_n"]


def _fake_eval(seed: int, n_q: int = 40, n: int = 6, p: float = 0.5, n_ood: int = 60):
    rng = np.random.default_rng(seed)
    verdicts = (rng.random((n_q, n)) < p).tolist()
    texts = [[f"<<{i}+{j % 3}={i + j % 3}>> " + " ".join("abc"[(i + j + k) % 3] for k in range(j % 4 + 1))
              for j in range(n)] for i in range(n_q)]
    levels = [1 + i % 3 if i % 10 else None for i in range(n_ood)]
    return {"greedy_correct": (rng.random(n_q) < p).tolist(), "sample_texts": texts, "sample_verdicts": verdicts,
            "ood_levels": levels, "ood_correct": (rng.random(n_ood) < p).tolist()}


def test_per_question_then_metrics_equals_iteration_metrics():
    ev, m1_ev = _fake_eval(0), _fake_eval(1)
    m1 = metrics.per_question(**m1_ev, encoder=BagOfLetters())
    pq = metrics.per_question(**ev, encoder=BagOfLetters(), ids=[f"q{i}" for i in range(40)])
    assert pq["ids"][:2] == ["q0", "q1"] and len(pq["counts"]) == 40
    json.dumps(pq, allow_nan=False)
    got = metrics.metrics_from_questions(pq, iter=3, step_method="sft", m1=m1)
    want = iteration_metrics(iter=3, step_method="sft", encoder=BagOfLetters(), m1_greedy_correct=m1["greedy"],
                             m1_counts=[tuple(c) for c in m1["counts"]], **ev)
    assert got == want
    base = metrics.metrics_from_questions(pq, iter=0, step_method="base")
    assert base["improvement_set"] == {"size": None, "m1_pass@k": {}}  # n/a for M0
    with pytest.raises(ValueError):
        metrics.per_question(**{**ev, "sample_texts": ev["sample_texts"][:-1]})


def test_iteration_intervals_layout_and_values():
    ev, m1_ev = _fake_eval(2), _fake_eval(3)
    pq, m1 = metrics.per_question(**ev, encoder=BagOfLetters()), metrics.per_question(**m1_ev, encoder=BagOfLetters())
    ci = metrics.iteration_intervals(pq, m1=m1, n_boot=500, seed=4)
    m = metrics.metrics_from_questions(pq, iter=2, step_method="dpo", m1=m1)
    kw = {"n_boot": 500, "seed": 4}
    assert ci["pass@1"] == stats.bootstrap_ci(np.array(pq["greedy"], dtype=float), **kw)
    assert set(ci["pass@k"]) == set(m["pass@k"])
    for k, (lo, hi) in ci["pass@k"].items():
        assert [lo, hi] == stats.bootstrap_ci(metrics.pass_at_k_values([tuple(c) for c in pq["counts"]], int(k)), **kw)
        assert lo <= m["pass@k"][k] <= hi
    assert set(ci["improvement_set"]["m1_pass@k"]) == set(m["improvement_set"]["m1_pass@k"])
    for g in ("correct", "incorrect"):
        for key in ("distinct_n", "semantic", "equations"):
            lo, hi = ci["diversity"][g][key]
            assert lo <= m["diversity"][g][key] <= hi
    assert set(ci["ood"]["levels"]) == set(m["ood"]["levels"]) == {"1", "2", "3"}  # None levels left out
    ok = np.array(ev["ood_correct"], dtype=float)
    lv1 = [i for i, lv in enumerate(ev["ood_levels"]) if lv == 1]
    assert ci["ood"]["levels"]["1"] == stats.bootstrap_ci(ok[lv1], **kw)
    assert ci["ood"]["whole"] == stats.bootstrap_ci(ok, **kw)  # over every OOD question, unknown levels included
    lo, hi = ci["ood"]["disparity"]
    assert lo <= m["ood"]["disparity"] <= hi
    json.dumps(ci, allow_nan=False)
    # all-correct greedy answers: a zero-width interval at 1
    pq_all = {**pq, "greedy": [True] * 40}
    assert metrics.iteration_intervals(pq_all, n_boot=200)["pass@1"] == [1.0, 1.0]


def test_compare_models():
    a = metrics.per_question(**_fake_eval(5), encoder=BagOfLetters())
    b = metrics.per_question(**_fake_eval(6), encoder=BagOfLetters())
    c = metrics.compare_models(a, b, n_boot=500)
    mc = stats.mcnemar(a["greedy"], b["greedy"])
    assert c["pass@1"]["p"] == mc["p"] and c["pass@1"]["mcnemar"] == mc
    assert c["pass@1"]["diff"] == pytest.approx(np.mean(b["greedy"]) - np.mean(a["greedy"]))
    assert c["pass@1"]["verdict"] == stats.verdict({"p": mc["p"]})
    k = max(c["pass@k"], key=int)
    ca, cb = [tuple(x) for x in a["counts"]], [tuple(x) for x in b["counts"]]
    want = stats.paired_bootstrap(metrics.pass_at_k_values(ca, int(k)), metrics.pass_at_k_values(cb, int(k)),
                                  n_boot=500)
    assert {key: c["pass@k"][k][key] for key in want} == want
    assert set(c["ood"]["levels"]) == {"1", "2", "3"} and c["ood"]["whole"]["n"] == 60
    json.dumps(c, allow_nan=False)
    same = metrics.compare_models(a, a, n_boot=200)
    leaves = [same["pass@1"], *same["pass@k"].values(), same["ood"]["whole"], *same["ood"]["levels"].values(),
              same["ood"]["disparity"]] + [v for g in same["diversity"].values() for v in g.values()]
    assert all(leaf["diff"] == 0 and leaf["p"] == 1.0 and leaf["verdict"] == "within noise" for leaf in leaves)
    with pytest.raises(ValueError):
        metrics.compare_models(a, {**b, "ids": list(range(1, 41))})


def test_compare_diversity_pairs_common_questions():
    def pq(values):
        return {"ids": list(range(len(values))), "greedy": [True] * len(values), "counts": [[2, 1]] * len(values),
                "diversity": {"correct": {"distinct_n": values, "semantic": [None] * len(values),
                                          "equations": values}}, "ood_levels": None, "ood_correct": None}

    va = [0.5] * 12 + [None, 0.9]
    vb = [0.4] * 12 + [0.1, None]
    got = metrics.compare_models(pq(va), pq(vb), n_boot=300)["diversity"]["correct"]
    assert got["distinct_n"]["n"] == 12 and got["distinct_n"]["diff"] == pytest.approx(-0.1)
    assert got["distinct_n"]["ci"] == pytest.approx([-0.1, -0.1]) and got["distinct_n"]["verdict"] == "shown"
    assert got["semantic"]["n"] == 0 and got["semantic"]["verdict"] == "cannot tell"


def test_iteration_transitions_hand_built():
    def pq(greedy):
        return {"ids": ["a", "b", "c", "d"], "greedy": greedy}

    m1, prev, now = pq([True, False, False, True]), pq([True, True, False, False]), pq([False, True, True, False])
    got = metrics.iteration_transitions(3, now, m1=m1, prev=prev)
    assert got == {"iter": 3, "vs_m1": {"gained": ["b", "c"], "lost": ["a", "d"]},
                   "vs_prev": {"gained": ["c"], "lost": ["a"]}}
    assert metrics.iteration_transitions(0, now) == {"iter": 0, "vs_m1": None, "vs_prev": None}
    comps = metrics.iteration_comparisons(1, metrics.per_question(**_fake_eval(7), encoder=BagOfLetters()),
                                          m0=metrics.per_question(**_fake_eval(8), encoder=BagOfLetters()), n_boot=100)
    assert comps["vs_m1"] is None and comps["vs_prev"] is None and comps["vs_m0"]["n_questions"] == 40
