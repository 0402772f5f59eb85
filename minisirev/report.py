"""The report of a run: report.md (tables and findings) and plots/*.png, from summary.json's dict.

    summary = {"task": str, "method": str, "iterations": [metrics.json dict of t = 1..T], "config": {...}}

Each metrics dict has the keys of DESIGN.md (see metrics.iteration_metrics). Accuracies are fractions in
the JSON and percent in the report; a missing or undefined value is printed as "n/a", never guessed.

The findings test the paper's four phenomena (PAPER.md, "What the paper found") on the run's numbers,
one sentence each, with the verdict "shown", "partly shown", "not shown" or "cannot tell (why)":
  1. pass@1 rises, then plateaus or dips: the peak beats t = 1, and it comes before the last iteration
     or the last iteration adds at most PLATEAU_POINTS percentage points;
  2. M1's pass@k on IS(t) approaches 100%: at the largest k it is at least NEAR_FULL for every t >= 2
     with a non-empty IS(t);
  3. diversity falls, for correct and incorrect samples, on each measure: last iteration below the first;
  4. OOD accuracy falls and the level-1 vs level-5 disparity widens: last iteration against the first.
Plots use matplotlib's object API (Figure + Agg canvas), so no global backend is switched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from minisirev.metrics import recommend

PLATEAU_POINTS = 1.0  # pass@1 gain (percentage points) in the last iteration that still counts as a plateau
NEAR_FULL = 0.9  # M1's pass@k on IS(t) at the largest k that counts as "approaching 100%"

MEASURES = [("distinct_n", "Distinct-N"), ("semantic", "SBERT"), ("equations", "equations")]
GROUPS = ["correct", "incorrect"]

# ------------------------------------------------------------------------------------------- helpers


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_pct(x: float | None) -> str:
    """A fraction as percent with two decimals ("48.52"), or "n/a"."""
    return "n/a" if _missing(x) else f"{100 * x:.2f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    """A plain number ("0.627"), or "n/a"."""
    return "n/a" if _missing(x) else f"{x:.{digits}f}"


def _int(x: int | None) -> str:
    return "n/a" if x is None else str(x)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _ks(dicts: list[dict | None]) -> list[str]:
    """The union of the dicts' k keys, in numeric order."""
    return sorted({k for d in dicts if isinstance(d, dict) for k in d}, key=int)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _iters(summary: dict) -> list[dict]:
    return sorted(summary.get("iterations", []), key=lambda m: m.get("iter", 0))


def _t(m: dict) -> str:
    return str(m.get("iter", "?"))


def _method(m: dict) -> str:
    return str(m.get("step_method") or "n/a")


def _coverage(summary: dict) -> float | None:
    for m in _iters(summary):
        if not _missing(m.get("coverage")):
            return m["coverage"]
    return None


# -------------------------------------------------------------------------------------------- tables


def pass_at_k_table(summary: dict) -> str:
    its = _iters(summary)
    ks = _ks([m.get("pass@k") for m in its])
    rows = [[_t(m), _method(m), fmt_pct(m.get("pass@1"))] + [fmt_pct(_get(m, "pass@k", k)) for k in ks]
            for m in its]
    return _table(["t", "step", "pass@1 (greedy)"] + [f"pass@{k}" for k in ks], rows)


def improvement_set_table(summary: dict) -> str:
    its = _iters(summary)
    ks = _ks([_get(m, "improvement_set", "m1_pass@k") for m in its])
    rows = [[_t(m), _method(m), _int(_get(m, "improvement_set", "size"))]
            + [fmt_pct(_get(m, "improvement_set", "m1_pass@k", k)) for k in ks] for m in its]
    return _table(["t", "step", "size of IS(t)"] + [f"M1 pass@{k}" for k in ks], rows)


def diversity_table(summary: dict) -> str:
    header = ["t", "step"] + [f"{g} {label}" for g in GROUPS for _, label in MEASURES] + \
             [f"{g} questions (used/skipped)" for g in GROUPS]
    rows = []
    for m in _iters(summary):
        row = [_t(m), _method(m)]
        row += [fmt_num(_get(m, "diversity", g, key)) for g in GROUPS for key, _ in MEASURES]
        for g in GROUPS:
            used, skipped = _get(m, "diversity", g, "questions"), _get(m, "diversity", g, "skipped")
            row.append("n/a" if used is None else f"{used}/{skipped}")
        rows.append(row)
    return _table(header, rows)


def ood_table(summary: dict) -> str:
    its = _iters(summary)
    levels = _ks([_get(m, "ood", "levels") for m in its])
    rows = [[_t(m), _method(m)] + [fmt_pct(_get(m, "ood", "levels", lv)) for lv in levels]
            + [fmt_pct(_get(m, "ood", "whole")), fmt_num(_get(m, "ood", "disparity"), 2)] for m in its]
    return _table(["t", "step"] + [f"level {lv}" for lv in levels] + ["whole", "disparity (%)"], rows)


