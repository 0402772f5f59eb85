"""The report of a run: report.md (tables, findings, audit) and plots/*.png, from summary.json's dict.

    summary = {"task", "method", "config",
               "base": metrics.json dict of M0 (t = 0) or None,  "iterations": [metrics.json dict of t = 1..T],
               "comparisons": [{"iter", "vs_m0", "vs_m1", "vs_prev"}]     (metrics.iteration_comparisons)
               "transitions": [{"iter", "vs_m1", "vs_prev"}]              (metrics.iteration_transitions)
               "provenance": [record per model]                           (provenance.iteration_provenance)
               "second_verifier": [{"iter", **compare_verifiers(test split), "ood": compare_verifiers(OOD split)}]}

Every key but "iterations" may be missing; a metrics dict may carry "ci" (metrics.iteration_intervals, the same
layout as the metrics). Accuracies are fractions in the JSON and percent in the report, each headline number with
its 95% interval: "41.0 [37.5, 44.5]". A missing or undefined value is printed as "n/a", never guessed.

The findings test the paper's four phenomena on the run's numbers, each with the paired test behind it (stats.py;
alpha = 0.05). A change counts only when it is significant; the verdict is "shown", "within noise" (the change
is not significant), "not shown" (a significant change the other way), "partly shown" (some checks shown, others
not) or "cannot tell (why)":
  1. pass@1 rises, then plateaus or dips: the best t >= 2 beats M1 significantly (McNemar), and the last
     iteration adds no significant gain over the one before;
  2. M1's pass@k on IS(t) approaches 100%: at the largest k its interval lies above NEAR_FULL for every t >= 2
     with a non-empty IS(t) ("not shown" when it lies below, "within noise" when it straddles);
  3. diversity falls, for correct and incorrect samples, on each measure: the last iteration against M1;
  4. OOD accuracy falls and the level-1 vs level-5 disparity widens: the last iteration against M1.
Plots use matplotlib's object API (Figure + Agg canvas), so no global backend is switched.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from minisirev.metrics import recommend
from minisirev.stats import ALPHA, verdict

NEAR_FULL = 0.9  # M1's pass@k on IS(t) at the largest k that counts as "approaching 100%"
MATH_TASKS = ("gsm8k", "math", "arith")  # tasks the second verifier (math-verify) applies to

MEASURES = [("distinct_n", "Distinct-N"), ("semantic", "SBERT"), ("equations", "equations")]
GROUPS = ["correct", "incorrect"]
FILE_KEYS = [("start_model", "started from"), ("ref_model", "reference"), ("train_data", "train data"),
             ("samples", "samples"), ("model", "weights")]

# ------------------------------------------------------------------------------------------- helpers


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_pct(x: float | None) -> str:
    """A fraction as percent with one decimal ("48.5"), or "n/a"."""
    return "n/a" if _missing(x) else f"{100 * x:.1f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    """A plain number ("0.627"), or "n/a"."""
    return "n/a" if _missing(x) else f"{x:.{digits}f}"


def _ci_ok(ci: Any) -> bool:
    return isinstance(ci, (list, tuple)) and len(ci) == 2 and not any(_missing(v) for v in ci)


def fmt_ci(x: float | None, ci: Any, *, pct: bool = True, digits: int = 3) -> str:
    """A number with its interval: "41.0 [37.5, 44.5]" (pct) or "0.627 [0.601, 0.650]"; no interval, no brackets."""
    f = fmt_pct if pct else (lambda v: fmt_num(v, digits))
    if _missing(x):
        return "n/a"
    return f"{f(x)} [{f(ci[0])}, {f(ci[1])}]" if _ci_ok(ci) else f(x)


def fmt_p(p: float | None) -> str:
    return "p n/a" if _missing(p) else "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def fmt_change(leaf: dict | None, *, pct: bool = True, digits: int = 3, test: bool = True) -> str:
    """A paired comparison: "+3.0 [-1.2, +7.0], p = 0.120 (McNemar, exact binomial), within noise" (the test's
    name only with `test`)."""
    if not isinstance(leaf, dict) or _missing(leaf.get("diff")):
        return "n/a"
    scale, d = (100, 1) if pct else (1, digits)
    ci = leaf.get("ci")
    band = f" [{scale * ci[0]:+.{d}f}, {scale * ci[1]:+.{d}f}]" if _ci_ok(ci) else ""
    name = f" ({leaf.get('test', '?')})" if test else ""
    return f"{scale * leaf['diff']:+.{d}f}{band}, {fmt_p(leaf.get('p'))}{name}, {verdict(leaf)}"


def _int(x: int | None) -> str:
    return "n/a" if x is None else str(x)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _val_ci(m: dict, *path: str) -> tuple[Any, Any]:
    """metrics[path] and its interval metrics["ci"][path] (the interval dict mirrors the metrics)."""
    return _get(m, *path), _get(m, "ci", *path)


def _ks(dicts: list[dict | None]) -> list[str]:
    """The union of the dicts' k keys, in numeric order."""
    return sorted({k for d in dicts if isinstance(d, dict) for k in d}, key=int)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _iters(summary: dict) -> list[dict]:
    """The iterations t = 1..T, in order."""
    return sorted(summary.get("iterations", []), key=lambda m: m.get("iter", 0))


