"""report.md and the plots from hand-built summaries: tables equal the summary's numbers, findings follow the tests."""

import copy
import json
import re

import numpy as np
import pytest

from minisirev import metrics, provenance
from minisirev.report import (
    PLOTS,
    findings,
    fmt_change,
    fmt_ci,
    fmt_num,
    fmt_p,
    fmt_pct,
    format_table,
    provenance_section,
    render_compare,
    render_report,
    second_verifier_section,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = re.compile(r"\bnan\b", re.IGNORECASE)  # a NaN printed anywhere (not "provenance")


def leaf(a, b, p, test="paired bootstrap"):
    d = None if a is None or b is None else b - a
    return {"a": a, "b": b, "diff": d, "ci": None if d is None else [d - 0.01, d + 0.01], "p": p, "test": test,
            "n": 100}


def with_ci(m: dict, half: float = 0.03) -> dict:
    """metrics dict m with "ci" = value +- half for every number (disparity +- 100 * half), mirroring its layout."""
    def band(v, h=half):
        return None if v is None else [v - h, v + h]

    m["ci"] = {"level": 0.95, "n_boot": 5000, "seed": 0, "method": "percentile bootstrap over questions",
               "pass@1": band(m["pass@1"]), "pass@k": {k: band(v) for k, v in m["pass@k"].items()},
               "improvement_set": {"m1_pass@k": {k: band(v) for k, v in m["improvement_set"]["m1_pass@k"].items()}},
               "diversity": {g: {k: band(d[k]) for k in ("distinct_n", "semantic", "equations")}
                             for g, d in m["diversity"].items()},
               "ood": {"whole": band(m["ood"]["whole"]), "levels": {k: band(v) for k, v in m["ood"]["levels"].items()},
                       "disparity": band(m["ood"]["disparity"], 100 * half)}}
    return m


def metrics_dict(t: int, p1: float) -> dict:
    return {
        "iter": t, "step_method": "base" if t == 0 else "sft" if t % 2 else "dpo", "pass@1": p1,
        "pass@k": {"1": 0.35 + 0.04 * t, "2": 0.5 + 0.03 * t, "4": 0.62 + 0.01 * t, "8": 0.7},
        "coverage": 0.627 if t == 1 else None,
        "improvement_set": ({"size": None if t == 0 else 0, "m1_pass@k": {}} if t <= 1 else
                            {"size": 30 * t, "m1_pass@k": {"2": 0.5, "4": 0.8, "8": 0.95 + 0.01 * t}}),
        "diversity": {
            "correct": {"distinct_n": 0.42 - 0.1 * t, "semantic": 0.7 - 0.1 * t, "equations": 0.6 - 0.1 * t,
                        "questions": 20, "skipped": 2, "semantic_questions": 20},
            "incorrect": {"distinct_n": 0.5 - 0.05 * t, "semantic": None, "equations": 0.55 - 0.01 * t,
                          "questions": 10, "skipped": 12,
                          "semantic_unavailable": "EncoderUnavailable: all-MiniLM-L6-v2 not found"},
        },
        "ood": {"levels": {"1": 0.8, "2": 0.6, "3": 0.4, "4": 0.2, "5": 0.1 - 0.02 * t},
                "whole": 0.45 - 0.02 * t, "disparity": (0.8 - (0.1 - 0.02 * t)) / 0.8 * 100, "no_level": 3},
    }


def comparison_dict(a: dict, b: dict, p: float) -> dict:
    """A compare_models-shaped dict of b against a where every change has p-value p."""
    return {"n_questions": 100, "alpha": 0.05,
            "pass@1": leaf(a["pass@1"], b["pass@1"], p, test="McNemar, exact binomial"),
            "pass@k": {k: leaf(a["pass@k"][k], b["pass@k"][k], p) for k in b["pass@k"]},
            "diversity": {g: {k: leaf(a["diversity"][g][k], b["diversity"][g][k], p)
                              for k in ("distinct_n", "semantic", "equations")} for g in ("correct", "incorrect")},
            "ood": {"whole": leaf(a["ood"]["whole"], b["ood"]["whole"], p),
                    "levels": {k: leaf(a["ood"]["levels"][k], b["ood"]["levels"][k], p) for k in b["ood"]["levels"]},
                    "disparity": leaf(a["ood"]["disparity"], b["ood"]["disparity"], p)}}


def mini_summary(T: int = 3, p: float = 0.001) -> dict:
    """M0 and T iterations with the paper's trends, every interval, paired tests at p-value p, transitions."""
    p1 = [0.30, 0.40, 0.48, 0.47, 0.46]
    base = with_ci(metrics_dict(0, p1[0]))
    its = [with_ci(metrics_dict(t, p1[t])) for t in range(1, T + 1)]
    ms = [base] + its
    comps = [{"iter": t, "vs_m0": comparison_dict(base, ms[t], p),
              "vs_m1": comparison_dict(ms[1], ms[t], p) if t >= 2 else None,
              "vs_prev": comparison_dict(ms[t - 1], ms[t], 0.6) if t >= 3 else None} for t in range(1, T + 1)]
    trans = [{"iter": 0, "vs_m1": None, "vs_prev": None}]
    trans += [{"iter": t, "vs_m1": None if t == 1 else {"gained": list(range(t)), "lost": ["x"] * (2 * t)},
               "vs_prev": {"gained": [f"g{i}" for i in range(5 + t)], "lost": [f"l{i}" for i in range(3)]}}
              for t in range(1, T + 1)]
    return {"task": "arith", "method": "sft-dpo", "base": base, "iterations": its, "comparisons": comps,
            "transitions": trans, "config": {"n_samples": 8, "temperature": 0.75}}


def tables(md: str) -> list[list[dict[str, str]]]:
    """Every markdown table of the report, in order, as rows of {header: cell}."""
    out, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            header, rows = block[0], block[2:]
            assert all(len(r) == len(header) for r in rows), "a cell holds a stray '|'"
            out.append([dict(zip(header, r)) for r in rows])
            block = []
    return out


def test_write_report_files_and_tables(tmp_path):
    summary = mini_summary()
    path = write_report(tmp_path, summary)
    assert path == tmp_path / "report.md" and path.is_file()
    for name in PLOTS:
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000, name
    md = path.read_text()
    assert not NAN.search(md)
    passk, changes, isets, trans, div, ood = tables(md)[:6]
    ms = [summary["base"]] + summary["iterations"]
    assert [r["t"] for r in passk] == ["0", "1", "2", "3"] and passk[0]["step"] == "base"  # M0 is the t = 0 row
    for m, r_p, r_i, r_t, r_d, r_o in zip(ms, passk, isets, trans, div, ood):
        for r in (r_p, r_i, r_t, r_d, r_o):
            assert r["t"] == str(m["iter"]) and r["step"] == m["step_method"]
        lo, hi = m["ci"]["pass@1"]
        assert r_p["pass@1 (greedy)"] == f"{100 * m['pass@1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
        for k, v in m["pass@k"].items():
            assert r_p[f"pass@{k}"] == fmt_ci(v, m["ci"]["pass@k"][k])
        assert r_i["size of IS(t)"] == ("n/a" if m["iter"] == 0 else str(m["improvement_set"]["size"]))
        for k in ["2", "4", "8"]:
            assert r_i[f"M1 pass@{k}"] == fmt_ci(m["improvement_set"]["m1_pass@k"].get(k),
                                                 m["ci"]["improvement_set"]["m1_pass@k"].get(k))
        for g in ["correct", "incorrect"]:
            d = m["diversity"][g]
            for key, label in [("distinct_n", "Distinct-N"), ("semantic", "SBERT"), ("equations", "equations")]:
                assert r_d[f"{g} {label}"] == fmt_ci(d[key], m["ci"]["diversity"][g][key], pct=False)
            assert r_d[f"{g} questions (used/skipped)"] == f"{d['questions']}/{d['skipped']}"
        for lv, v in m["ood"]["levels"].items():
            assert r_o[f"level {lv}"] == fmt_ci(v, m["ci"]["ood"]["levels"][lv])
        assert r_o["whole"] == fmt_ci(m["ood"]["whole"], m["ci"]["ood"]["whole"])
        assert r_o["disparity (%)"] == fmt_ci(m["ood"]["disparity"], m["ci"]["ood"]["disparity"], pct=False, digits=1)
    # transitions: counts of the id lists, n/a where there is no reference model
    assert trans[0]["gained vs M1"] == "n/a" and trans[1]["gained vs M1"] == "n/a"
    assert (trans[3]["gained vs M1"], trans[3]["lost vs M1"], trans[3]["net vs M1"]) == ("3", "6", "-3")
    assert (trans[2]["gained vs M_{t-1}"], trans[2]["lost vs M_{t-1}"], trans[2]["net vs M_{t-1}"]) == ("7", "3", "+4")
    # the changes table: t = 3 against M1 comes from comparisons, t = 1 has no comparison against itself
    assert changes[0]["pass@1 vs M1"] == "n/a"
    assert changes[2]["pass@1 vs M1"] == fmt_change(summary["comparisons"][2]["vs_m1"]["pass@1"], test=False)
    assert changes[2]["pass@1 vs M1"] == "+7.0 [+6.0, +8.0], p = 0.001, shown"
    assert changes[1]["pass@1 vs M_{t-1}"] == changes[1]["pass@1 vs M1"]  # the previous model of t = 2 is M1
    assert changes[2]["pass@1 vs M_{t-1}"].endswith("within noise")
    assert div[0]["incorrect SBERT"] == "n/a" and "all-MiniLM-L6-v2 not found" in md
    assert "favours iterative DPO or SFT-DPO" in md and "0.627" in md
    assert "3 OOD question(s) have no level" in md
    assert "Not applicable" not in md and "not run for this run" in md  # arith is a math task; nothing recorded
    assert "No provenance was recorded" in md


def test_findings_follow_the_tests():
    f = findings(mini_summary())
    assert len(f) == 4 and f[0].startswith("1.")
    assert ": shown," in f[0] and "48.0 [45.0, 51.0]%" in f[0]  # significant rise to t=2, no significant last step
    assert ": shown," in f[1] and "98.0 [95.0, 101.0]%" in f[1]  # every interval above 90%
    assert ": shown on the 5 of 6 checks available" in f[2] and "incorrect SBERT not measured" in f[2]
    assert ": shown," in f[3] and "95.0" in f[3]

    noisy = findings(mini_summary(p=0.3))  # the same point estimates, none of the changes significant
    assert ": within noise," in noisy[0] and ": within noise," in noisy[2] and ": within noise," in noisy[3]

    s = mini_summary()
    cmp3 = s["comparisons"][2]
    cmp3["vs_prev"]["pass@1"]["p"] = 0.001  # the last step is a significant change: a dip still shows the finding
    assert ": shown," in findings(s)[0]
    cmp3["vs_prev"]["pass@1"].update(diff=0.02)  # but a significant gain means pass@1 is still rising
    assert ": not shown (still rising)" in findings(s)[0]
    cmp3["vs_m1"]["diversity"]["correct"]["distinct_n"].update(diff=+0.05)  # a significant rise on one measure
    assert ": partly shown" in findings(s)[2]
    cmp3["vs_m1"]["ood"]["whole"].update(diff=+0.05)  # OOD accuracy rose significantly, disparity still widened
    assert ": partly shown" in findings(s)[3]

    s = mini_summary()
    s["iterations"][1]["ci"]["improvement_set"]["m1_pass@k"]["8"] = [0.6, 0.85]  # t=2 interval below 90%
    assert ": partly shown" in findings(s)[1] and "(t=2, |IS|=60: not shown)" in findings(s)[1]
    s["iterations"][2]["ci"]["improvement_set"]["m1_pass@k"]["8"] = [0.85, 0.99]  # straddles the threshold
    assert "(t=3, |IS|=90: within noise)" in findings(s)[1]

    s = mini_summary()
    del s["comparisons"]
    f = findings(s)
    assert all("cannot tell" in x for x in (f[0], f[2], f[3])) and ": shown," in f[1]  # f[1] needs intervals only


def test_degenerate_summaries_never_crash_or_invent_numbers(tmp_path):
    one = mini_summary(T=1)
    one["iterations"][0]["ood"] = {"levels": {}, "whole": None, "disparity": None}
    one["iterations"][0]["diversity"]["correct"]["semantic"] = None
    md = write_report(tmp_path / "one", one).read_text()
    assert not NAN.search(md)
    assert md.count("cannot tell") == 4
    empty = {"task": "arith", "method": "sft", "iterations": []}
    md = write_report(tmp_path / "empty", empty).read_text()
    assert "nothing to report" in md
    assert all((tmp_path / "empty" / "plots" / n).read_bytes().startswith(PNG_MAGIC) for n in PLOTS)
    bare = {"iterations": [{"iter": 1}, {"iter": 2, "ood": {"disparity": float("nan")}}]}  # keys missing, NaN
    md = render_report(tmp_path, bare)
    assert not NAN.search(md) and "point estimates only" in md
    assert "n/a" in format_table(bare)
    no_base = mini_summary()
    no_base["base"] = None  # a flag skipped M0: tables start at t = 1
    assert [r["t"] for r in tables(render_report(tmp_path, no_base))[0]] == ["1", "2", "3"]
    assert tables(render_report(tmp_path, no_base))[1][0]["pass@1 vs M0"] == "n/a"


def test_format_table():
    lines = format_table(mini_summary()).splitlines()
    assert len(lines) == 5 and lines[0].split()[:4] == ["iter", "method", "pass@1", "pass@8"]
    assert lines[1].split()[:6] == ["0", "base", "30.0", "70.0", "n/a", "n/a"]
    assert lines[2].split()[:5] == ["1", "sft", "40.0", "70.0", "0.627"]
    assert lines[3].split()[4:6] == ["n/a", "60"]


def test_second_verifier_section():
    s = mini_summary()
    s["second_verifier"] = [
        {"iter": 1, "installed": True, "version": "0.9.0", "task": "arith", "rate": 0.02, "n": 300, "disagree": 6,
         "ours_only": 1, "theirs_only": 5,
         "examples": [{"index": 4, "id": "arith-test-00004", "gold": "5", "ours": False, "ours_answer": "4",
                       "theirs": True, "theirs_answer": "5", "text": "#### 4\nso the total | is 5"}]},
        {"iter": 2, "installed": True, "version": "0.9.0", "task": "arith", "rate": 0.0, "n": 300, "disagree": 0,
         "ours_only": 0, "theirs_only": 0, "examples": [],
         "ood": {"rate": 0.1, "n": 500, "examples": [{"id": "ood-7", "gold": "9", "ours": True, "ours_answer": "9",
                                                     "theirs": False, "theirs_answer": "8", "text": "#### 9"}]}}]
    lines = second_verifier_section(s)
    md = "\n".join(lines)
    (rows,) = tables(md)
    assert rows[0] == {"t": "1", "completions": "300", "disagreements": "6", "rate (%)": "2.0",
                       "only ours says correct": "1", "only math-verify says correct": "5",
                       "OOD rate (%)": "n/a"}
    assert rows[1]["rate (%)"] == "0.0" and rows[1]["OOD rate (%)"] == "10.0 (of 500)"
    assert "t=2, ood-7: gold 9; ours read 9 (right), math-verify read 8 (wrong)" in md
    assert "arith-test-00004: gold 5; ours read 4 (wrong), math-verify read 5 (right)" in md
    s["second_verifier"] = [{"iter": 1, "installed": False, "task": "arith", "reason": "math-verify is not installed"}]
    assert "math-verify is not installed" in second_verifier_section(s)[0]
    assert "Not applicable" in second_verifier_section({"task": "csqa"})[0]


def test_provenance_section(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "data.jsonl").write_text("{}\n")
    recs = [provenance.iteration_provenance(iter=t, files={"start_model": tmp_path / "m", "model": tmp_path / "m",
                                                           "train_data": tmp_path / "data.jsonl"},
                                            verifier=provenance.verifier_version("arith"),
                                            seeds={"seed": 0}, sampling={"n": 8, "temperature": 0.7})
            for t in (1, 2)]
    recs[1]["device"] = "Some GPU"
    md = "\n".join(provenance_section({"provenance": recs}))
    (rows,) = tables(md)
    h = provenance.sha256_tree(tmp_path / "m")[:12]
    assert rows[0]["started from"] == h and rows[0]["weights"] == h
    assert "reference" not in rows[0]  # a column only for files some iteration recorded
    assert rows[1]["train data"] == provenance.sha256_file(tmp_path / "data.jsonl")[:12]
    assert rows[0]["seeds"] == "seed=0" and rows[0]["sampling"] == "n=8, temperature=0.7"
    assert "- Verifier: task arith" in md and "numpy" in md
    assert "t=2 ran in another environment (device differ" in md and "Some GPU" in md


def test_render_compare(tmp_path):
    runs = []
    for method, shift in [("sft", 0.0), ("dpo", 0.02), ("sft-dpo", 0.01)]:
        s = mini_summary()
        s["method"] = method
        for m in s["iterations"][1:]:
            m["pass@1"] += shift
        s["provenance"] = [{"iter": 1, "files": {"model": {"path": "x", "sha256": "ab" * 32}}}]
        runs.append(s)
    path = render_compare(runs, tmp_path / "cmp")
    md = path.read_text()
    assert path == tmp_path / "cmp" / "report.md"
    for name in ["compare_accuracy.png", "compare_diversity.png"]:
        assert (tmp_path / "cmp" / "plots" / name).read_bytes().startswith(PNG_MAGIC)
    assert "same M1 (weights sha256 abababababab)" in md
    pass1 = tables(md)[0]
    assert list(pass1[0]) == ["t", "sft", "dpo", "sft-dpo"] and [r["t"] for r in pass1] == ["0", "1", "2", "3"]
    m = runs[1]["iterations"][1]
    assert pass1[2]["dpo"] == fmt_ci(m["pass@1"], m["ci"]["pass@1"])
    assert "- Steps: sft: t=1 sft, t=2 dpo, t=3 sft; dpo: t=1 sft" in md
    assert md.count("### ") == 3 and md.count("1. pass@1 rises") == 3
    runs[2]["provenance"][0]["files"]["model"]["sha256"] = "cd" * 32
    assert "do not share M1" in render_compare(runs, tmp_path / "cmp2").read_text()
    with pytest.raises(ValueError, match="different tasks"):
        render_compare([runs[0], {**runs[1], "task": "gsm8k"}], tmp_path / "bad")


class Letters:
    def encode(self, texts):
        e = np.array([[t.count(ch) + 0.1 for ch in "abcde"] for t in texts], dtype=float)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_report_from_real_metrics(tmp_path):
    """End to end through metrics.per_question / intervals / comparisons: every headline cell has an interval."""
    rng = np.random.default_rng(0)
    n_q, n = 60, 8
    pqs = []
    for t, p in enumerate([0.2, 0.5, 0.6, 0.55]):
        verdicts = (rng.random((n_q, n)) < p).tolist()
        texts = [[f"<<{i}+{j % (4 - t)}={i + j % (4 - t)}>> " + "abcde"[: 1 + (j % (5 - t))] for j in range(n)]
                 for i in range(n_q)]
        pqs.append(metrics.per_question(greedy_correct=(rng.random(n_q) < p).tolist(), sample_texts=texts,
                                        sample_verdicts=verdicts, ids=[f"q{i}" for i in range(n_q)],
                                        ood_levels=[1 + i % 5 for i in range(100)],
                                        ood_correct=(rng.random(100) < p).tolist(), encoder=Letters()))
    ms = []
    for t, pq in enumerate(pqs):
        m = metrics.metrics_from_questions(pq, iter=t, step_method="base" if t == 0 else "sft",
                                           m1=pqs[1] if t >= 2 else None)
        m["ci"] = metrics.iteration_intervals(pq, m1=pqs[1] if t >= 2 else None, n_boot=500)
        ms.append(m)
    summary = {"task": "arith", "method": "sft", "base": ms[0], "iterations": ms[1:],
               "comparisons": [metrics.iteration_comparisons(t, pqs[t], m0=pqs[0], m1=pqs[1] if t >= 2 else None,
                                                             prev=pqs[t - 1] if t >= 3 else None, n_boot=500)
                               for t in range(1, 4)],
               "transitions": [metrics.iteration_transitions(t, pqs[t], m1=pqs[1] if t >= 2 else None,
                                                             prev=pqs[t - 1] if t else None) for t in range(4)]}
    json.dumps(summary, allow_nan=False)
    md = write_report(tmp_path, copy.deepcopy(summary)).read_text()
    passk, changes, _, trans = tables(md)[:4]
    assert all(" [" in r["pass@1 (greedy)"] for r in passk) and len(passk) == 4
    assert all(r["pass@1 vs M0"].endswith(("shown", "within noise")) for r in changes)
    gained = summary["transitions"][2]["vs_m1"]["gained"]
    assert trans[2]["gained vs M1"] == str(len(gained)) == str(ms[2]["improvement_set"]["size"])  # IS(t)
    assert all(any(v in line for v in ("shown", "within noise", "cannot tell", "partly shown"))
               for line in findings(summary))


@pytest.mark.parametrize("x,pct,num", [(0.5, "50.0", "0.500"), (None, "n/a", "n/a"), (float("nan"), "n/a", "n/a")])
def test_formatting(x, pct, num):
    assert fmt_pct(x) == pct and fmt_num(x) == num


def test_interval_and_change_formatting():
    assert fmt_ci(0.41, [0.375, 0.445]) == "41.0 [37.5, 44.5]"
    assert fmt_ci(0.41, None) == "41.0" and fmt_ci(None, [0.1, 0.2]) == "n/a"
    assert fmt_ci(0.627, [0.6, 0.65], pct=False) == "0.627 [0.600, 0.650]"
    assert fmt_p(0.0004) == "p < 0.001" and fmt_p(0.1234) == "p = 0.123" and fmt_p(None) == "p n/a"
    assert fmt_change({"diff": -0.03, "ci": [-0.07, 0.01], "p": 0.2, "test": "McNemar, exact binomial"}) == \
        "-3.0 [-7.0, +1.0], p = 0.200 (McNemar, exact binomial), within noise"
    assert fmt_change({"diff": 0.012, "ci": None, "p": 0.01}, pct=False, test=False) == "+0.012, p = 0.010, shown"
    assert fmt_change(None) == "n/a"
