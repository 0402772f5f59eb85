"""The metrics of the paper's "critical evaluation" (docs/method.md), and their uncertainty.

Everything here is plain Python + numpy on verdicts and texts; only semantic diversity needs an encoder
(minisirev.embed), and it receives one as an argument.

    pass@k          unbiased estimator 1 - C(n-c, k) / C(n, k)        (Chen et al. 2021, arXiv 2107.03374)
    coverage        mean over questions of c_i / n                     (ours, docs/method.md)
    IS(t)           {i : M_t greedy correct and M1 greedy wrong}       (Wu et al. 2024, Sec. 4)
    distinct_n      |distinct n-grams| / |n-grams|, whitespace tokens  (Li et al. 2016, arXiv 1510.03055)
    semantic        1 - mean_{i<j} cos(e_i, e_j), all-MiniLM-L6-v2     (Reimers & Gurevych 2019)
    equations       |distinct equation sequences| / |samples|          (ours, docs/method.md)
    disparity       (acc[level 1] - acc[level 5]) / acc[level 1] * 100 (Wu et al. 2024, Sec. 6)

Accuracies are fractions in [0, 1]; only the disparity is in percent (as in the paper). Undefined values
are `None` in the dicts written to JSON (never NaN, which JSON does not have); the report prints "n/a".

One model's evaluation flows through three steps, so that the costly part (encoding samples) runs once:

    per_question(...)            -> pq: per test question its id, greedy verdict, (n, c), diversity values,
                                    plus the OOD levels and verdicts (plain JSON; see its docstring)
    metrics_from_questions(pq)   -> the metrics.json dict (iteration_metrics does both steps in one call)
    iteration_intervals(pq)      -> metrics.json["ci"]: a 95% interval for every number above
    compare_models(pq_a, pq_b)   -> paired tests of b against a (McNemar and paired bootstrap; stats.py)
    iteration_transitions(...)   -> the questions gained and lost against M1 and M_{t-1}
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from minisirev import stats

# --------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex paper, Fig. 3).

        pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i)

    The product form never forms a binomial coefficient, so it is exact in floating point for any n
    (C(1000, 500) overflows a float; the product does not). It is 1 when n - c < k (every k-subset
    holds a correct sample) and 0 when c = 0. Raises ValueError unless 0 <= c <= n and 1 <= k <= n.
    """
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"pass_at_k needs non-negative n, c, k; got n={n}, c={c}, k={k}")
    if c > n:
        raise ValueError(f"pass_at_k: c={c} correct out of n={n} samples")
    if k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n; got k={k}, n={n}")
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over questions; `counts` holds one (n, c) pair per question."""
    if len(counts) == 0:
        raise ValueError("mean_pass_at_k of no questions")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def default_ks(n: int, start: int = 1) -> list[int]:
    """k = start, 2*start, 4*start, ... up to n, plus n itself when n is not a power of two."""
    ks, k = [], start
    while k <= n:
        ks.append(k)
        k *= 2
    if n >= start and (not ks or ks[-1] != n):
        ks.append(n)
    return ks


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None) -> dict[str, float]:
    """{"k": mean pass@k} for k in `ks` (default `default_ks(min n)`: 1, 2, 4, ..., n).

    Keys are strings so the dict round-trips through JSON unchanged. A k larger than the smallest n
    of any question is left out (pass@k is undefined there). An empty `counts` gives {}.
    """
    if len(counts) == 0:
        return {}
    n_min = min(n for n, _ in counts)
    ks = default_ks(n_min) if ks is None else [k for k in ks if 1 <= k <= n_min]
    return {str(k): mean_pass_at_k(counts, k) for k in ks}


def counts_from_verdicts(verdicts: Sequence[Sequence[bool]]) -> list[tuple[int, int]]:
    """Per-question sample verdicts -> (n, c) pairs for the pass@k functions."""
    return [(len(v), int(sum(bool(x) for x in v))) for v in verdicts]


# ------------------------------------------------------------------------------- coverage and IS(t)


def coverage(correct_counts: Sequence[int], n: int) -> float:
    """Correct answer coverage of M1: mean over training questions of c_i / n.

    Ours (docs/method.md): the paper defines coverage as the share of M1's answer distribution inside the
    correct answer space; we estimate it from M1's n samples per training question.
    """
    if len(correct_counts) == 0:
        raise ValueError("coverage of no questions")
    if n < 1 or any(c < 0 or c > n for c in correct_counts):
        raise ValueError(f"coverage needs 0 <= c <= n with n >= 1; got n={n}")
    return float(np.mean(np.asarray(correct_counts, dtype=np.float64) / n))


def recommend(cov: float | None) -> str:
    """The paper's rule as one sentence: coverage > 0.5 favours DPO or SFT-DPO, < 0.5 favours SFT."""
    if cov is None or (isinstance(cov, float) and math.isnan(cov)):
        return "Coverage of M1 is unavailable, so the paper's method recommendation cannot be applied."
    if cov > 0.5:
        return (f"Coverage of M1 is {cov:.3f} > 0.5: most of M1's answers are already correct, so the paper's "
                "rule favours iterative DPO or SFT-DPO over iterative SFT.")
    if cov < 0.5:
        return (f"Coverage of M1 is {cov:.3f} < 0.5: most of M1's answers are wrong, so the paper's rule "
                "favours iterative SFT over DPO and SFT-DPO.")
    return "Coverage of M1 is exactly 0.500: the paper's rule favours neither SFT nor DPO."


