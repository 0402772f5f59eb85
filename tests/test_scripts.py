"""The three scripts' contract with a user: every flag is checked before anything runs (one line naming the flag,
exit 2, no run directory made); sample.py resumes after SIGKILL to what an uninterrupted run writes; a verifier
that cannot run stops a run with one line and never records a harness failure as a wrong answer."""

import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minisirev.config import ModelConfig
from minisirev.model import Transformer
from minisirev.run import read_partial_rows
from minisirev.stages import Sampling, generate_and_verify
from minisirev.tasks import HarnessError

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "data" / "base_model"


def run_script(monkeypatch, capsys, script: str, argv: list[str]) -> tuple[int, str]:
    """A script in this process (a user error exits before any heavy work): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    return e.value.code, capsys.readouterr().err


# ---- every flag is checked before anything runs ----------------------------------------------------------------

TRAIN_MISTAKES = [
    (["--iter", "0"], "--iter 0"), (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--n-samples", "0"], "--n-samples 0"), (["--temperature", "-1"], "--temperature -1"),
    (["--top-p", "1.5"], "--top-p 1.5"), (["--top-p", "0"], "--top-p 0"), (["--eval-samples", "0"], "--eval-samples 0"),
    (["--batch-size", "0"], "--batch-size 0"), (["--grad-accum", "0"], "--grad-accum 0"), (["--lr", "-1"], "--lr -1"),
    (["--lr", "nan"], "--lr nan"), (["--si-lr", "0"], "--si-lr 0"), (["--dpo-lr", "0"], "--dpo-lr 0"),
    (["--beta", "-1"], "--beta -1"), (["--n-train", "-5"], "--n-train -5"), (["--n-test", "-1"], "--n-test -1"),
    (["--epochs", "0"], "--epochs 0"), (["--warmup", "1.5"], "--warmup 1.5"), (["--clip", "0"], "--clip 0"),
    (["--label-smoothing", "0.7"], "--label-smoothing 0.7"), (["--top-k", "-2"], "--top-k -2"),
    (["--max-per-question", "0"], "--max-per-question 0"), (["--eval-temperature", "-0.5"], "--eval-temperature"),
    (["--method", "dpo", "--n-samples", "1"], "--n-samples 1"), (["--device", "nonsense"], "--device nonsense"),
    (["--task", "nope"], "unknown task 'nope'"), (["--model", "/nonexistent/m0"], "/nonexistent/m0"),
]
if not torch.cuda.is_available():
    TRAIN_MISTAKES.append((["--device", "cuda"], "no CUDA device"))


@pytest.mark.parametrize("argv, message", TRAIN_MISTAKES)
def test_train_refuses_mistakes_before_anything_runs(tmp_path, monkeypatch, capsys, argv, message):
    out = tmp_path / "run"
    code, err = run_script(monkeypatch, capsys, "train.py", [*argv, "--out", str(out)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--eval-samples", "0"], "--eval-samples 0"), (["--top-p", "2"], "--top-p 2"), (["--n-test", "-3"], "--n-test -3"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"), (["--eval-temperature", "-1"], "--eval-temperature -1"),
])
def test_eval_refuses_mistakes(tmp_path, monkeypatch, capsys, argv, message):
    out = tmp_path / "ev"
    code, err = run_script(monkeypatch, capsys, "eval.py", ["--model", str(BASE), "--out", str(out), *argv])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_eval_needs_exactly_one_target(monkeypatch, capsys):
    code, err = run_script(monkeypatch, capsys, "eval.py", [])
    assert code == 2 and "exactly one of" in err
    code, err = run_script(monkeypatch, capsys, "eval.py", ["--run", "/nonexistent/run"])
    assert code == 2 and "not a run directory" in err


# ---- sample.py: output lines, resume after SIGKILL, refusals ----------------------------------------------------

class Echo:
    """A stand-in task: 11 questions of words, every other one with an id; a completion is correct when its length
    is even. With KILL_AT=k in the environment the process SIGKILLs itself at the k-th verdict (a kill mid-run);
    with BROKEN=k the harness fails from the k-th verdict on."""

    name = "echo"
    calls = 0

    def load(self, path_or_split):
        return [{"question": f"q{i} " * (1 + i % 4), **({"id": f"E{i}"} if i % 2 else {})} for i in range(11)]

    def prompt(self, ex):
        return ex["question"]

    def level(self, ex):
        return None

    def is_correct_batch(self, exs, texts):
        out = []
        for t in texts:
            Echo.calls += 1
            if Echo.calls == int(os.environ.get("KILL_AT", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
            if 0 < int(os.environ.get("BROKEN", "0")) <= Echo.calls:
                raise HarnessError("echo harness: cannot run (stand-in)", count=len(texts))
            out.append(len(t) % 2 == 0)
        return out


def get_echo(name):
    if name != "echo":
        raise ValueError(f"unknown task {name!r}")
    return Echo()


RUNNER = """
import runpy, sys
import minisirev.tasks
sys.path.insert(0, sys.argv.pop(1))
from test_scripts import get_echo
minisirev.tasks.get_task = get_echo
runpy.run_path("sample.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from minisirev.checkpoint import save_model
    from minisirev.tokenizer import train_tokenizer
    tok = train_tokenizer([f"q{i} the answer is {i * 7}" for i in range(200)], vocab_size=300, min_frequency=1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, bos_id=1, eos_id=2)
    out = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(Transformer(cfg).init_weights(std=0.1, seed=0), out, tokenizer=tok)
    return out


def sample_args(checkpoint, out, *extra):
    return ["--model", str(checkpoint), "--task", "echo", "--n", "3", "--temperature", "1.0", "--max-new-tokens", "6",
            "--batch-size", "4", "--seed", "1", "--out", str(out), *extra]


def run_sample(tmp_path, checkpoint, out, *extra, env=None):
    """sample.py in a subprocess (so that it can be killed), with the stand-in task."""
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(runner), str(Path(__file__).parent),
                           *sample_args(checkpoint, out, *extra)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_sample_script_resumes_after_kill(tmp_path, checkpoint, monkeypatch, capsys):
    full = run_sample(tmp_path, checkpoint, tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr
    want = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert [r["idx"] for r in want] == list(range(11))
    assert want[1]["id"] == "E1" and want[0]["id"] == 0
    assert all(len(r["completions"]) == len(r["correct"]) == 3 for r in want)
    assert all(r["correct"] == [len(c) % 2 == 0 for c in r["completions"]] for r in want)

    out = tmp_path / "killed.jsonl"
    killed = run_sample(tmp_path, checkpoint, out, env={"KILL_AT": str(3 * 6)})  # 1 chunk of 4 written, then a kill
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    partial = out.with_name(out.name + ".partial")
    assert len(read_partial_rows(partial)) == 4
    with open(partial, "a") as f:  # and a partial line, as a kill during a write leaves
        f.write('{"idx": 7, "compl')
    resumed = run_sample(tmp_path, checkpoint, out)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == want  # what an uninterrupted run wrote
    assert not partial.exists()

    monkeypatch.setattr("minisirev.tasks.get_task", get_echo)
    code, err = run_script(monkeypatch, capsys, "sample.py", sample_args(checkpoint, out, "--n", "4"))
    assert code == 2 and "n 3 -> 4" in err and "use another --out" in err


@pytest.mark.parametrize("extra, message", [(["--task", "nope"], "unknown task 'nope'"),
                                            (["--model", "/nonexistent/model"], "/nonexistent/model"),
                                            (["--n", "0"], "--n 0"), (["--top-p", "1.5"], "--top-p 1.5"),
                                            (["--temperature", "-1"], "--temperature -1")])
def test_sample_script_user_errors_are_one_line(tmp_path, checkpoint, monkeypatch, capsys, extra, message):
    monkeypatch.setattr("minisirev.tasks.get_task", get_echo)
    code, err = run_script(monkeypatch, capsys, "sample.py", sample_args(checkpoint, tmp_path / "x.jsonl", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.jsonl").exists()


# ---- a harness failure is never a wrong answer -----------------------------------------------------------------

def test_harness_error_stops_the_stage_and_writes_no_verdict(tmp_path, checkpoint, monkeypatch):
    from minisirev.checkpoint import load_model
    from minisirev.tokenizer import load_tokenizer
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    task, out = Echo(), tmp_path / "s.jsonl"
    Echo.calls = 0
    monkeypatch.setenv("BROKEN", str(4 * 3 + 1))  # the second chunk's first verdict fails
    with pytest.raises(HarnessError):
        generate_and_verify(model, tok, task, task.load(None), out, Sampling(3, 1.0, max_new_tokens=4), chunk=4,
                            log=tmp_path / "log.jsonl")
    assert not out.exists()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [{"stage": "sample", "file": str(out), "harness_errors": 12, "error": logged[0]["error"]}]
    assert [r["idx"] for r in read_partial_rows(out.with_name(out.name + ".partial"))] == [0, 1, 2, 3]


def test_train_stops_on_a_harness_error_with_one_line(tmp_path, monkeypatch, capsys):
    """The loop with a verifier that cannot run: exit 1, one line, no sample file holding false verdicts."""
    from minisirev.tasks import get_task as real_get_task

    class Broken(type(real_get_task("arith"))):
        def is_correct_batch(self, exs, texts):
            raise HarnessError("sandbox self-test failed: stand-in cause; fix: stand-in fix", count=len(texts))

    monkeypatch.setattr("minisirev.tasks.get_task", lambda name: Broken())
    monkeypatch.setattr("minisirev.run.get_task", lambda name: Broken())
    out = tmp_path / "run"
    code, err = run_script(monkeypatch, capsys, "train.py", [
        "--n-train", "4", "--n-test", "2", "--n-ood", "0", "--eval-samples", "2", "--max-new-tokens", "8",
        "--iter", "1", "--out", str(out)])
    assert code == 1 and "verifier could not run" in err and "stand-in fix" in err, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]  # less progress bars
    assert len(lines) == 1 and "Traceback" not in err
    assert not list(out.rglob("*.jsonl")) or all(p.name.endswith(".partial") or p.name == "log.jsonl"
                                                  for p in out.rglob("*.jsonl"))


def test_tune_allocator_sets_glibc_thresholds_unless_the_environment_does(monkeypatch):
    """The scripts' allocator settings (minisirev.cli.tune_allocator): applied through mallopt where the C library
    is glibc, left alone where the environment sets glibc's malloc tunables itself."""
    import ctypes

    from minisirev import cli
    for name in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    assert cli.tune_allocator() is glibc
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert cli.tune_allocator() is False
