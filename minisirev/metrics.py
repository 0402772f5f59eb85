"""The metrics of the paper's "critical evaluation" (PAPER.md, "The metrics").

Everything here is plain Python + numpy on verdicts and texts; only `semantic_diversity` needs an
encoder (minisirev.embed), and it receives one as an argument.

    pass@k          unbiased estimator 1 - C(n-c, k) / C(n, k)        (Chen et al. 2021, arXiv 2107.03374)
    coverage        mean over questions of c_i / n                     (PAPER.md, ours)
    IS(t)           {i : M_t greedy correct and M1 greedy wrong}       (Wu et al. 2024, Sec. 4)
    distinct_n      |distinct n-grams| / |n-grams|, whitespace tokens  (Li et al. 2016, arXiv 1510.03055)
    semantic        1 - mean_{i<j} cos(e_i, e_j), all-MiniLM-L6-v2     (Reimers & Gurevych 2019)
    equations       |distinct equation sequences| / |samples|          (PAPER.md, ours)
    disparity       (acc[level 1] - acc[level 5]) / acc[level 1] * 100 (Wu et al. 2024, Sec. 6)

Accuracies are fractions in [0, 1]; only the disparity is in percent (as in the paper). Undefined values
are `None` in the dicts written to JSON (never NaN, which JSON does not have); the report prints "n/a".

`iteration_metrics` assembles one iteration's metrics.json dict with the keys of DESIGN.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

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

    PAPER.md (ours): the paper defines coverage as the share of M1's answer distribution inside the
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
    """Mean of distinct_n over n = 1..max_n (PAPER.md, ours: the Kirk et al. 2024 convention).

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
    `expr = value` spans in the text, where expr holds at least one arithmetic operator (PAPER.md, ours).

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
    """|distinct equation sequences| / |samples| (PAPER.md, ours); a text with no equation counts as ()."""
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


def diversity(groups: Sequence[Sequence[str]], encoder: Any = None, *, semantic: bool = True,
              semantic_questions: int | None = None) -> dict:
    """Diversity of one group of samples per question (e.g. the correct ones), per question then averaged.

    Questions whose group has fewer than two texts are left out and counted in "skipped". Returns
        {"distinct_n": mean distinct_n_avg, "semantic": mean semantic_diversity or None,
         "equations": mean distinct_equations, "questions": used, "skipped": left out,
         "semantic_unavailable": "reason"  (present only when "semantic" is None)}
    `encoder=None` loads the default all-MiniLM-L6-v2 once per process; if its weights cannot be found
    (embed.EncoderUnavailable), "semantic" is None with the reason. `semantic=False` skips it.
    With no usable question every measure is None. `semantic_questions` caps how many questions (the first ones
    with two or more texts) the semantic measure is averaged over, because encoding every sample is the costly
    part on a CPU; the number used is reported as "semantic_questions".
    """
    used = [list(g) for g in groups if len(g) >= 2]
    out: dict[str, Any] = {"distinct_n": None, "semantic": None, "equations": None,
                           "questions": len(used), "skipped": len(groups) - len(used)}
    if not used:
        out["semantic_unavailable"] = "no question has two or more samples in this group"
        return out
    out["distinct_n"] = float(np.mean([distinct_n_avg(g) for g in used]))
    out["equations"] = float(np.mean([distinct_equations(g) for g in used]))
    if not semantic:
        out["semantic_unavailable"] = "semantic diversity not requested"
        return out
    enc = _default_encoder_or_error(encoder)
    if isinstance(enc, _Unavailable):  # no weights (embed.EncoderUnavailable): report, never invent a number
        out["semantic_unavailable"] = f"{type(enc.err).__name__}: {enc.err}"
        return out
    sem_used = used[:semantic_questions] if semantic_questions else used
    flat = [t for g in sem_used for t in g]
    emb = _as_unit_rows(enc.encode(flat))  # one batched call for all questions
    vals, start = [], 0
    for g in sem_used:
        vals.append(_semantic_from_embeddings(emb[start:start + len(g)]))
        start += len(g)
    out["semantic"] = float(np.mean(vals))
    out["semantic_questions"] = len(sem_used)
    return out


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