def _rows(summary: dict) -> list[dict]:
    """Every evaluated model in order: M0 (t = 0) first when the summary has it, then t = 1..T."""
    base = summary.get("base")
    return ([base] if isinstance(base, dict) else []) + _iters(summary)


def _t(m: dict) -> str:
    return str(m.get("iter", "?"))


def _method(m: dict) -> str:
    return str(m.get("step_method") or "n/a")


def _coverage(summary: dict) -> float | None:
    for m in _iters(summary):
        if not _missing(m.get("coverage")):
            return m["coverage"]
    return None


def _by_iter(summary: dict, key: str) -> dict[int, dict]:
    return {e["iter"]: e for e in summary.get(key) or [] if isinstance(e, dict) and "iter" in e}


def comparison(summary: dict, t: int, against: str) -> dict | None:
    """summary's paired comparison of M_t against "m0", "m1" or "prev" (M_{t-1}). The previous model of t = 1 is
    M0 and of t = 2 is M1, so "prev" falls back to those comparisons when it is not stored separately."""
    e = _by_iter(summary, "comparisons").get(t) or {}
    got = e.get(f"vs_{against}")
    if got is None and against == "prev":
        got = e.get("vs_m0") if t == 1 else e.get("vs_m1") if t == 2 else None
    return got


# -------------------------------------------------------------------------------------------- tables


def pass_at_k_table(summary: dict) -> str:
    ms = _rows(summary)
    ks = _ks([m.get("pass@k") for m in ms])
    rows = [[_t(m), _method(m), fmt_ci(*_val_ci(m, "pass@1"))] + [fmt_ci(*_val_ci(m, "pass@k", k)) for k in ks]
            for m in ms]
    return _table(["t", "step", "pass@1 (greedy)"] + [f"pass@{k}" for k in ks], rows)


def changes_table(summary: dict) -> str:
    """pass@1, the largest pass@k and OOD accuracy of each M_t against M0, M1 and M_{t-1} (paired tests)."""
    its = _iters(summary)
    ks = _ks([m.get("pass@k") for m in its])
    kmax = ks[-1] if ks else None
    cols = [("pass@1", ("pass@1",), ["m0", "m1", "prev"]), (f"pass@{kmax}", ("pass@k", kmax), ["m1"]),
            ("OOD whole", ("ood", "whole"), ["m1"])]
    names = {"m0": "M0", "m1": "M1", "prev": "M_{t-1}"}
    header = ["t", "step"] + [f"{label} vs {names[a]}" for label, _, against in cols for a in against]
    rows = []
    for m in its:
        t = m.get("iter")
        row = [_t(m), _method(m)]
        for _, path, against in cols:
            for a in against:
                skip = (a == "m1" and t == 1) or (a == "m0" and summary.get("base") is None) or path[-1] is None
                row.append("n/a" if skip else fmt_change(_get(comparison(summary, t, a), *path), test=False))
        rows.append(row)
    return _table(header, rows)


def improvement_set_table(summary: dict) -> str:
    ms = _rows(summary)
    ks = _ks([_get(m, "improvement_set", "m1_pass@k") for m in ms])
    rows = [[_t(m), _method(m), _int(_get(m, "improvement_set", "size"))]
            + [fmt_ci(*_val_ci(m, "improvement_set", "m1_pass@k", k)) for k in ks] for m in ms]
    return _table(["t", "step", "size of IS(t)"] + [f"M1 pass@{k}" for k in ks], rows)


def transitions_table(summary: dict) -> str:
    """Per t: questions gained and lost (greedy) against M1 and against M_{t-1}; gained vs M1 is IS(t)."""
    tr = _by_iter(summary, "transitions")
    rows = []
    for m in _rows(summary):
        e = tr.get(m.get("iter")) or {}
        row = [_t(m), _method(m)]
        for key in ("vs_m1", "vs_prev"):
            g, lo = _get(e, key, "gained"), _get(e, key, "lost")
            row += ["n/a", "n/a", "n/a"] if g is None or lo is None else [str(len(g)), str(len(lo)),
                                                                           f"{len(g) - len(lo):+d}"]
        rows.append(row)
    return _table(["t", "step", "gained vs M1", "lost vs M1", "net vs M1", "gained vs M_{t-1}", "lost vs M_{t-1}",
                   "net vs M_{t-1}"], rows)


def diversity_table(summary: dict) -> str:
    header = ["t", "step"] + [f"{g} {label}" for g in GROUPS for _, label in MEASURES] + \
             [f"{g} questions (used/skipped)" for g in GROUPS]
    rows = []
    for m in _rows(summary):
        row = [_t(m), _method(m)]
        row += [fmt_ci(*_val_ci(m, "diversity", g, key), pct=False) for g in GROUPS for key, _ in MEASURES]
        for g in GROUPS:
            used, skipped = _get(m, "diversity", g, "questions"), _get(m, "diversity", g, "skipped")
            row.append("n/a" if used is None else f"{used}/{skipped}")
        rows.append(row)
    return _table(header, rows)


