"""The self-improvement loop end to end through train.py, on a miniature configuration of the embedded default
(the shipped base model, a handful of questions): every method writes the run directory (minisirev/run.py), the
training data really is what the verifier says, a killed run resumes to the result of an uninterrupted one,
mismatched flags are refused, a finished run is never shrunk, a moved run resumes, changed evaluation settings
regenerate, and a diverging loss stops with the last good model kept."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from minisirev.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "base_model"
# 24 questions x 8 samples: enough for the shipped M0 to give both correct and incorrect samples
MINI = ["--model", str(BASE), "--n-train", "24", "--n-test", "8", "--n-ood", "10", "--n-samples", "8",
        "--eval-samples", "4", "--max-new-tokens", "96", "--m1-epochs", "1", "--batch-size", "8", "--iter", "2"]
METRIC_KEYS = {"iter", "step_method", "pass@1", "pass@k", "coverage", "improvement_set", "diversity", "ood"}

pytestmark = pytest.mark.skipif(not (BASE / "config.json").exists(), reason="data/base_model is not built")


def train(out: Path, *extra: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "train.py", *MINI, "--out", str(out), *extra], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("method,schedule", [("sft", "alternate"), ("dpo", "alternate"), ("sft-dpo", "both")])
def test_two_iteration_run_writes_the_run_directory(tmp_path, method, schedule):
    run = tmp_path / "run"
    greedy_eval = method == "dpo"  # --eval-temperature 0 is honoured (it once became the default 0.75)
    train(run, "--method", method, "--schedule", schedule, *(["--eval-temperature", "0"] if greedy_eval else []))
    task = get_task("arith")
    train_recs = {ex["id"]: ex for ex in task.load("train")[:24]}

    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["eval_temperature"] == (0.0 if greedy_eval else 0.75)
    base = json.loads((run / "iter_0" / "metrics.json").read_text())  # M0, the t = 0 row
    assert METRIC_KEYS <= set(base) and base["iter"] == 0 and base["step_method"] == "base"
    if greedy_eval:  # every "sample" is the greedy answer
        assert all(len(set(r["completions"])) == 1 for r in rows(run / "iter_1" / "eval" / "test_samples.jsonl"))
    for t in (1, 2):
        assert (run / f"iter_{t}" / "model" / "config.json").exists()
        assert (run / f"iter_{t}" / "model" / "tokenizer.json").exists()
        m = json.loads((run / f"iter_{t}" / "metrics.json").read_text())
        assert METRIC_KEYS <= set(m) and m["iter"] == t
    assert rows(run / "iter_1" / "train_data.jsonl")[0]["type"] == "sft"

    samples = rows(run / "iter_1" / "samples.jsonl")  # M1's samples: its coverage, and round 2's data
    assert len(samples) == 24 and all(len(s["completions"]) == len(s["correct"]) == 8 for s in samples)
    for s in samples:  # each stored verdict is the verifier's
        assert s["correct"] == [task.is_correct(train_recs[s["id"]], c) for c in s["completions"]]
    data = rows(run / "iter_2" / "train_data.jsonl")
    kinds = {"sft": ["sft"], "dpo": ["dpo"], "sft-dpo": ["sft", "dpo"]}[method]
    assert sorted({d["type"] for d in data}) == sorted(kinds), "the miniature run produced no training data"
    by_id = {s["idx"]: train_recs[s["id"]] for s in samples}
    for d in data:
        ex = by_id[d["idx"]]
        if d["type"] == "sft":
            assert task.is_correct(ex, d["completion"])
        else:
            assert task.is_correct(ex, d["chosen"]) and not task.is_correct(ex, d["rejected"])
    log = rows(run / "iter_2" / "train_log.jsonl")
    assert log and all({"step", "loss", "lr", "ms", "tok_s"} <= set(r) for r in log)
    if "dpo" in kinds:
        assert any("rewards/margins" in r for r in log)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and [m["iter"] for m in summary["iterations"]] == [1, 2]
    assert summary["base"] == base
    assert (run / "report.md").exists() and len(list((run / "plots").glob("*.png"))) >= 4

    if method == "sft":
        check_eval_rebuilds_and_finished_runs_are_kept(run, tmp_path)


def evaluate(run: Path, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "eval.py", "--run", str(run), *extra], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def check_eval_rebuilds_and_finished_runs_are_kept(run: Path, tmp_path: Path):
    # eval.py rebuilds the metrics, summary, report and plots from the run directory
    before = json.loads((run / "iter_2" / "metrics.json").read_text())
    for f in [run / "iter_2" / "metrics.json", run / "summary.json", run / "report.md", *run.glob("plots/*")]:
        f.unlink()
    evaluate(run)
    assert json.loads((run / "iter_2" / "metrics.json").read_text()) == before
    assert json.loads((run / "summary.json").read_text())["iterations"][1] == before
    assert (run / "report.md").exists() and len(list((run / "plots").glob("*.png"))) >= 4

    # a command that cannot extend a finished run is refused and leaves it as it was
    kept = {p: p.read_bytes() for p in [run / "summary.json", run / "report.md", run / "config.json"]}
    r = train(run, "--method", "sft", "--iter", "1", check=False)
    assert r.returncode == 2 and "2 finished iterations" in r.stderr and "Traceback" not in r.stderr
    assert all(p.read_bytes() == b for p, b in kept.items())

    # a moved run resumes: nothing is recomputed, the result is the same
    moved = tmp_path / "moved"
    run.rename(moved)
    stamps = {p: p.stat().st_mtime_ns for p in [*moved.rglob("*.jsonl"), *moved.rglob("metrics.json")]}
    train(moved, "--method", "sft")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # another method from the same M1 (M1 is not retrained), then the two methods side by side in one report
    other = tmp_path / "dpo"
    r = train(other, "--method", "sft", "--m1-from", str(moved), "--lr", "2e-3", check=False)
    assert r.returncode == 2 and "--m1-from" in r.stderr and "--lr 0.001 here, 0.002 asked" in r.stderr
    train(other, "--method", "dpo", "--m1-from", str(moved))
    m1 = "iter_1/model/model.safetensors"
    assert (other / m1).read_bytes() == (moved / m1).read_bytes()
    assert json.loads((other / "summary.json").read_text())["iterations"][0] == \
        json.loads((moved / "summary.json").read_text())["iterations"][0]
    r = subprocess.run([sys.executable, "eval.py", "--compare", str(moved), str(other), "--out", str(tmp_path / "cmp")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "All runs start from the same M1" in report and "dpo" in report

    # other evaluation settings regenerate what they change (sampled answers), keep the rest (greedy answers)
    greedy = (moved / "iter_1" / "eval" / "test_greedy.jsonl").stat().st_mtime_ns
    evaluate(moved, "--eval-samples", "2")
    assert all(len(r["completions"]) == 2 for r in rows(moved / "iter_2" / "eval" / "test_samples.jsonl"))
    assert json.loads((moved / "iter_2" / "metrics.json").read_text())["pass@k"].keys() == {"1", "2"}
    assert (moved / "iter_1" / "eval" / "test_greedy.jsonl").stat().st_mtime_ns == greedy
    assert json.loads((moved / "config.json").read_text())["eval_samples"] == 2


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(full, "--method", "sft-dpo")

    # kill during iteration 2's self-sampling (or as soon after as the poll sees), then rerun the same command
    cmd = [sys.executable, "train.py", *MINI, "--out", str(killed), "--method", "sft-dpo"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (killed / "iter_1" / "model").exists() and not (killed / "iter_2" / "model").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    train(killed, "--method", "sft-dpo")

    for t in (1, 2):
        a, b = full / f"iter_{t}", killed / f"iter_{t}"
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
        assert (a / "train_data.jsonl").read_text() == (b / "train_data.jsonl").read_text()
        wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
        assert all((wa[k] == wb[k]).all() for k in wa)
    assert not list(killed.rglob("*.partial")) and not list(killed.rglob("*.tmp"))


def test_other_flags_are_refused_and_force_starts_over(tmp_path):
    run = tmp_path / "run"
    train(run, "--method", "sft", "--iter", "1")
    r = train(run, "--method", "sft", "--iter", "1", "--beta", "0.3", check=False)
    assert r.returncode == 2 and "--beta 0.1 -> 0.3" in r.stderr and "Traceback" not in r.stderr
    train(run, "--method", "sft", "--iter", "1", "--beta", "0.3", "--force")
    assert json.loads((run / "config.json").read_text())["beta"] == 0.3


def test_diverging_loss_stops_and_keeps_the_last_good_model(tmp_path):
    run = tmp_path / "run"
    r = train(run, "--method", "sft", "--iter", "1", "--lr", "1e30", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "loss is nan" in r.stderr or "loss is inf" in r.stderr or "gradient norm is" in r.stderr
    assert "last good model" in r.stderr and not (run / "iter_1" / "model").exists()