def format_table(summary: dict) -> str:
    """A compact per-iteration console table (for train.py's final print)."""
    its = _iters(summary)
    ks = _ks([m.get("pass@k") for m in its])
    kmax = ks[-1] if ks else None
    header = ["iter", "method", "pass@1", f"pass@{kmax or 'k'}", "coverage", "|IS|", "dist-n(c)", "OOD", "disp%"]
    rows = []
    for m in its:
        rows.append([_t(m), _method(m), fmt_pct(m.get("pass@1")),
                     fmt_pct(_get(m, "pass@k", kmax)) if kmax else "n/a", fmt_num(m.get("coverage")),
                     _int(_get(m, "improvement_set", "size")), fmt_num(_get(m, "diversity", "correct", "distinct_n")),
                     fmt_pct(_get(m, "ood", "whole")), fmt_num(_get(m, "ood", "disparity"), 1)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header] + rows)


# ------------------------------------------------------------------------------------------ findings


def _series(its: list[dict], *keys: str) -> list[tuple[int, float]]:
    return [(m.get("iter"), v) for m in its if not _missing(v := _get(m, *keys))]


def _finding_pass1(its: list[dict]) -> str:
    head = "1. pass@1 rises, then plateaus or dips"
    p = _series(its, "pass@1")
    if len(p) < 2:
        return f"{head}: cannot tell (pass@1 is known for {len(p)} iteration(s), at least two are needed)."
    (t0, v0), (tl, vl) = p[0], p[-1]
    tb, vb = max(p, key=lambda x: x[1])
    if vb <= v0:
        return (f"{head}: not shown, pass@1 never rose above M1's {fmt_pct(v0)}% (t={t0}) "
                f"and ended at {fmt_pct(vl)}% (t={tl}).")
    if len(p) < 3:
        return (f"{head}: cannot tell (pass@1 rose from {fmt_pct(v0)}% to {fmt_pct(vl)}%, "
                "but two iterations cannot show a plateau or dip).")
    last_gain = 100 * (p[-1][1] - p[-2][1])
    if tb != tl or last_gain <= PLATEAU_POINTS:
        how = "dipped" if vl < vb else "levelled off"
        return (f"{head}: shown, pass@1 rose from {fmt_pct(v0)}% (t={t0}) to a peak of {fmt_pct(vb)}% (t={tb}) "
                f"and then {how}, ending at {fmt_pct(vl)}% (t={tl}; last change {last_gain:+.2f} points).")
    return (f"{head}: not shown, pass@1 rose from {fmt_pct(v0)}% (t={t0}) to {fmt_pct(vl)}% (t={tl}) and was still "
            f"rising at the end ({last_gain:+.2f} points in the last iteration, more than {PLATEAU_POINTS:g}).")


def _finding_is(its: list[dict]) -> str:
    head = "2. M1's pass@k on the improvement set IS(t) approaches 100% for large k"
    pts = []
    for m in its:
        curve = _get(m, "improvement_set", "m1_pass@k") or {}
        size = _get(m, "improvement_set", "size") or 0
        if m.get("iter", 1) >= 2 and size > 0 and curve:
            k = max(curve, key=int)
            if not _missing(curve[k]):
                pts.append((m["iter"], size, k, curve[k]))
    if not pts:
        why = "only one iteration" if len(its) < 2 else "no iteration t >= 2 has a non-empty IS(t)"
        return f"{head}: cannot tell ({why})."
    quoted = ", ".join(f"{fmt_pct(v)}% at k={k} (t={t}, |IS|={s})" for t, s, k, v in pts)
    high = [v >= NEAR_FULL for _, _, _, v in pts]
    verdict = "shown" if all(high) else "not shown" if not any(high) else "partly shown"
    return (f"{head}: {verdict}, M1's pass@k at the largest k is {quoted} "
            f"(threshold {fmt_pct(NEAR_FULL)}%), so the improved questions were "
            f"{'already' if all(high) else 'not all'} inside M1's sample space.")


