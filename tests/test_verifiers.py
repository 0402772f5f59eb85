"""Verifiers on real data and under broken harnesses.

MBPP: the gold solutions of real test records must all be accepted and wrong ones rejected when the interpreter
is a virtual environment under /tmp, /var/tmp or /dev/shm, the directories the sandbox replaces by a private
tmpfs. The records (tests/fixtures/mbpp_real.jsonl) are the MBPP test split's task_ids 11-50, lines unchanged
from the upstream mbpp.jsonl (Austin et al. 2021, arXiv 2108.07732; CC BY 4.0). A harness that cannot judge
programs must raise HarnessError, never answer False. MATH: records whose level is "Level ?" (the train split
has some) or missing have level None.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from minisirev.tasks import TASKS, HarnessError, get_task, sandbox

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
REAL_MBPP = FIX / "mbpp_real.jsonl"
MOUNTS = sandbox.isolation()["private_tmp"]  # root with a mount namespace: /tmp is private inside the sandbox


def wrong_program(ex: dict) -> str:
    """The gold program with the function its tests call redefined to return None: well-formed, wrong."""
    defined = set(re.findall(r"^def\s+(\w+)", ex["code"], re.M))
    name = next(n for n in re.findall(r"(\w+)\s*\(", ex["test_list"][0]) if n in defined)
    return ex["code"].replace("\r\n", "\n") + f"\n\n\ndef {name}(*args, **kwargs):\n    return None\n"


# ---- MBPP from a virtual environment in a directory the sandbox makes private ----------------------------------

VENV_SCRIPT = r"""
import json, os, sys, sysconfig
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
from test_verifiers import wrong_program
from minisirev.tasks import HarnessError, get_task, sandbox

exs = get_task("mbpp").load(sys.argv[2])[: int(sys.argv[3])]
with open(os.path.join(sysconfig.get_paths()["purelib"], "sbx_venv_probe.py"), "w") as f:
    f.write("VALUE = 42\n")  # a module only the venv's own site-packages has
out = {"prefix": sys.prefix, "isolation": sandbox.isolation()}
if sys.argv[4] == "hide-interpreter":  # the harness as it was: the interpreter's files vanish under the tmpfs
    sandbox._CHILD_SOURCE = sandbox._CHILD_SOURCE.replace("keep = _interpreter_paths()", "keep = []")
if sys.argv[4] == "closed-venv":  # a venv the slot uid cannot read
    os.chmod(sys.prefix, 0o700)
try:
    t = get_task("mbpp")
    out["gold"] = t.is_correct_batch(exs, [t.reference(e) for e in exs])
    out["wrong"] = t.is_correct_batch(exs, [wrong_program(e) for e in exs])
    out["stats"] = t.harness_stats()
except HarnessError as e:
    out["harness_error"], out["count"] = str(e), e.count
