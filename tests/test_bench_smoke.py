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


def test_sampler_breakdown_adds_up():
    """bench/sampler_breakdown.py times every piece of a generate call exclusively: each wrapped piece is called as
    often as the model's structure says, and the pieces add up to the call."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "sampler_breakdown.py"), "--prompts", "2", "--n", "2",
                          "--max-new-tokens", "8", "--repeats", "1", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = {r[0]: r[1:] for r in ([c.strip() for c in line.strip("|").split("|")]
                                  for line in res.stdout.splitlines() if line.startswith("| ")) if r[0] != "piece"}
    total = float(rows.pop("**total**")[1])
    assert abs(sum(float(r[1]) for r in rows.values()) - total) <= 0.001 * len(rows) + 1e-9, rows
    layers, decode_steps = 4, 7  # the shipped model; 8 new tokens, the first drawn from the prefill's logits
    chunks = int(rows["prefill glue (Python, embedding)"][0])  # Decoder.prefill calls: one flat batch of prompts
    assert chunks == 1
    # a prefill or decode step through decode_cpu.Decoder: q|k|v, o, gate|up, down per layer, then the output
    assert int(rows["linear layers"][0]) == (4 * layers + 1) * (chunks + decode_steps)
    assert int(rows["decode attention (C: RoPE, cache write, prompt + own keys)"][0]) == layers * decode_steps
    assert int(rows["prefill attention (C: RoPE, cache write, causal)"][0]) == layers * chunks
    assert int(rows["RMSNorm"][0]) == (2 * layers + 1) * (chunks + decode_steps)
    assert int(rows["SiLU * up"][0]) == layers * (chunks + decode_steps)
    assert int(rows["decode step glue (Python, embedding)"][0]) == decode_steps


def test_encoder_bench_smoke(tmp_path):
    """bench/encoder.py end to end on 64 texts: both encoders timed, their embeddings compared (it exits non-zero
    past 1e-5), the table written."""
    out = tmp_path / "encoder.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "encoder.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    if "no all-MiniLM-L6-v2 weights" in res.stderr:
        pytest.skip(res.stderr.strip())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| linear layers")]
    assert [r[0] for r in rows] == ["oneDNN packed (ours)", "F.linear"]
    assert all(float(r[1]) > 0 and float(r[3].replace(",", "")) > 0 for r in rows), rows


def test_training_bench_smoke(tmp_path):
    """bench/training.py end to end through the trainer on the tiny model: one row per variant, and the four
    variants (checkpointing on / off, fused loss on / off) train to the same loss (the same steps on the same
    batches; the fused log-probs equal the plain ones to rounding)."""
    out = tmp_path / "training.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "training.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]
    assert [r[0] for r in rows] == ["ckpt+fused", "ckpt", "fused", "plain"]
    losses = [float(r[-1]) for r in rows]
    assert all(float(r[2]) > 0 for r in rows) and max(losses) - min(losses) < 1e-2, rows