def _finding_diversity(its: list[dict]) -> str:
    head = "3. Diversity falls for correct and incorrect samples on every measure"
    fell, rose, missing = [], [], []
    for g in GROUPS:
        for key, label in MEASURES:
            s = _series(its, "diversity", g, key)
            name = f"{g} {label}"
            if len(s) < 2:
                reasons = {_get(m, "diversity", g, "semantic_unavailable") for m in its} - {None}
                missing.append(f"{name}" + (f" ({sorted(reasons)[0]})" if key == "semantic" and reasons else ""))
                continue
            (t0, v0), (tl, vl) = s[0], s[-1]
            (fell if vl < v0 else rose).append(f"{name} {fmt_num(v0)} (t={t0}) -> {fmt_num(vl)} (t={tl})")
    if not fell and not rose:
        why = "only one iteration" if len(its) < 2 else f"no measure is known for two iterations: {'; '.join(missing)}"
        return f"{head}: cannot tell ({why})."
    verdict = "shown" if not rose else "not shown" if not fell else "partly shown"
    if verdict == "shown" and missing:
        verdict = f"shown on the {len(fell)} of {len(fell) + len(missing)} measures available"
    parts = []
    if fell:
        parts.append("falls on " + ", ".join(fell))
    if rose:
        parts.append("does not fall on " + ", ".join(rose))
    if missing:
        parts.append("not measured for two iterations: " + ", ".join(missing))
    return f"{head}: {verdict}, it " + "; ".join(parts) + "."


def _finding_ood(its: list[dict]) -> str:
    head = "4. OOD accuracy falls and the easy-hard disparity widens"
    acc, disp = _series(its, "ood", "whole"), _series(its, "ood", "disparity")
    if len(acc) < 2 and len(disp) < 2:
        return f"{head}: cannot tell (OOD results are known for fewer than two iterations)."
    parts, hits, checks = [], 0, 0
    if len(acc) >= 2:
        (t0, a0), (tl, al) = acc[0], acc[-1]
        checks += 1
        hits += al < a0
        parts.append(f"OOD accuracy went from {fmt_pct(a0)}% (t={t0}) to {fmt_pct(al)}% (t={tl})")
    if len(disp) >= 2:
        (t0, d0), (tl, dl) = disp[0], disp[-1]
        checks += 1
        hits += dl > d0
        parts.append(f"the level disparity from {fmt_num(d0, 2)}% to {fmt_num(dl, 2)}%")
    else:
        parts.append("the level disparity is undefined for most iterations (n/a)")
    verdict = "shown" if hits == checks == 2 else "not shown" if hits == 0 else "partly shown"
    if checks < 2 and hits:
        verdict = "partly shown (only one of the two checks could be made)"
    return f"{head}: {verdict}, " + " and ".join(parts) + "."


def findings(summary: dict) -> list[str]:
    """One sentence per paper phenomenon, computed from the summary's numbers."""
    its = _iters(summary)
    return [_finding_pass1(its), _finding_is(its), _finding_diversity(its), _finding_ood(its)]


# --------------------------------------------------------------------------------------------- plots


def _xticks(ax, its: list[dict]) -> None:
    ax.set_xticks([m.get("iter") for m in its], [f"{_t(m)}\n{_method(m)}" for m in its])
    ax.set_xlabel("iteration t (step method)")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_pass_at_k(summary: dict, path: Path) -> None:
    its = _iters(summary)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    s = _series(its, "pass@1")
    if s:
        ax.plot(*zip(*[(t, 100 * v) for t, v in s]), "k-o", lw=2.5, label="pass@1 (greedy)")
    for k in _ks([m.get("pass@k") for m in its]):
        sk = _series(its, "pass@k", k)
        ax.plot(*zip(*[(t, 100 * v) for t, v in sk]), "--.", label=f"pass@{k} (sampled)")
    if not s and not ax.lines:
        _empty(ax, "no pass@k results")
    else:
        _xticks(ax, its)
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


def plot_diversity(summary: dict, path: Path) -> None:
    its = _iters(summary)
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (key, label) in zip(axes, MEASURES):
        for g, style in zip(GROUPS, ["-o", "--s"]):
            s = _series(its, "diversity", g, key)
            if s:
                ax.plot(*zip(*s), style, label=f"{g} samples")
        if not ax.lines:
            reasons = {_get(m, "diversity", g, "semantic_unavailable") for m in its for g in GROUPS} - {None}
            _empty(ax, f"{label}: unavailable" + (f"\n{sorted(reasons)[0][:80]}" if reasons else ""))
        else:
            _xticks(ax, its)
            ax.set_ylabel(f"{label} diversity")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        ax.set_title({"distinct_n": "Distinct-N (n = 1..5)", "semantic": "semantic: 1 - mean cosine (MiniLM)",
                      "equations": "distinct equation sequences"}[key])
    fig.suptitle("Output diversity by iteration (per question, averaged)")
    fig.savefig(path, dpi=110)