def improvement_set(m_t_correct: Sequence[bool], m1_correct: Sequence[bool]) -> list[int]:
    """IS(t): indices of test questions M_t answers correctly (greedy) and M1 does not."""
    if len(m_t_correct) != len(m1_correct):
        raise ValueError(f"improvement_set: {len(m_t_correct)} verdicts for M_t, {len(m1_correct)} for M1")
    return [i for i, (a, b) in enumerate(zip(m_t_correct, m1_correct)) if a and not b]


def improvement_set_metrics(m_t_correct: Sequence[bool], m1_correct: Sequence[bool],
                            m1_counts: Sequence[tuple[int, int]], ks: Sequence[int] | None = None) -> dict:
    """{"size": |IS(t)|, "m1_pass@k": {"k": M1's mean pass@k over IS(t)}}.

    `m1_counts[i]` is (n, c) of M1's samples on test question i. Default ks = 2, 4, ..., n (plus n), the
    paper's check (k = 2..64). An empty IS(t) gives {"size": 0, "m1_pass@k": {}}.
    """
    idx = improvement_set(m_t_correct, m1_correct)
    if len(m1_counts) != len(m1_correct):
        raise ValueError(f"improvement_set_metrics: {len(m1_counts)} sample counts for {len(m1_correct)} questions")
    sub = [m1_counts[i] for i in idx]
    if ks is None and sub:
        ks = default_ks(min(n for n, _ in sub), start=2)
    return {"size": len(idx), "m1_pass@k": pass_at_k_curve(sub, ks)}