def ood_metrics(levels: Sequence[int], correct: Sequence[bool]) -> dict:
    """{"levels": {"1": acc, ...}, "whole": acc, "disparity": percent or None} from per-question verdicts.

    Accuracies are greedy pass@1 fractions; "disparity" is group_disparity with NaN written as None.
    """
    if len(levels) != len(correct):
        raise ValueError(f"ood_metrics: {len(levels)} levels for {len(correct)} verdicts")
    if len(levels) == 0:
        return {"levels": {}, "whole": None, "disparity": None}
    by: dict[int, list[bool]] = {}
    for lv, ok in zip(levels, correct):
        by.setdefault(int(lv), []).append(bool(ok))
    acc = {str(lv): float(np.mean(v)) for lv, v in sorted(by.items())}
    d = group_disparity(acc)
    return {"levels": acc, "whole": float(np.mean([bool(c) for c in correct])),
            "disparity": None if math.isnan(d) else d}


# ------------------------------------------------------------------------------- one iteration's dict


def iteration_metrics(*, iter: int, step_method: str, greedy_correct: Sequence[bool],
                      sample_texts: Sequence[Sequence[str]], sample_verdicts: Sequence[Sequence[bool]],
                      m1_greedy_correct: Sequence[bool] | None = None,
                      m1_counts: Sequence[tuple[int, int]] | None = None,
                      coverage: float | None = None,
                      ood_levels: Sequence[int] | None = None, ood_correct: Sequence[bool] | None = None,
                      encoder: Any = None, semantic: bool = True, semantic_questions: int | None = None) -> dict:
    """The metrics.json dict of one model M_t (keys of DESIGN.md), from its test-set evaluation.

    greedy_correct[i]       M_t's greedy verdict on test question i (pass@1)
    sample_texts[i]         M_t's n sampled completions on test question i, sample_verdicts[i] their verdicts
    m1_greedy_correct,      M1's greedy verdicts and (n, c) sample counts on the test set, for IS(t);
      m1_counts             for t = 1 pass None (M1 against itself: IS(1) is empty by definition)
    coverage                M1's coverage on the training set (iteration 1 only; see `coverage`)
    ood_levels/ood_correct  the OOD split's difficulty levels and M_t's greedy verdicts
    """
    if len(sample_texts) != len(sample_verdicts):
        raise ValueError("iteration_metrics: sample_texts and sample_verdicts differ in length")
    counts = counts_from_verdicts(sample_verdicts)
    correct = [[t for t, ok in zip(ts, vs) if ok] for ts, vs in zip(sample_texts, sample_verdicts)]
    wrong = [[t for t, ok in zip(ts, vs) if not ok] for ts, vs in zip(sample_texts, sample_verdicts)]
    if m1_greedy_correct is None or m1_counts is None:
        is_metrics = {"size": 0, "m1_pass@k": {}}
    else:
        is_metrics = improvement_set_metrics(greedy_correct, m1_greedy_correct, m1_counts)
    enc = _default_encoder_or_error(encoder) if semantic else None
    out = {
        "iter": iter,
        "step_method": step_method,
        "pass@1": float(np.mean([bool(c) for c in greedy_correct])) if len(greedy_correct) else None,
        "pass@k": pass_at_k_curve(counts),
        "coverage": coverage,
        "improvement_set": is_metrics,
        "diversity": {"correct": diversity(correct, enc, semantic=semantic, semantic_questions=semantic_questions),
                      "incorrect": diversity(wrong, enc, semantic=semantic, semantic_questions=semantic_questions)},
        "ood": (ood_metrics(ood_levels, ood_correct) if ood_levels is not None and ood_correct is not None
                else {"levels": {}, "whole": None, "disparity": None}),
    }
    return out