def plot_ood(summary: dict, path: Path) -> None:
    its = _iters(summary)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    for lv in _ks([_get(m, "ood", "levels") for m in its]):
        s = _series(its, "ood", "levels", lv)
        ax.plot(*zip(*[(t, 100 * v) for t, v in s]), "-o", label=f"level {lv}")
    s = _series(its, "ood", "whole")
    if s:
        ax.plot(*zip(*[(t, 100 * v) for t, v in s]), "k-", lw=2.5, label="whole")
    if not ax.lines:
        _empty(ax, "no OOD results")
    else:
        _xticks(ax, its)
        ax.set_ylabel("OOD pass@1 (%)")
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        ax.grid(alpha=0.3)
    ax.set_title("OOD accuracy by difficulty level")
    d = _series(its, "ood", "disparity")
    if d:
        ax2.plot(*zip(*d), "r-o", label="(acc L1 - acc L5) / acc L1")
        _xticks(ax2, its)
        ax2.set_ylabel("group disparity (%)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    else:
        _empty(ax2, "group disparity undefined (n/a)")
    ax2.set_title("Easy vs hard group disparity")
    fig.savefig(path, dpi=110)


PLOTS = {"pass_at_k.png": plot_pass_at_k, "improvement_set.png": plot_improvement_set,
         "diversity.png": plot_diversity, "ood.png": plot_ood}

# -------------------------------------------------------------------------------------------- report


def _facts(run_dir: Path, summary: dict) -> list[str]:
    its = _iters(summary)
    steps = ", ".join(f"t={_t(m)} {_method(m)}" for m in its) or "none"
    lines = [f"- Task: {summary.get('task', 'n/a')}; method: {summary.get('method', 'n/a')}; "
             f"iterations: {len(its)} ({steps})"]
    cfg = summary.get("config") or {}
    keys = ["model", "n_samples", "temperature", "top_p", "beta", "ref", "schedule", "lr", "epochs", "seed"]
    shown = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    if shown:
        lines.append("- Config: " + ", ".join(shown))
    ood_split = _get(summary, "config", "ood_split") or summary.get("ood_split")
    if ood_split:
        lines.append(f"- OOD split: {ood_split}")
    return lines


def render_report(run_dir: Path, summary: dict) -> str:
    """report.md's text (write_report writes it and the plots)."""
    its = _iters(summary)
    cov = _coverage(summary)
    sem_notes = sorted({f"{g}: {r}" for m in its for g in GROUPS
                        if (r := _get(m, "diversity", g, "semantic_unavailable"))})
    out = [f"# Self-improvement report: {Path(run_dir).name}", ""]
    out += _facts(run_dir, summary)
    if not its:
        out += ["", "No iteration has metrics yet, so there is nothing to report."]
        return "\n".join(out) + "\n"
    out += ["", "## Correct answer coverage of M1", "",
            f"Coverage: {fmt_num(cov)} (mean fraction of M1's samples per training question that are correct).",
            "", f"Recommendation: {recommend(cov)}", "",
            "## pass@1 and pass@k (test split, %)", "",
            "pass@1 (greedy) is greedy decoding; pass@k is the unbiased estimator from the sampled completions.", "",
            pass_at_k_table(summary), "",
            "## Improvement set IS(t) and M1's pass@k on it (%)", "",
            "IS(t): test questions M_t answers correctly (greedy) and M1 does not.", "",
            improvement_set_table(summary), "",
            "## Diversity (per question, averaged; correct and incorrect samples separately)", "",
            diversity_table(summary), ""]
    if sem_notes:
        out += ["Semantic (SBERT) diversity unavailable: " + "; ".join(sem_notes) + ".", ""]
    out += ["## OOD generalisation (pass@1 by difficulty level, %)", "",
            "Disparity = (acc[level 1] - acc[level 5]) / acc[level 1], in percent.", "",
            ood_table(summary), "",
            "## Findings", ""]
    out += findings(summary)
    out += ["", "## Plots", ""]
    out += [f"![{name[:-4]}](plots/{name})" for name in PLOTS]
    return "\n".join(out) + "\n"


def write_report(run_dir: Path | str, summary: dict) -> Path:
    """Write run_dir/report.md and run_dir/plots/{pass_at_k,improvement_set,diversity,ood}.png; returns report.md."""
    run_dir = Path(run_dir)
    (run_dir / "plots").mkdir(parents=True, exist_ok=True)
    for name, plot in PLOTS.items():
        plot(summary, run_dir / "plots" / name)
    path = run_dir / "report.md"
    path.write_text(render_report(run_dir, summary))
    return path


def summary_from_run(run_dir: Path | str) -> dict:
    """{"task", "method", "iterations", "config"} from run_dir/config.json and every iter_*/metrics.json."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    its = [json.loads(p.read_text()) for p in run_dir.glob("iter_*/metrics.json")]
    its.sort(key=lambda m: m.get("iter", 0))
    return {"task": cfg.get("task"), "method": cfg.get("method"), "iterations": its, "config": cfg}