# ---------------------------------------------------------------------------------------- diversity


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-N over a set of texts: |distinct n-grams| / |all n-grams| (Li et al. 2016).

    Tokens are `str.split()` (whitespace); n-grams never cross text boundaries. A set with no n-gram at
    all (every text shorter than n tokens) returns 0.0: there is nothing to be diverse about.
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = [g for t in texts for g in _ngrams(t.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_avg(texts: Sequence[str], max_n: int = 5) -> float:
    """Mean of distinct_n over n = 1..max_n (ours: the Kirk et al. 2024 convention).

    Orders n for which the set has no n-gram (all texts shorter than n tokens) are left out of the mean,
    so short texts are not scored as repetitive; a set with no token at all returns 0.0.
    """
    tokens = [t.split() for t in texts]
    longest = max((len(t) for t in tokens), default=0)
    orders = range(1, min(max_n, longest) + 1)
    return float(np.mean([distinct_n(texts, n) for n in orders])) if longest else 0.0


# `<<48/2=24>>` calculator annotations (GSM8K and the arith task).
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
# `expr = value` in plain text: an arithmetic run (digits, operators, brackets, $ and thousands commas),
# "=", then a number. The left run must hold an operator between digits to count (so "x = 5" does not).
_TEXT_EQ = re.compile(r"([0-9.,+\-*/×÷()$\s]+)=\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_HAS_OP = re.compile(r"[0-9)]\s*[-+*/×÷]\s*[-($]*[0-9(]")


def _norm_eq(s: str) -> str:
    # Whitespace, "$" and thousands separators carry no logic: "$1,200 * 2 = 2400" == "1200*2=2400".
    s = re.sub(r"\s+", "", s).replace("$", "")
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    return s.strip(",.")


def extract_equations(text: str) -> tuple[str, ...]:
    """The sequence of equations a solution uses, normalised (no whitespace, "$" or thousands commas).

    Read from the `<<expr=value>>` calculator annotations when the text has any; otherwise from
    `expr = value` spans in the text, where expr holds at least one arithmetic operator (ours).

        "48/2 = <<48/2=24>>24 clips"      -> ("48/2=24",)
        "She pays 3 * $4 = $12. So 12 + 1 = 13" -> ("3*4=12", "12+1=13")
    """
    ann = _ANNOTATION.findall(text)
    if ann:
        return tuple(_norm_eq(a) for a in ann)
    eqs = []
    for line in text.splitlines():
        for left, value in _TEXT_EQ.findall(line):
            left = _norm_eq(left)
            if _HAS_OP.search(left):
                eqs.append(f"{left}={_norm_eq(value)}")
    return tuple(eqs)


def distinct_equations(texts: Sequence[str]) -> float:
    """|distinct equation sequences| / |samples| (ours); a text with no equation counts as ()."""
    if len(texts) == 0:
        raise ValueError("distinct_equations of no texts")
    return len({extract_equations(t) for t in texts}) / len(texts)


def _as_unit_rows(emb: Any) -> np.ndarray:
    e = np.asarray(emb.detach().cpu().float().numpy() if hasattr(emb, "detach") else emb, dtype=np.float64)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def semantic_diversity(texts: Sequence[str], encoder: Any) -> float:
    """1 - mean_{i<j} cos(e_i, e_j) over the sentence embeddings of the texts (all-MiniLM-L6-v2).

    `encoder.encode(list[str])` returns [N, 384] embeddings; rows are re-normalised here in float64.
    0 for identical texts; needs at least two texts.
    """
    if len(texts) < 2:
        raise ValueError("semantic_diversity needs at least two texts")
    return _semantic_from_embeddings(_as_unit_rows(encoder.encode(list(texts))))


def _semantic_from_embeddings(e: np.ndarray) -> float:
    n = e.shape[0]
    sim = e @ e.T  # [N, N] cosines
    mean_offdiag = (sim.sum() - np.trace(sim)) / (n * (n - 1))  # symmetric, so this is the mean over i<j
    return float(1.0 - mean_offdiag)


# The process-wide encoder (or the reason it is unavailable), loaded on first use by diversity(encoder=None);
# a failure is kept too, so the search (which may try the network) runs once per process.
_DEFAULT_ENCODER: list[Any] = []


class _Unavailable:
    """Stands in for an encoder that could not be loaded; diversity reports its reason."""

    def __init__(self, err: Exception):
        self.err = err


def _default_encoder_or_error(encoder: Any) -> Any:
    if encoder is not None:
        return encoder
    if not _DEFAULT_ENCODER:
        try:
            from minisirev.embed import load_encoder  # torch is imported only when semantic diversity is asked

            _DEFAULT_ENCODER.append(load_encoder())
        except Exception as e:  # EncoderUnavailable, or a broken install (e.g. no torch): the reason is reported
            _DEFAULT_ENCODER.append(_Unavailable(e))
    return _DEFAULT_ENCODER[0]


DIVERSITY_MEASURES = ("distinct_n", "semantic", "equations")


def diversity_per_question(groups: dict[str, Sequence[Sequence[str]]], encoder: Any = None, *,
                           semantic: bool = True, semantic_questions: int | None = None,
                           semantic_samples: int | None = None) -> dict[str, dict]:
    """Per-question diversity of several named groups of samples (e.g. {"correct": [...], "incorrect": [...]}).

    groups[name][i] holds question i's texts in that group. Returns, for each name,
        {"distinct_n": [distinct_n_avg or None], "semantic": [semantic_diversity or None],
         "equations": [distinct_equations or None], "semantic_unavailable": "reason"  (only when it applies)}
    with one entry per question; None where the question has fewer than two texts in the group (nothing to
    compare), and for "semantic" also beyond the first `semantic_questions` usable questions (None: all) or when
    no encoder could be loaded. The semantic value of a question is over its first `semantic_samples` texts in the
    group (None: all); samples are independent draws, so the first S are a random subset and the mean pairwise
    similarity over them estimates the one over all without bias, at S (S - 1) / 2 pairs instead of n (n - 1) / 2
    (the encoder dominates the evaluation's CPU time). Every text of every group goes through ONE
    `encoder.encode` call, each distinct text once (self-improved models repeat themselves).
    """
    out: dict[str, dict] = {}
    jobs: dict[str, list[tuple[int, list[str]]]] = {}  # group -> (question, texts) whose semantic value is wanted
    for name, qs in groups.items():
        qs = [list(g) for g in qs]
        usable = [i for i, g in enumerate(qs) if len(g) >= 2]
        d: dict[str, Any] = {m: [None] * len(qs) for m in DIVERSITY_MEASURES}
        for i in usable:
            d["distinct_n"][i] = distinct_n_avg(qs[i])
            d["equations"][i] = distinct_equations(qs[i])
        if not usable:
            d["semantic_unavailable"] = "no question has two or more samples in this group"
        elif not semantic:
            d["semantic_unavailable"] = "semantic diversity not requested"
        else:
            jobs[name] = [(i, qs[i][:semantic_samples or None])
                          for i in (usable[:semantic_questions] if semantic_questions else usable)]
        out[name] = d
    if not jobs:
        return out
    enc = _default_encoder_or_error(encoder)
    if isinstance(enc, _Unavailable):  # no weights (embed.EncoderUnavailable): report, never invent a number
        for name in jobs:
            out[name]["semantic_unavailable"] = f"{type(enc.err).__name__}: {enc.err}"
        return out
    unique = list(dict.fromkeys(t for js in jobs.values() for _, texts in js for t in texts))
    row = {t: r for r, t in enumerate(unique)}
    emb = _as_unit_rows(enc.encode(unique))  # [U, 384], one batched call for every question of every group
    for name, js in jobs.items():
        for i, texts in js:
            out[name]["semantic"][i] = _semantic_from_embeddings(emb[[row[t] for t in texts]])
    return out


def summarise_diversity(per_question: dict) -> dict:
    """One group's per-question diversity (a value of diversity_per_question) -> the metrics.json dict:
    {"distinct_n", "semantic", "equations": means over the questions that have a value (None if none),
     "questions": questions with two or more texts, "skipped": the others,
     "semantic_questions": questions the semantic mean is over (present when it is a number),
     "semantic_unavailable": "reason" (present when "semantic" is None)}."""
    dn = per_question["distinct_n"]
    used = sum(v is not None for v in dn)
    out: dict[str, Any] = {}
    for m in DIVERSITY_MEASURES:
        vals = [v for v in per_question[m] if v is not None]
        out[m] = float(np.mean(vals)) if vals else None
    out.update(questions=used, skipped=len(dn) - used)
    if out["semantic"] is not None:
        out["semantic_questions"] = sum(v is not None for v in per_question["semantic"])
    if "semantic_unavailable" in per_question:
        out["semantic_unavailable"] = per_question["semantic_unavailable"]
    return out


def diversity(groups: Sequence[Sequence[str]], encoder: Any = None, *, semantic: bool = True,
              semantic_questions: int | None = None) -> dict:
    """Diversity of one group of samples per question (e.g. the correct ones), per question then averaged.

    Questions whose group has fewer than two texts are left out and counted in "skipped". Returns
        {"distinct_n": mean distinct_n_avg, "semantic": mean semantic_diversity or None,
         "equations": mean distinct_equations, "questions": used, "skipped": left out,
         "semantic_questions": questions in the semantic mean (present only when "semantic" is a number),
         "semantic_unavailable": "reason"  (present only when "semantic" is None)}
    `encoder=None` loads the default all-MiniLM-L6-v2 once per process; if its weights cannot be found
    (embed.EncoderUnavailable), "semantic" is None with the reason. `semantic=False` skips it.
    With no usable question every measure is None. `semantic_questions` caps how many questions (the first ones
    with two or more texts) the semantic measure is averaged over; None or 0 means all of them.
    """
    per_q = diversity_per_question({"g": groups}, encoder, semantic=semantic, semantic_questions=semantic_questions)
    return summarise_diversity(per_q["g"])


# ----------------------------------------------------------------------------------------------- OOD


def group_disparity(acc_by_level: dict[str, float]) -> float:
    """(acc[lowest level] - acc[highest level]) / acc[lowest level] * 100, in percent (Wu et al. 2024).

    Levels are the keys ("1".."5"), compared as integers; with the usual levels this is level 1 vs
    level 5. Returns NaN when it is undefined: fewer than two levels, or zero accuracy at the lowest.
    """
    levels = sorted(acc_by_level, key=int)
    if len(levels) < 2:
        return float("nan")
    lo, hi = acc_by_level[levels[0]], acc_by_level[levels[-1]]
    if lo is None or hi is None or lo == 0:
        return float("nan")
    return float((lo - hi) / lo * 100.0)


def _by_level(levels: Sequence[int | None]) -> dict[int, np.ndarray]:
    """{level: indices of its questions}, levels in increasing order; questions whose level is None are in none."""
    by: dict[int, list[int]] = {}
    for i, lv in enumerate(levels):
        if lv is not None:
            by.setdefault(int(lv), []).append(i)
    return {lv: np.asarray(by[lv]) for lv in sorted(by)}


def ood_metrics(levels: Sequence[int | None], correct: Sequence[bool]) -> dict:
    """{"levels": {"1": acc, ...}, "whole": acc, "disparity": percent or None, "no_level": count}.

    Accuracies are greedy pass@1 fractions; "disparity" is group_disparity with NaN written as None. A question
    whose level is None (MATH's few "Level ?" records) counts in "whole" and in "no_level", in no level.
    """
    if len(levels) != len(correct):
        raise ValueError(f"ood_metrics: {len(levels)} levels for {len(correct)} verdicts")
    if len(levels) == 0:
        return _no_ood()
    ok = np.asarray(correct, dtype=bool)
    acc = {str(lv): float(ok[idx].mean()) for lv, idx in _by_level(levels).items()}
    d = group_disparity(acc)
    return {"levels": acc, "whole": float(ok.mean()), "disparity": None if math.isnan(d) else d,
            "no_level": sum(lv is None for lv in levels)}


def _no_ood() -> dict:
    return {"levels": {}, "whole": None, "disparity": None, "no_level": 0}


# ------------------------------------------------------------------- per-question data of one model


def per_question(*, greedy_correct: Sequence[bool], sample_texts: Sequence[Sequence[str]],
                 sample_verdicts: Sequence[Sequence[bool]], ids: Sequence[Any] | None = None,
                 ood_levels: Sequence[int | None] | None = None, ood_correct: Sequence[bool] | None = None,
                 encoder: Any = None, semantic: bool = True, semantic_questions: int | None = None,
                 semantic_samples: int | None = None) -> dict:
    """One model's evaluation, per question, as plain JSON (everything the metrics, intervals and tests need):

        {"ids": [test question id],                  default 0..N-1
         "greedy": [bool],                           greedy verdict per test question (pass@1)
         "counts": [[n, c]],                         sampled completions and how many are correct
         "diversity": {"correct": {...}, "incorrect": {...}},   diversity_per_question of each group
         "ood_levels": [int | None] | None, "ood_correct": [bool] | None}   per OOD question

    The test lists share one question order (greedy_correct[i], sample_texts[i], sample_verdicts[i], ids[i]).
    Computing this once per model and storing it lets every later comparison skip the encoder.
    """
    n = len(greedy_correct)
    if len(sample_texts) != n or len(sample_verdicts) != n:
        raise ValueError(f"per_question: {n} greedy verdicts, {len(sample_texts)} sample lists, "
                         f"{len(sample_verdicts)} verdict lists (one each per test question)")
    if any(len(ts) != len(vs) for ts, vs in zip(sample_texts, sample_verdicts)):
        raise ValueError("per_question: a question has a different number of sample texts and verdicts")
    if ids is not None and len(ids) != n:
        raise ValueError(f"per_question: {len(ids)} ids for {n} test questions")
    if (ood_levels is None) != (ood_correct is None):
        raise ValueError("per_question: give both ood_levels and ood_correct, or neither")
    if ood_levels is not None and len(ood_levels) != len(ood_correct):
        raise ValueError(f"per_question: {len(ood_levels)} OOD levels for {len(ood_correct)} OOD verdicts")
    groups = {"correct": [[t for t, ok in zip(ts, vs) if ok] for ts, vs in zip(sample_texts, sample_verdicts)],
              "incorrect": [[t for t, ok in zip(ts, vs) if not ok] for ts, vs in zip(sample_texts, sample_verdicts)]}
    return {"ids": list(ids) if ids is not None else list(range(n)),
            "greedy": [bool(x) for x in greedy_correct],
            "counts": [list(c) for c in counts_from_verdicts(sample_verdicts)],
            "diversity": diversity_per_question(groups, encoder, semantic=semantic,
                                                semantic_questions=semantic_questions,
                                                semantic_samples=semantic_samples),
            "ood_levels": None if ood_levels is None else [None if lv is None else int(lv) for lv in ood_levels],
            "ood_correct": None if ood_correct is None else [bool(x) for x in ood_correct]}


def _counts(pq: dict) -> list[tuple[int, int]]:
    return [(int(n), int(c)) for n, c in pq["counts"]]


def metrics_from_questions(pq: dict, *, iter: int, step_method: str, m1: dict | None = None,
                           coverage: float | None = None) -> dict:
    """The metrics.json dict of model M_t from its per_question dict `pq`.

    m1        M1's per_question dict, for IS(t); None for t = 1 (IS(1) is empty by definition) and t = 0, where
              the improvement set is n/a ("size" None)
    coverage  M1's coverage on the training set (t = 1 only; see `coverage`)
    """
    if iter == 0:
        is_metrics = {"size": None, "m1_pass@k": {}}
    elif m1 is None:
        is_metrics = {"size": 0, "m1_pass@k": {}}
    else:
        is_metrics = improvement_set_metrics(pq["greedy"], m1["greedy"], _counts(m1))
    greedy = pq["greedy"]
    return {
        "iter": iter,
        "step_method": step_method,
        "pass@1": float(np.mean(greedy)) if len(greedy) else None,
        "pass@k": pass_at_k_curve(_counts(pq)),
        "coverage": coverage,
        "improvement_set": is_metrics,
        "diversity": {g: summarise_diversity(pq["diversity"][g]) for g in ("correct", "incorrect")},
        "ood": (ood_metrics(pq["ood_levels"], pq["ood_correct"]) if pq.get("ood_levels") is not None
                else _no_ood()),
    }


def iteration_metrics(*, iter: int, step_method: str, greedy_correct: Sequence[bool],
                      sample_texts: Sequence[Sequence[str]], sample_verdicts: Sequence[Sequence[bool]],
                      m1_greedy_correct: Sequence[bool] | None = None,
                      m1_counts: Sequence[tuple[int, int]] | None = None,
                      coverage: float | None = None,
                      ood_levels: Sequence[int | None] | None = None, ood_correct: Sequence[bool] | None = None,
                      encoder: Any = None, semantic: bool = True, semantic_questions: int | None = None) -> dict:
    """The metrics.json dict of one model M_t from its test-set evaluation: per_question + metrics_from_questions.

    greedy_correct[i]       M_t's greedy verdict on test question i (pass@1)
    sample_texts[i]         M_t's n sampled completions on test question i, sample_verdicts[i] their verdicts
    m1_greedy_correct,      M1's greedy verdicts and (n, c) sample counts on the test set, for IS(t);
      m1_counts             for t = 1 pass None (M1 against itself: IS(1) is empty by definition)
    coverage                M1's coverage on the training set (iteration 1 only; see `coverage`)
    ood_levels/ood_correct  the OOD split's difficulty levels (None: no level) and M_t's greedy verdicts
    """
    pq = per_question(greedy_correct=greedy_correct, sample_texts=sample_texts, sample_verdicts=sample_verdicts,
                      ood_levels=ood_levels, ood_correct=ood_correct, encoder=encoder, semantic=semantic,
                      semantic_questions=semantic_questions)
    m1 = None
    if m1_greedy_correct is not None and m1_counts is not None:
        m1 = {"greedy": list(m1_greedy_correct), "counts": [list(c) for c in m1_counts]}
    return metrics_from_questions(pq, iter=iter, step_method=step_method, m1=m1, coverage=coverage)


# ------------------------------------------------------------------------ intervals and paired tests


def pass_at_k_values(counts: Sequence[tuple[int, int]], k: int) -> np.ndarray:
    """[N] per-question pass@k (their mean is mean_pass_at_k)."""
    return np.array([pass_at_k(n, c, k) for n, c in counts], dtype=np.float64)


def _values(per_q: list) -> np.ndarray:
    return np.array([v for v in per_q if v is not None], dtype=np.float64)


def _strata(levels: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices of the lowest and the highest level's questions (the disparity's two groups), or None."""
    by = _by_level(levels)
    if len(by) < 2:
        return None
    lo, hi = by[min(by)], by[max(by)]
    return (lo, hi) if min(len(lo), len(hi)) >= stats.MIN_QUESTIONS else None


def _disparity_reps(ok: np.ndarray, strata: tuple[np.ndarray, np.ndarray], draws: tuple[np.ndarray, np.ndarray]
                    ) -> np.ndarray:
    """[n_boot] disparities of resampled verdicts (each level resampled within itself); NaN where acc_lo* = 0."""
    a_lo = ok[strata[0][draws[0]]].mean(axis=1)
    a_hi = ok[strata[1][draws[1]]].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a_lo > 0, (a_lo - a_hi) / a_lo * 100.0, np.nan)


def _strata_draws(strata: tuple[np.ndarray, np.ndarray], n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, len(s), size=(n_boot, len(s))) for s in strata)


def _finite_or_none(reps: np.ndarray, level: float) -> np.ndarray | None:
    """The finite replicates, or None when more of them are undefined than one tail of the interval holds
    (the interval would then depend on how the undefined ones are treated)."""
    finite = reps[np.isfinite(reps)]
    return finite if len(reps) - len(finite) <= (1 - level) / 2 * len(reps) else None


def iteration_intervals(pq: dict, *, m1: dict | None = None, n_boot: int = stats.N_BOOT, seed: int = 0,
                        level: float = stats.LEVEL) -> dict:
    """Percentile-bootstrap intervals over questions for the numbers of metrics_from_questions(pq), same layout:

        {"pass@1": [lo, hi], "pass@k": {"k": [lo, hi]}, "improvement_set": {"m1_pass@k": {"k": [lo, hi]}},
         "diversity": {"correct": {"distinct_n": [lo, hi], "semantic": .., "equations": ..}, "incorrect": {..}},
         "ood": {"whole": [lo, hi], "levels": {"1": [lo, hi]}, "disparity": [lo, hi]},
         "level": 0.95, "n_boot": n_boot, "seed": seed, "method": "percentile bootstrap over questions"}

    metrics.json stores it under "ci", so ci[path] is the interval of metrics[path]. An interval is None where
    its number is undefined or rests on fewer than stats.MIN_QUESTIONS questions. Diversity resamples the
    questions that have a value; IS(t)'s pass@k resamples the questions of IS(t) (given the set); the disparity
    resamples each of its two levels within itself (the split fixes how many questions each level has).
    """
    kw = {"n_boot": n_boot, "seed": seed, "level": level}
    counts = _counts(pq)
    out: dict[str, Any] = {"level": level, "n_boot": n_boot, "seed": seed,
                           "method": "percentile bootstrap over questions"}
    out["pass@1"] = stats.bootstrap_ci(pq["greedy"], **kw) if pq["greedy"] else None
    out["pass@k"] = {k: stats.bootstrap_ci(pass_at_k_values(counts, int(k)), **kw) for k in pass_at_k_curve(counts)}
    is_ci: dict[str, Any] = {}
    if m1 is not None:
        sub = [_counts(m1)[i] for i in improvement_set(pq["greedy"], m1["greedy"])]
        if sub:
            is_ci = {str(k): stats.bootstrap_ci(pass_at_k_values(sub, k), **kw)
                     for k in default_ks(min(n for n, _ in sub), start=2)}
    out["improvement_set"] = {"m1_pass@k": is_ci}
    out["diversity"] = {g: {m: (stats.bootstrap_ci(v, **kw) if len(v := _values(d[m])) else None)
                            for m in DIVERSITY_MEASURES} for g, d in pq["diversity"].items()}
    out["ood"] = {"whole": None, "levels": {}, "disparity": None}
    if pq.get("ood_levels"):
        ok = np.asarray(pq["ood_correct"], dtype=np.float64)
        out["ood"]["whole"] = stats.bootstrap_ci(ok, **kw)
        out["ood"]["levels"] = {str(lv): stats.bootstrap_ci(ok[idx], **kw)
                                for lv, idx in _by_level(pq["ood_levels"]).items()}
        strata = _strata(pq["ood_levels"])
        if strata is not None:
            reps = _finite_or_none(_disparity_reps(ok, strata, _strata_draws(strata, n_boot, seed)), level)
            out["ood"]["disparity"] = None if reps is None else stats.percentile_interval(reps, level)
    return out


def _leaf(res: dict, alpha: float) -> dict:
    res["verdict"] = stats.verdict(res, alpha)
    return res


def _paired_disparity(a_ok: np.ndarray, b_ok: np.ndarray, strata, *, n_boot: int, seed: int, level: float) -> dict:
    out = {"a": None, "b": None, "diff": None, "ci": None, "p": None, "n": 0,
           "test": "paired bootstrap, stratified by level"}
    if strata is None:
        return out
    da = group_disparity({"1": float(a_ok[strata[0]].mean()), "2": float(a_ok[strata[1]].mean())})
    db = group_disparity({"1": float(b_ok[strata[0]].mean()), "2": float(b_ok[strata[1]].mean())})
    out["n"] = len(strata[0]) + len(strata[1])
    if math.isnan(da) or math.isnan(db):
        return out
    out.update(a=da, b=db, diff=db - da)
    draws = _strata_draws(strata, n_boot, seed)
    reps = _finite_or_none(_disparity_reps(b_ok, strata, draws) - _disparity_reps(a_ok, strata, draws), level)
    if reps is not None:
        out.update(ci=stats.percentile_interval(reps, level), p=stats.bootstrap_p(reps))
    return out


def compare_models(a: dict, b: dict, *, n_boot: int = stats.N_BOOT, seed: int = 0, level: float = stats.LEVEL,
                   alpha: float = stats.ALPHA) -> dict:
    """Paired tests of model b against model a on the same questions (a, b: per_question dicts).

        {"pass@1": leaf with "p" from McNemar (its counts under "mcnemar") and "p_bootstrap",
         "pass@k": {"k": leaf}, "diversity": {"correct": {"distinct_n": leaf, "semantic": leaf, "equations": leaf},
         "incorrect": {...}}, "ood": {"whole": leaf, "levels": {"1": leaf}, "disparity": leaf} or None,
         "n_questions", "level", "n_boot", "seed", "alpha"}
        leaf = {"a", "b", "diff": b - a, "ci": [lo, hi] of the diff, "p": two-sided, "test", "n": questions,
                "verdict": "shown" | "within noise" | "cannot tell"}   (stats.verdict at alpha)

    pass@1 is tested with McNemar (stats.mcnemar), the rest with the paired bootstrap (stats.paired_bootstrap);
    pass@k at the k both models have. Diversity pairs the questions where both models have a value, so its
    "a" and "b" are means over those questions (they can differ from metrics.json, which averages each model over
    its own). Raises ValueError when the two were evaluated on different questions.
    """
    if list(a["ids"]) != list(b["ids"]):
        raise ValueError("compare_models: the two models were evaluated on different test questions")
    kw = {"n_boot": n_boot, "seed": seed, "level": level}
    ga, gb = np.asarray(a["greedy"], dtype=np.float64), np.asarray(b["greedy"], dtype=np.float64)
    p1 = stats.paired_bootstrap(ga, gb, **kw)
    mc = stats.mcnemar(a["greedy"], b["greedy"])
    p1.update(p_bootstrap=p1["p"], p=mc["p"], test=f"McNemar, {mc['test']}", mcnemar=mc)
    ca, cb = _counts(a), _counts(b)
    ks = [k for k in pass_at_k_curve(ca) if k in pass_at_k_curve(cb)] if ca and cb else []
    out: dict[str, Any] = {"n_questions": len(ga), "level": level, "n_boot": n_boot, "seed": seed, "alpha": alpha,
                           "pass@1": _leaf(p1, alpha)}
    out["pass@k"] = {k: _leaf(stats.paired_bootstrap(pass_at_k_values(ca, int(k)), pass_at_k_values(cb, int(k)),
                                                     **kw), alpha) for k in ks}
    div: dict[str, dict] = {}
    for g in a["diversity"]:
        div[g] = {}
        for m in DIVERSITY_MEASURES:
            va, vb = a["diversity"][g][m], b["diversity"][g][m]
            both = [i for i in range(len(va)) if va[i] is not None and vb[i] is not None]
            div[g][m] = _leaf(stats.paired_bootstrap([va[i] for i in both], [vb[i] for i in both], **kw), alpha)
    out["diversity"] = div
    out["ood"] = None
    if a.get("ood_levels") and b.get("ood_levels"):
        if list(a["ood_levels"]) != list(b["ood_levels"]):
            raise ValueError("compare_models: the two models were evaluated on different OOD questions")
        oa, ob = np.asarray(a["ood_correct"], dtype=np.float64), np.asarray(b["ood_correct"], dtype=np.float64)
        out["ood"] = {
            "whole": _leaf(stats.paired_bootstrap(oa, ob, **kw), alpha),
            "levels": {str(lv): _leaf(stats.paired_bootstrap(oa[idx], ob[idx], **kw), alpha)
                       for lv, idx in _by_level(a["ood_levels"]).items()},
            "disparity": _leaf(_paired_disparity(oa, ob, _strata(a["ood_levels"]), **kw), alpha)}
    return out


def iteration_transitions(t: int, pq: dict, *, m1: dict | None = None, prev: dict | None = None) -> dict:
    """{"iter": t, "vs_m1": {"gained": [ids], "lost": [ids]} or None, "vs_prev": {...} or None} on greedy verdicts.

    "gained" against M1 is IS(t); "lost" is the regression the improvement set does not show. Pass m1 = None
    for t <= 1 and prev = None for t = 0 (M0 has no predecessor).
    """
    def tr(other: dict | None) -> dict | None:
        if other is None:
            return None
        if list(other["ids"]) != list(pq["ids"]):
            raise ValueError(f"iteration_transitions: iteration {t} and its reference model differ in questions")
        return stats.transitions(pq["ids"], other["greedy"], pq["greedy"])

    return {"iter": t, "vs_m1": tr(m1), "vs_prev": tr(prev)}


def iteration_comparisons(t: int, pq: dict, *, m0: dict | None = None, m1: dict | None = None,
                          prev: dict | None = None, **kw: Any) -> dict:
    """{"iter": t, "vs_m0": compare_models(m0, pq), "vs_m1": .., "vs_prev": ..}; an entry is None when its model
    is not given (pass m1 = None for t <= 1; for t = 1 the previous model is M0). `kw` goes to compare_models."""
    return {"iter": t, **{f"vs_{name}": None if other is None else compare_models(other, pq, **kw)
                          for name, other in (("m0", m0), ("m1", m1), ("prev", prev))}}