out["own_module"] = sandbox.run_program("import sbx_venv_probe", ["assert sbx_venv_probe.VALUE == 42"]).status
target = os.path.join(sys.prefix, "PWNED")
out["write_prefix"] = sandbox.run_program(f"open({target!r}, 'w').write('x')", guard=False).status
out["pwned"] = os.path.exists(target)
print(json.dumps(out))
"""


def run_in_venv(base: str, n_records: int, mode: str = "plain") -> dict:
    """Create a venv under `base` (in a fresh 0700 directory, as mkdtemp makes them) and run VENV_SCRIPT in it."""
    if not (os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK)):
        pytest.skip(f"{base} is not a writable directory here")
    with tempfile.TemporaryDirectory(dir=base, prefix="minisirev-venv-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                       check=True, timeout=120)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH")}
        env["PYTHONPATH"] = str(ROOT)
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", VENV_SCRIPT, str(ROOT), str(REAL_MBPP),
                               str(n_records), mode], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["prefix"] == str(venv)  # the sandbox's child interpreter was the venv's python
        return out


@pytest.mark.parametrize("base,n_records", [("/tmp", 40), ("/var/tmp", 4), ("/dev/shm", 4)])
def test_mbpp_gold_accepted_from_a_venv_in_a_private_dir(base, n_records):
    out = run_in_venv(base, n_records)
    assert "harness_error" not in out, out.get("harness_error")
    assert out["gold"] == [True] * n_records
    assert out["wrong"] == [False] * n_records
    assert out["stats"] == {"programs": 2 * n_records, "harness_errors": 0}
    assert out["own_module"] == "pass"  # the venv's own site-packages is visible inside the sandbox
    if MOUNTS:  # ... and read-only, even with the audit guard off
        assert out["write_prefix"] != "pass" and not out["pwned"]


@pytest.mark.skipif(not MOUNTS, reason="needs root with mount namespaces (only then is /tmp private)")
@pytest.mark.parametrize("mode,cause", [("hide-interpreter", "is not visible inside the sandbox"),
                                        ("closed-venv", "is not readable by the sandbox uid")])
def test_unusable_interpreter_raises_harness_error_on_first_use(mode, cause):
    """The harness with the old bug (the venv's files not kept), or a venv the slot uid cannot read, must stop
    the run with the cause and a fix, not report 0% correct."""
    out = run_in_venv("/tmp", 3, mode=mode)
    assert "gold" not in out, out
    msg = out["harness_error"]
    assert msg.startswith("sandbox self-test failed: ") and cause in msg and "fix:" in msg, msg
    assert "\n" not in msg and out["count"] == 3


def test_real_fixture_is_the_mbpp_test_split():
    exs = get_task("mbpp").load(str(REAL_MBPP))
    assert [ex["task_id"] for ex in exs] == list(range(11, 51))
    assert all(len(ex["test_list"]) == 3 for ex in exs)


# ---- HarnessError at the task level ----------------------------------------------------------------------------

@pytest.fixture
def broken_sandbox(monkeypatch):
    """A fresh process's self-test cache, and a child that exits before running anything."""
    monkeypatch.setattr(sandbox, "_self_test_cache", {})

    def breaks():
        monkeypatch.setattr(sandbox, "_CHILD_SOURCE", "import os\nos._exit(0)\n")
    return breaks


def test_broken_sandbox_raises_on_first_use(broken_sandbox):
    broken_sandbox()
    t = get_task("mbpp")
    exs = t.load(str(FIX / "mbpp.jsonl"))
    with pytest.raises(HarnessError) as info:
        t.is_correct_batch(exs, [t.reference(e) for e in exs])
    msg = str(info.value)
    assert msg.startswith("sandbox self-test failed: the known-good program could not be run: the child ended")
    assert "fix:" in msg and "\n" not in msg
    assert info.value.count == len(exs) and info.value.cause == msg
    assert t.harness_stats() == {"programs": len(exs), "harness_errors": len(exs)}
    with pytest.raises(HarnessError):
        t.is_correct(exs[0], t.reference(exs[0]))


def test_harness_failure_after_the_self_test_raises_with_a_count(broken_sandbox):
    t = get_task("mbpp")
    exs = t.load(str(FIX / "mbpp.jsonl"))
    gold = [t.reference(e) for e in exs]
    assert t.is_correct_batch(exs, gold) == [True] * len(exs)  # self-test passed and cached
    broken_sandbox()
    texts = gold[:2] + [""]  # no code at all: judged "fail" without the sandbox
    with pytest.raises(HarnessError) as info:
        t.is_correct_batch(exs[:3], texts)
    assert info.value.count == 2 and str(info.value).startswith("the sandbox could not run 2 of 3 programs")
    assert t.harness_stats(reset=True) == {"programs": len(exs) + 3, "harness_errors": 2}
    assert t.harness_stats() == {"programs": 0, "harness_errors": 0}


@pytest.mark.parametrize("name", [n for n in TASKS if n != "mbpp"])
def test_tasks_without_code_never_raise(name, broken_sandbox):
    broken_sandbox()
    t = get_task(name)
    exs = t.load("ood")[:5] if name == "arith" else t.load(str(FIX / f"{name}.jsonl"))
    assert t.is_correct_batch(exs, [t.reference(e) for e in exs]) == [True] * len(exs)
    assert t.harness_stats() == {"programs": 0, "harness_errors": 0}


# ---- MATH levels -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("level,expected", [("Level 1", 1), ("Level 5", 5), (" Level 3 ", 3), (4, 4),
                                            ("Level ?", None), ("Level", None), ("", None), (None, None),
                                            (True, None), ("missing", None)])
def test_math_level_never_crashes(level, expected):
    ex = {"problem": "p", "solution": "\\boxed{1}", "type": "Algebra"}
    if level != "missing":
        ex["level"] = level
    assert get_task("math").level(ex) == expected


def test_math_level_question_mark_record_loads_and_scores():
    """A "Level ?" record (as in the MATH train split) loads, verifies, and has no level."""
    t = get_task("math")
    ex = next(e for e in t.load(str(FIX / "math.jsonl")) if e["level"] == "Level ?")
    assert t.level(ex) is None and t.is_correct(ex, t.reference(ex))