def ood_table(summary: dict) -> str:
    ms = _rows(summary)
    levels = _ks([_get(m, "ood", "levels") for m in ms])
    rows = [[_t(m), _method(m)] + [fmt_ci(*_val_ci(m, "ood", "levels", lv)) for lv in levels]
            + [fmt_ci(*_val_ci(m, "ood", "whole")), fmt_ci(*_val_ci(m, "ood", "disparity"), pct=False, digits=1)]
            for m in ms]
    return _table(["t", "step"] + [f"level {lv}" for lv in levels] + ["whole", "disparity (%)"], rows)


def format_table(summary: dict) -> str:
    """A compact per-model console table (train.py's final print), from t = 0 when M0 was evaluated."""
    ms = _rows(summary)
    ks = _ks([m.get("pass@k") for m in ms])
    kmax = ks[-1] if ks else None
    header = ["iter", "method", "pass@1", f"pass@{kmax or 'k'}", "coverage", "|IS|", "dist-n(c)", "OOD", "disp%"]
    rows = []
    for m in ms:
        rows.append([_t(m), _method(m), fmt_pct(m.get("pass@1")),
                     fmt_pct(_get(m, "pass@k", kmax)) if kmax else "n/a", fmt_num(m.get("coverage")),
                     _int(_get(m, "improvement_set", "size")), fmt_num(_get(m, "diversity", "correct", "distinct_n")),
                     fmt_pct(_get(m, "ood", "whole")), fmt_num(_get(m, "ood", "disparity"), 1)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows)


# ------------------------------------------------------------------------------------------ findings


def _direction(leaf: dict | None, want: int) -> str:
    """The outcome of one check that expects the change to have sign `want` (+1 rise, -1 fall)."""
    if not isinstance(leaf, dict) or _missing(leaf.get("diff")) or _missing(leaf.get("p")):
        return "cannot tell"
    if verdict(leaf) == "within noise":
        return "within noise"
    return "shown" if leaf["diff"] * want > 0 else "not shown"


def _combine(outcomes: list[str]) -> str:
    known = [o for o in outcomes if o != "cannot tell"]
    if not known:
        return "cannot tell"
    shown = known.count("shown")
    if shown == len(known):
        return "shown" if len(known) == len(outcomes) else f"shown on the {shown} of {len(outcomes)} checks available"
    if shown == 0:
        return "not shown" if "not shown" in known else "within noise"
    return "partly shown"


def _finding_pass1(summary: dict) -> str:
    head = "1. pass@1 rises, then plateaus or dips"
    its = [m for m in _iters(summary) if not _missing(m.get("pass@1"))]
    if len(its) < 2:
        return f"{head}: cannot tell (pass@1 is known for {len(its)} iteration(s), at least two are needed)."
    first, last = its[0], its[-1]
    best = max(its[1:], key=lambda m: m["pass@1"])
    rise = _get(comparison(summary, best["iter"], "m1"), "pass@1")
    step = _get(comparison(summary, last["iter"], "prev"), "pass@1")
    text = (f"pass@1 went from {fmt_ci(*_val_ci(first, 'pass@1'))}% (t={first['iter']}) to a best of "
            f"{fmt_ci(*_val_ci(best, 'pass@1'))}% (t={best['iter']}; vs M1 {fmt_change(rise)}) and ended at "
            f"{fmt_ci(*_val_ci(last, 'pass@1'))}% (t={last['iter']}; last step {fmt_change(step)})")
    if rise is None:
        return f"{head}: cannot tell (no paired test in the summary), {text}."
    rose = _direction(rise, +1)
    if rose != "shown":
        return f"{head}: {rose}, {text}."
    if len(its) < 3:
        return f"{head}: cannot tell (pass@1 rose significantly, but two iterations cannot show a plateau), {text}."
    still = _direction(step, +1) == "shown"
    return f"{head}: {'not shown (still rising)' if still else 'shown'}, {text}."


def _finding_is(summary: dict) -> str:
    head = "2. M1's pass@k on the improvement set IS(t) approaches 100% for large k"
    pts = []
    for m in _iters(summary):
        curve = _get(m, "improvement_set", "m1_pass@k") or {}
        size = _get(m, "improvement_set", "size") or 0
        if m.get("iter", 1) >= 2 and size > 0 and curve:
            k = max(curve, key=int)
            if not _missing(curve[k]):
                pts.append((m, size, k))
    if not pts:
        why = "only one iteration" if len(_iters(summary)) < 2 else "no iteration t >= 2 has a non-empty IS(t)"
        return f"{head}: cannot tell ({why})."
    outcomes, quoted = [], []
    for m, size, k in pts:
        v, ci = _val_ci(m, "improvement_set", "m1_pass@k", k)
        o = ("cannot tell" if not _ci_ok(ci) else "shown" if ci[0] >= NEAR_FULL else
             "not shown" if ci[1] < NEAR_FULL else "within noise")
        outcomes.append(o)
        quoted.append(f"{fmt_ci(v, ci)}% at k={k} (t={m['iter']}, |IS|={size}: {o})")
    return (f"{head}: {_combine(outcomes)}, M1's pass@k at the largest k is " + ", ".join(quoted)
            + f" against the threshold {fmt_pct(NEAR_FULL)}% (shown when the whole interval is above it).")


def _finding_diversity(summary: dict) -> str:
    head = "3. Diversity falls for correct and incorrect samples on every measure"
    its = _iters(summary)
    if len(its) < 2:
        return f"{head}: cannot tell (only one iteration)."
    first, last = its[0], its[-1]
    cmp = comparison(summary, last["iter"], "m1")
    if cmp is None:
        return f"{head}: cannot tell (no paired test of t={last['iter']} against M1 in the summary)."
    outcomes, parts = [], []
    for g in GROUPS:
        for key, label in MEASURES:
            leaf = _get(cmp, "diversity", g, key)
            o = _direction(leaf, -1)
            outcomes.append(o)
            v0, vl = _get(first, "diversity", g, key), _get(last, "diversity", g, key)
            if o == "cannot tell":
                reason = _get(last, "diversity", g, "semantic_unavailable") if key == "semantic" else None
                parts.append(f"{g} {label} not measured on both" + (f" ({reason})" if reason else ""))
            else:
                parts.append(f"{g} {label} {fmt_num(v0)} -> {fmt_num(vl)} ({fmt_change(leaf, pct=False)})")
    return (f"{head}: {_combine(outcomes)}, t={first['iter']} -> t={last['iter']}: " + "; ".join(parts) + ".")


def _finding_ood(summary: dict) -> str:
    head = "4. OOD accuracy falls and the easy-hard disparity widens"
    its = [m for m in _iters(summary) if not _missing(_get(m, "ood", "whole"))]
    if len(its) < 2:
        return f"{head}: cannot tell (OOD results are known for fewer than two iterations)."
    first, last = its[0], its[-1]
    cmp = comparison(summary, last["iter"], "m1")
    if cmp is None:
        return f"{head}: cannot tell (no paired test of t={last['iter']} against M1 in the summary)."
    acc, disp = _get(cmp, "ood", "whole"), _get(cmp, "ood", "disparity")
    outcomes = [_direction(acc, -1), _direction(disp, +1)]
    parts = [f"OOD accuracy {fmt_pct(_get(first, 'ood', 'whole'))}% -> {fmt_pct(_get(last, 'ood', 'whole'))}% "
             f"({fmt_change(acc)})"]
    if outcomes[1] == "cannot tell":
        parts.append("the level disparity cannot be tested (undefined, or too few questions per level)")
    else:
        parts.append(f"the level disparity {fmt_num(_get(first, 'ood', 'disparity'), 1)}% -> "
                     f"{fmt_num(_get(last, 'ood', 'disparity'), 1)}% ({fmt_change(disp, pct=False, digits=1)})")
    return f"{head}: {_combine(outcomes)}, t={first['iter']} -> t={last['iter']}: " + "; ".join(parts) + "."


def findings(summary: dict) -> list[str]:
    """One sentence per paper phenomenon, with the numbers and the significance verdict behind it."""
    return [_finding_pass1(summary), _finding_is(summary), _finding_diversity(summary), _finding_ood(summary)]


# ------------------------------------------------------------------------------- audit sections


def second_verifier_section(summary: dict) -> list[str]:
    """Lines of the second-verifier section: math-verify's disagreement with our verdicts per iteration."""
    entries = sorted(_by_iter(summary, "second_verifier").values(), key=lambda e: e["iter"])
    task = summary.get("task")
    if not entries:
        if task in MATH_TASKS:
            return ["The second verifier was not run for this run (math-verify is optional: "
                    "`pip install math-verify`)."]
        return [f"Not applicable: the second verifier (math-verify) checks math answers, and the task is {task}."]
    missing = [e for e in entries if not e.get("installed")]
    if missing:
        return [f"math-verify is not installed, so no second opinion was taken ({missing[0].get('reason', '')})."]
    ood = any(isinstance(e.get("ood"), dict) for e in entries)
    header = ["t", "completions", "disagreements", "rate (%)", "only ours says correct",
              "only math-verify says correct"] + (["OOD rate (%)"] if ood else [])

    def ood_cell(e: dict) -> list[str]:
        if not ood:
            return []
        rate = _get(e, "ood", "rate")
        return ["n/a" if _missing(rate) else f"{fmt_pct(rate)} (of {_int(_get(e, 'ood', 'n'))})"]

    rows = [[_t(e), _int(e.get("n")), _int(e.get("disagree")), fmt_pct(e.get("rate")), _int(e.get("ours_only")),
             _int(e.get("theirs_only"))] + ood_cell(e) for e in entries]
    out = [f"math-verify {entries[0].get('version') or ''} re-scored the same completions; a disagreement means one "
           "of the two verifiers misreads an answer, and every accuracy above rests on ours.", "",
           _table(header, rows)]
    examples = [(e["iter"], x) for e in entries
                for x in (e.get("examples") or []) + (_get(e, "ood", "examples") or [])][:6]
    if examples:
        out += ["", "Examples:"]
        for t, x in examples:
            text = " ".join(str(x.get("text", "")).split())[-160:].replace("|", "/")
            out.append(f"- t={t}, {x.get('id', x.get('index'))}: gold {x.get('gold')!s}; ours read "
                       f"{x.get('ours_answer')!s} ({'right' if x.get('ours') else 'wrong'}), math-verify read "
                       f"{x.get('theirs_answer')!s} ({'right' if x.get('theirs') else 'wrong'}); text ends "
                       f"\"...{text}\"")
    return out


def _short(h: Any) -> str:
    return h[:12] if isinstance(h, str) else "—"


_ENV_KEYS = ("git", "packages", "python", "platform", "device")


def _kv(d: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) if isinstance(d, dict) and d else "—"


def provenance_section(summary: dict) -> list[str]:
    """Lines of the provenance block: what produced each model, and the environment."""
    recs = sorted(_by_iter(summary, "provenance").values(), key=lambda r: r["iter"])
    if not recs:
        return ["No provenance was recorded for this run."]
    keys = [(k, label) for k, label in FILE_KEYS if any(_get(r, "files", k) for r in recs)]
    keys += sorted({(k, k) for r in recs for k in (r.get("files") or {}) if k not in dict(FILE_KEYS)})
    rows = [[_t(r)] + [_short(_get(r, "files", k, "sha256")) for k, _ in keys]
            + [_kv(r.get("seeds")), _kv(r.get("sampling"))] for r in recs]
    out = ["sha256 (first 12 hex digits) of what each model came from; the full hashes are in summary.json. "
           "A rerun can be checked against them with `provenance.check_provenance(recorded, current)`.", "",
           _table(["t"] + [label for _, label in keys] + ["seeds", "sampling"], rows), ""]
    r0 = recs[0]
    git = r0.get("git")
    out.append("- Code: " + ("not a git checkout" if not git else
                             f"git {git.get('commit')}" + (" (with uncommitted changes)" if git.get("dirty") else "")))
    v = r0.get("verifier")
    if isinstance(v, dict):
        out.append(f"- Verifier: task {v.get('task')}, code sha256 {_short(v.get('code_sha256'))}"
                   + (f", math-verify {v['math-verify']}" if v.get("math-verify") else ""))
    pk = r0.get("packages") or {}
    out.append("- Packages: " + (", ".join(f"{k} {pv}" for k, pv in pk.items() if pv) or "—"))
    out.append(f"- Python {r0.get('python', '?')} on {r0.get('platform', '?')}; device: {r0.get('device', '?')}")
    for r in recs[1:]:
        diff = [k for k in _ENV_KEYS if r.get(k) != r0.get(k)]
        if diff:
            out.append(f"- t={r['iter']} ran in another environment ({', '.join(diff)} differ): "
                       + "; ".join(f"{k}: {r.get(k)}" for k in diff))
    return out


# --------------------------------------------------------------------------------------------- plots


def _xticks(ax, ms: list[dict]) -> None:
    ax.set_xticks([m.get("iter") for m in ms], [f"{_t(m)}\n{_method(m)}" for m in ms])
    ax.set_xlabel("iteration t (step method)")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _series(ms: list[dict], *keys: str) -> list[tuple[int, float]]:
    return [(m.get("iter"), v) for m in ms if not _missing(v := _get(m, *keys))]


def _line(ax, ms: list[dict], keys: tuple[str, ...], scale: float, style: str, bars: bool = True, dx: float = 0.0,
          **kw) -> None:
    """One series, with its 95% intervals as error bars where the metrics carry them (and `bars`); `dx` shifts it
    sideways so that the error bars of several runs at one t do not hide each other."""
    pts = [(m.get("iter"), v, _get(m, "ci", *keys)) for m in ms if not _missing(v := _get(m, *keys))]
    if not pts:
        return
    x = [p[0] + dx for p in pts]
    y = [scale * p[1] for p in pts]
    if bars and all(_ci_ok(p[2]) for p in pts):
        err = [[scale * (p[1] - p[2][0]) for p in pts], [scale * (p[2][1] - p[1]) for p in pts]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, **kw)
    else:
        ax.plot(x, y, style, **kw)


def _has_data(ax) -> bool:
    return bool(ax.lines or ax.containers or ax.patches)


def plot_pass_at_k(summary: dict, path: Path) -> None:
    ms = _rows(summary)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _line(ax, ms, ("pass@1",), 100, "k-o", lw=2.5, label="pass@1 (greedy), 95% CI")
    for k in _ks([m.get("pass@k") for m in ms]):
        _line(ax, ms, ("pass@k", k), 100, "--.", bars=False, label=f"pass@{k} (sampled)")
    if not _has_data(ax):
        _empty(ax, "no pass@k results")
    else:
        _xticks(ax, ms)
        ax.set_ylabel("accuracy on the test split (%)")
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    ax.set_title(f"pass@1 and pass@k by iteration ({summary.get('task', '?')}, {summary.get('method', '?')})")
    fig.savefig(path, dpi=110)


def plot_improvement_set(summary: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for m in _iters(summary):
        curve = _get(m, "improvement_set", "m1_pass@k") or {}
        if m.get("iter", 1) >= 2 and curve:
            ks = sorted(curve, key=int)
            ax.plot([int(k) for k in ks], [100 * curve[k] for k in ks], "-o",
                    label=f"t={_t(m)} ({_method(m)}), |IS|={_get(m, 'improvement_set', 'size')}")
    if not ax.lines:
        _empty(ax, "no non-empty improvement set IS(t) for t >= 2")
    else:
        ax.set_xscale("log", base=2)
        ks = sorted({int(x) for line in ax.lines for x in line.get_xdata()})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("k (samples of M1)")
        ax.set_ylabel("M1's pass@k on IS(t) (%)")
        ax.axhline(100, color="gray", lw=0.8, ls=":")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    ax.set_title("Was the improvement already in M1's samples? M1's pass@k on IS(t)")
    fig.savefig(path, dpi=110)


def plot_transitions(summary: dict, path: Path) -> None:
    """Questions gained (up) and lost (down) per iteration, against M_{t-1} and against M1."""
    tr = _by_iter(summary, "transitions")
    ms = [m for m in _rows(summary) if m.get("iter") in tr]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    for ax, key, title in zip(fig.subplots(1, 2), ("vs_prev", "vs_m1"), ("against M_{t-1}", "against M1")):
        pts = [(m["iter"], len(e["gained"]), len(e["lost"])) for m in ms
               if isinstance(e := tr[m["iter"]].get(key), dict)]
        if pts:
            x = [p[0] for p in pts]
            ax.bar(x, [p[1] for p in pts], color="tab:green", label="gained")
            ax.bar(x, [-p[2] for p in pts], color="tab:red", label="lost")
            ax.plot(x, [p[1] - p[2] for p in pts], "k_", ms=20, mew=2, label="net")
            ax.axhline(0, color="gray", lw=0.8)
            _xticks(ax, ms)
            ax.set_ylabel("test questions (greedy)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        else:
            _empty(ax, f"no transitions {title}")
        ax.set_title(f"Questions gained and lost {title}")
    fig.savefig(path, dpi=110)


def plot_diversity(summary: dict, path: Path) -> None:
    ms = _rows(summary)
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, label) in zip(axes, MEASURES):
        for g, style in zip(GROUPS, ["-o", "--s"]):
            _line(ax, ms, ("diversity", g, key), 1, style, label=f"{g} samples")
        if not _has_data(ax):
            reasons = {_get(m, "diversity", g, "semantic_unavailable") for m in ms for g in GROUPS} - {None}
            _empty(ax, f"{label}: unavailable" + (f"\n{sorted(reasons)[0][:80]}" if reasons else ""))
        else:
            _xticks(ax, ms)
            ax.set_ylabel(f"{label} diversity")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        ax.set_title({"distinct_n": "Distinct-N (n = 1..5)", "semantic": "semantic: 1 - mean cosine (MiniLM)",
                      "equations": "distinct equation sequences"}[key])
    fig.suptitle("Output diversity by iteration (per question, averaged; 95% CI)")
    fig.savefig(path, dpi=110)


def plot_ood(summary: dict, path: Path) -> None:
    ms = _rows(summary)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for lv in _ks([_get(m, "ood", "levels") for m in ms]):
        s = _series(ms, "ood", "levels", lv)
        ax.plot(*zip(*[(t, 100 * v) for t, v in s]), "-o", label=f"level {lv}")
    _line(ax, ms, ("ood", "whole"), 100, "k-", lw=2.5, label="whole, 95% CI")
    if not _has_data(ax):
        _empty(ax, "no OOD results")
    else:
        _xticks(ax, ms)
        ax.set_ylabel("OOD pass@1 (%)")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax.grid(alpha=0.3)
    ax.set_title("OOD accuracy by difficulty level")
    _line(ax2, ms, ("ood", "disparity"), 1, "r-o", label="(acc L1 - acc L5) / acc L1")
    if _has_data(ax2):
        _xticks(ax2, ms)
        ax2.set_ylabel("group disparity (%)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    else:
        _empty(ax2, "group disparity undefined (n/a)")
    ax2.set_title("Easy vs hard group disparity")
    fig.savefig(path, dpi=110)


PLOTS = {"pass_at_k.png": plot_pass_at_k, "improvement_set.png": plot_improvement_set,
         "transitions.png": plot_transitions, "diversity.png": plot_diversity, "ood.png": plot_ood}

# -------------------------------------------------------------------------------------------- report


def _facts(summary: dict) -> list[str]:
    ms = _rows(summary)
    steps = ", ".join(f"t={_t(m)} {_method(m)}" for m in ms) or "none"
    lines = [f"- Task: {summary.get('task', 'n/a')}; method: {summary.get('method', 'n/a')}; "
             f"iterations: {len(_iters(summary))} ({steps})"]
    cfg = summary.get("config") or {}
    keys = ["model", "n_samples", "temperature", "top_p", "beta", "ref", "schedule", "lr", "epochs", "seed"]
    shown = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    if shown:
        lines.append("- Config: " + ", ".join(shown))
    ood_split = _get(summary, "config", "ood_split") or summary.get("ood_split")
    if ood_split:
        lines.append(f"- OOD split: {ood_split}")
    ci = next((m["ci"] for m in ms if isinstance(m.get("ci"), dict)), None)
    if ci:
        lines.append(f"- Uncertainty: {100 * ci.get('level', 0.95):.0f}% intervals in brackets ("
                     f"{ci.get('method', 'bootstrap')}, {ci.get('n_boot')} resamples, seed {ci.get('seed')}); "
                     f"paired tests at alpha = {ALPHA} (McNemar for greedy pass@1, paired bootstrap otherwise)")
    else:
        lines.append("- Uncertainty: no intervals in this summary (point estimates only)")
    return lines


def render_report(run_dir: Path, summary: dict) -> str:
    """report.md's text (write_report writes it and the plots)."""
    ms = _rows(summary)
    cov = _coverage(summary)
    sem_notes = sorted({f"{g}: {r}" for m in ms for g in GROUPS
                        if (r := _get(m, "diversity", g, "semantic_unavailable"))})
    out = [f"# Self-improvement report: {Path(run_dir).name}", ""]
    out += _facts(summary)
    if not ms:
        out += ["", "No iteration has metrics yet, so there is nothing to report."]
        return "\n".join(out) + "\n"
    no_level = max((_get(m, "ood", "no_level") or 0 for m in ms), default=0)
    out += ["", "## Findings", ""]
    out += findings(summary)
    out += ["", "## Correct answer coverage of M1", "",
            f"Coverage: {fmt_num(cov)} (mean fraction of M1's samples per training question that are correct).",
            "", f"Recommendation: {recommend(cov)}", "",
            "## pass@1 and pass@k (test split, %)", "",
            "pass@1 (greedy) is greedy decoding; pass@k is the unbiased estimator from the sampled completions. "
            "t = 0 is the base model M0.", "",
            pass_at_k_table(summary), "",
            "## Changes and their significance (percentage points, paired over the same questions)", "",
            "Each cell: difference [95% interval], two-sided p-value, verdict; pass@1 is tested with McNemar's test, "
            "the others with the paired bootstrap.", "",
            changes_table(summary), "",
            "## Improvement set IS(t) and M1's pass@k on it (%)", "",
            "IS(t): test questions M_t answers correctly (greedy) and M1 does not.", "",
            improvement_set_table(summary), "",
            "## Questions gained and lost (greedy, test split)", "",
            "Gained against M1 is IS(t); the questions lost are the regression the improvement set does not show. "
            "The question ids are in summary.json under \"transitions\" and in each iter_t/transitions.json.", "",
            transitions_table(summary), "",
            "## Diversity (per question, averaged; correct and incorrect samples separately)", "",
            diversity_table(summary), ""]
    if sem_notes:
        out += ["Semantic (SBERT) diversity unavailable: " + "; ".join(sem_notes) + ".", ""]
    out += ["## OOD generalisation (pass@1 by difficulty level, %)", "",
            "Disparity = (acc[level 1] - acc[level 5]) / acc[level 1], in percent.", ""]
    if no_level:
        out += [f"{no_level} OOD question(s) have no level: they count in \"whole\" only.", ""]
    out += [ood_table(summary), "", "## Second verifier (math-verify)", ""]
    out += second_verifier_section(summary)
    out += ["", "## Provenance", ""]
    out += provenance_section(summary)
    out += ["", "## Plots", ""]
    out += [f"![{name[:-4]}](plots/{name})" for name in PLOTS]
    return "\n".join(out) + "\n"


def write_report(run_dir: Path | str, summary: dict) -> Path:
    """Write run_dir/report.md and run_dir/plots/<PLOTS>; returns report.md's path."""
    run_dir = Path(run_dir)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, plot in PLOTS.items():
        plot(summary, run_dir / "plots" / name)
    path = run_dir / "report.md"
    path.write_text(render_report(run_dir, summary))
    return path


# ------------------------------------------------------------------- several methods side by side


def _labels(summaries: list[dict], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(summaries):
            raise ValueError(f"render_compare: {len(names)} names for {len(summaries)} runs")
        return list(names)
    labels = [str(s.get("method") or "?") for s in summaries]
    return [f"{lab} ({i + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _shared_m1(summaries: list[dict]) -> str:
    hashes = [_get(_by_iter(s, "provenance").get(1), "files", "model", "sha256") for s in summaries]
    if all(hashes) and len(set(hashes)) == 1:
        return f"All runs start from the same M1 (weights sha256 {_short(hashes[0])})."
    if all(hashes):
        return "Warning: the runs do not share M1 (their iteration-1 weights differ), so the methods are not " \
               "compared from one starting point."
    return "Whether the runs share M1 is not recorded (no provenance of iteration 1 in every run)."


def _compare_table(summaries: list[dict], labels: list[str], path: tuple[str, ...], *, pct: bool = True,
                   digits: int = 3) -> str:
    ts = sorted({m.get("iter") for s in summaries for m in _rows(s)})
    rows = []
    for t in ts:
        row = [str(t)]
        for s in summaries:
            m = next((m for m in _rows(s) if m.get("iter") == t), None)
            row.append("n/a" if m is None else fmt_ci(*_val_ci(m, *path), pct=pct, digits=digits))
        rows.append(row)
    return _table(["t"] + labels, rows)


def _compare_plot(summaries: list[dict], labels: list[str], panels: list[tuple[str, tuple[str, ...], float]],
                  title: str, path: Path) -> None:
    fig = Figure(figsize=(5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, keys, scale) in zip(axes, panels):
        for i, (s, lab) in enumerate(zip(summaries, labels)):
            _line(ax, _rows(s), keys, scale, "-o", dx=0.06 * (i - (len(summaries) - 1) / 2), label=lab)
        if _has_data(ax):
            ts = sorted({m.get("iter") for s in summaries for m in _rows(s)})
            ax.set_xticks(ts, [str(t) for t in ts])
            ax.set_xlabel("iteration t")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            _empty(ax, f"no {name}")
        ax.set_title(name)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


def render_compare(summaries: list[dict], out_dir: Path | str, *, names: list[str] | None = None) -> Path:
    """One report of several runs side by side (e.g. SFT, DPO and SFT-DPO from one M1): out_dir/report.md and
    out_dir/plots/compare_*.png, one column or line per run; then each run's findings. Returns report.md's path.
    `names` labels the runs (default: their methods)."""
    if not summaries:
        raise ValueError("render_compare needs at least one run summary")
    tasks = {s.get("task") for s in summaries}
    if len(tasks) > 1:
        raise ValueError(f"render_compare: the runs are on different tasks ({', '.join(map(str, sorted(tasks)))})")
    labels = _labels(summaries, names)
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    ks = _ks([m.get("pass@k") for s in summaries for m in _rows(s)])
    kmax = ks[-1] if ks else None
    plots = {
        "compare_accuracy.png": ([("pass@1 (greedy, %)", ("pass@1",), 100)]
                                 + ([(f"pass@{kmax} (%)", ("pass@k", kmax), 100)] if kmax else [])
                                 + [("OOD whole (%)", ("ood", "whole"), 100),
                                    ("OOD disparity (%)", ("ood", "disparity"), 1)], "Accuracy by iteration"),
        "compare_diversity.png": ([(f"{g} {label}", ("diversity", g, key), 1) for g in GROUPS
                                   for key, label in MEASURES], "Diversity by iteration"),
    }
    for name, (panels, title) in plots.items():
        _compare_plot(summaries, labels, panels, title, out_dir / "plots" / name)
    cov = next((c for s in summaries if (c := _coverage(s)) is not None), None)
    out = [f"# Self-improvement methods side by side: {', '.join(labels)}", "",
           f"- Task: {tasks.pop()}; runs: " + ", ".join(f"{lab} ({len(_iters(s))} iterations)"
                                                       for lab, s in zip(labels, summaries)),
           f"- {_shared_m1(summaries)}",
           f"- Coverage of M1: {fmt_num(cov)}. {recommend(cov)}",
           "- Steps: " + "; ".join(f"{lab}: " + ", ".join(f"t={_t(m)} {_method(m)}" for m in _iters(s))
                                   for lab, s in zip(labels, summaries)),
           "- Each cell: value [95% interval].", ""]
    sections = [("pass@1 (greedy, %)", ("pass@1",), True)]
    if kmax:
        sections.append((f"pass@{kmax} (%)", ("pass@k", kmax), True))
    sections += [(f"Diversity: {g} {label}", ("diversity", g, key), False) for g in GROUPS for key, label in MEASURES]
    sections += [("OOD accuracy, whole (%)", ("ood", "whole"), True),
                 ("OOD disparity (%)", ("ood", "disparity"), False)]
    for title, path, pct in sections:
        out += [f"## {title}", "", _compare_table(summaries, labels, path, pct=pct,
                                                  digits=1 if path[-1] == "disparity" else 3), ""]
    out += ["## Findings per method", ""]
    for lab, s in zip(labels, summaries):
        out += [f"### {lab}", ""] + findings(s) + [""]
    out += ["## Plots", ""] + [f"![{name[:-4]}](plots/{name})" for name in plots]
    path = out_dir / "report.md"
    path.write_text("\n".join(out) + "\n")
    return path
