"""report.md and the plots from a miniature summary: every file exists, tables equal the summary's numbers."""

import json
import math

import pytest

from minisirev.report import (
    PLOTS,
    findings,
    fmt_num,
    fmt_pct,
    format_table,
    render_report,
    summary_from_run,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mini_summary(T: int = 3) -> dict:
    """T iterations shaped like metrics.json, with the paper's trends and a missing encoder for one group."""
    p1 = [0.40, 0.48, 0.47, 0.46]
    its = []
    for t in range(1, T + 1):
        its.append({
            "iter": t, "step_method": "sft" if t % 2 else "dpo", "pass@1": p1[t - 1],
            "pass@k": {"1": 0.35 + 0.04 * t, "2": 0.5 + 0.03 * t, "4": 0.62 + 0.01 * t, "8": 0.7},
            "coverage": 0.627 if t == 1 else None,
            "improvement_set": ({"size": 0, "m1_pass@k": {}} if t == 1 else
                                {"size": 3 * t, "m1_pass@k": {"2": 0.5, "4": 0.8, "8": 0.95 + 0.01 * t}}),
            "diversity": {
                "correct": {"distinct_n": 0.42 - 0.1 * t, "semantic": 0.7 - 0.1 * t, "equations": 0.6 - 0.1 * t,
                            "questions": 20, "skipped": 2},
                "incorrect": {"distinct_n": 0.5 - 0.05 * t, "semantic": None, "equations": 0.55 - 0.01 * t,
                              "questions": 10, "skipped": 12,
                              "semantic_unavailable": "EncoderUnavailable: all-MiniLM-L6-v2 not found"},
            },
            "ood": {"levels": {"1": 0.8, "2": 0.6, "3": 0.4, "4": 0.2, "5": 0.1 - 0.02 * t},
                    "whole": 0.45 - 0.02 * t, "disparity": (0.8 - (0.1 - 0.02 * t)) / 0.8 * 100},
        })
    return {"task": "arith", "method": "sft-dpo", "iterations": its, "config": {"n_samples": 8, "temperature": 0.75}}


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
    assert "nan" not in md.lower()
    passk, isets, div, ood = tables(md)
    for m, r_p, r_i, r_d, r_o in zip(summary["iterations"], passk, isets, div, ood):
        for r in (r_p, r_i, r_d, r_o):
            assert r["t"] == str(m["iter"]) and r["step"] == m["step_method"]
        assert r_p["pass@1 (greedy)"] == fmt_pct(m["pass@1"])
        for k, v in m["pass@k"].items():
            assert r_p[f"pass@{k}"] == fmt_pct(v)
        assert r_i["size of IS(t)"] == str(m["improvement_set"]["size"])
        for k in ["2", "4", "8"]:
            assert r_i[f"M1 pass@{k}"] == fmt_pct(m["improvement_set"]["m1_pass@k"].get(k))
        for g in ["correct", "incorrect"]:
            d = m["diversity"][g]
            assert r_d[f"{g} Distinct-N"] == fmt_num(d["distinct_n"])
            assert r_d[f"{g} SBERT"] == fmt_num(d["semantic"])
            assert r_d[f"{g} equations"] == fmt_num(d["equations"])
            assert r_d[f"{g} questions (used/skipped)"] == f"{d['questions']}/{d['skipped']}"
        for lv, v in m["ood"]["levels"].items():
            assert r_o[f"level {lv}"] == fmt_pct(v)
        assert r_o["whole"] == fmt_pct(m["ood"]["whole"])
        assert r_o["disparity (%)"] == fmt_num(m["ood"]["disparity"], 2)
    assert div[0]["incorrect SBERT"] == "n/a" and "all-MiniLM-L6-v2 not found" in md
    assert "favours iterative DPO or SFT-DPO" in md and "0.627" in md


def test_findings_follow_the_numbers():
    f = findings(mini_summary())
    assert len(f) == 4
    assert f[0].startswith("1.") and ": shown" in f[0] and "48.00%" in f[0]  # peak at t=2, then a dip
    assert ": shown" in f[1] and "97.00%" in f[1]
    assert ": shown on the 5 of 6 measures available" in f[2] and "incorrect SBERT (Encoder" in f[2]
    assert ": shown" in f[3] and "95.00%" in f[3]

    rising = mini_summary()
    for m, p in zip(rising["iterations"], [0.40, 0.45, 0.50]):
        m["pass@1"] = p
        m["ood"]["whole"] = 0.3 + p  # OOD accuracy improves
        m["diversity"]["correct"]["distinct_n"] = p  # and diversity grows
        m["improvement_set"]["m1_pass@k"] = {"2": 0.1, "4": 0.2} if m["iter"] > 1 else {}
    f = findings(rising)
    assert ": not shown" in f[0] and "still rising" in f[0]
    assert ": not shown" in f[1]
    assert "does not fall on correct Distinct-N" in f[2]
    assert ": partly shown" in f[3]  # accuracy rose, disparity still widened


def test_degenerate_summaries_never_crash_or_invent_numbers(tmp_path):
    one = mini_summary(T=1)
    one["iterations"][0]["ood"] = {"levels": {}, "whole": None, "disparity": None}
    one["iterations"][0]["diversity"]["correct"]["semantic"] = None
    md = write_report(tmp_path / "one", one).read_text()
    assert "nan" not in md.lower()
    assert md.count("cannot tell") == 4
    empty = {"task": "arith", "method": "sft", "iterations": []}
    md = write_report(tmp_path / "empty", empty).read_text()
    assert "nothing to report" in md
    assert all((tmp_path / "empty" / "plots" / n).read_bytes().startswith(PNG_MAGIC) for n in PLOTS)
    bare = {"iterations": [{"iter": 1}, {"iter": 2, "ood": {"disparity": float("nan")}}]}  # keys missing, NaN
    assert "nan" not in render_report(tmp_path, bare).lower()
    assert "n/a" in format_table(bare)


def test_format_table():
    text = format_table(mini_summary())
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].split()[:4] == ["iter", "method", "pass@1", "pass@8"]
    assert lines[1].split()[:5] == ["1", "sft", "40.00", "70.00", "0.627"]
    assert lines[2].split()[4:6] == ["n/a", "6"]


def test_summary_from_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"task": "arith", "method": "sft", "n_samples": 4}))
    for t in [1, 2, 10]:
        (tmp_path / f"iter_{t}").mkdir()
        (tmp_path / f"iter_{t}" / "metrics.json").write_text(json.dumps({"iter": t, "pass@1": t / 20}))
    s = summary_from_run(tmp_path)
    assert s["task"] == "arith" and s["method"] == "sft" and s["config"]["n_samples"] == 4
    assert [m["iter"] for m in s["iterations"]] == [1, 2, 10]
    assert math.isclose(s["iterations"][2]["pass@1"], 0.5)


@pytest.mark.parametrize("x,pct,num", [(0.5, "50.00", "0.500"), (None, "n/a", "n/a"), (float("nan"), "n/a", "n/a")])
def test_formatting(x, pct, num):
    assert fmt_pct(x) == pct and fmt_num(x) == num
