"""The benchmarks run end to end (correctness checks, timing loop, tables, plots) on tiny shapes under the Triton
interpreter (`--smoke`), so they cannot rot between GPU runs. Timings of a smoke run mean nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bench", ["attention", "dpo_loss"])
def test_bench_smoke(bench, tmp_path):
    out = tmp_path / f"{bench}.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / f"{bench}.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    text = out.read_text()
    assert "WRONG" not in text and "error" not in text and "Correctness failures" not in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| N |") and "provider" not in line]
    if bench == "attention":  # rows: x, then ours first (header rows name the providers)
        ours = [r[1] for r in rows if r[1] != "ours"]
    else:  # rows: N, provider, ms
        ours = [r[2] for r in rows if r[1] == "ours"]
    assert ours and all(float(x) > 0 for x in ours), rows
    assert out.with_suffix(".png").stat().st_size > 0
