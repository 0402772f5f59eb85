"""The sandbox: passes must be proven, hostile programs contained, the machine unharmed, all in bounded time.

Limits here are small (1-3 s, 256 MB) so the whole file runs in well under a minute on a CPU.
"""

import os
import time
from pathlib import Path

import pytest

from minisirev.tasks import sandbox
from minisirev.tasks.sandbox import Verdict, isolation, run_many, run_program

ROOT = Path(__file__).resolve().parents[1]
CANARY = ROOT / "tests" / "fixtures" / "canary.txt"
FAST = dict(timeout=2.0, memory_mb=256, nproc=16)


def slot_processes() -> list[int]:
    """Pids of processes still running under any of this process's sandbox uids."""
    lo, hi = sandbox._UID_BASE, sandbox._UID_BASE + sandbox._MAX_SLOTS
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                uid = int(next(ln for ln in open(f"/proc/{pid}/status") if ln.startswith("Uid:")).split()[1])
            except (OSError, StopIteration):
                continue
            if lo <= uid < hi:
                pids.append(int(pid))
    return pids


# ---- verdicts --------------------------------------------------------------------------------------------------

ADD = "def add(a, b):\n    return a + b\n"


def test_pass_and_fail():
    v = run_program(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"])
    assert v.status == "pass" and v.passed
    v = run_program(ADD, ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    assert v.status == "fail" and "test 1" in v.reason and "add(2, 2) == 5" in v.reason
    v = run_program("def add(a, b):\n    return a +\n", ["assert add(1, 2) == 3"])
    assert v.status == "error" and "SyntaxError" in v.reason
    v = run_program(ADD, ["assert add(1, 2) == 3"], setup="from math import isclose\nassert isclose(1.0, 1.0)")
    assert v.passed
    v = run_program("import math, re, collections, heapq, itertools, functools, json\nprint('hi')")
    assert v.passed and v.stdout == "hi\n"
    v = run_program("raise ValueError('boom')", ["assert True"])
    assert v.status == "error" and "ValueError: boom" in v.reason


EARLY_EXITS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SystemExit in a test": "def f():\n    raise SystemExit(0)\n",
    "atexit os._exit": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise RuntimeError('x')\n",
    "thread os._exit": "import os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\n"
                       "time.sleep(3)\n",
    "forged PASS": "print('PASS')\nimport sys\nsys.stdout.flush()\nimport os\nos._exit(0)\n",
    "forged audit step": "import sys, os\nsys.audit('minisirev.step', 0)\nsys.audit('minisirev.step', 1)\n"
                         "os._exit(0)\n",
    "patched AssertionError": "import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n"
                              "def f():\n    return 0\n",
    "patched assert helper": "import builtins\nbuiltins.check = lambda *a: None\ndef f():\n    return 0\n",
    "frame walking": "import sys, os\nfr = sys._getframe()\nwhile fr is not None:\n"
                     "    for v in list(fr.f_locals.values()):\n"
                     "        if isinstance(v, (bytes, str)) and len(v) == 32:\n"
                     "            for fd in range(3, 20):\n"
                     "                try:\n"
                     "                    os.write(fd, (v if isinstance(v, bytes) else v.encode()) + b' PASS\\n')\n"
                     "                except OSError:\n                    pass\n"
                     "    fr = fr.f_back\nos._exit(0)\n",
    "gc scan": "import gc\nobjs = gc.get_objects()\n",
}


@pytest.mark.parametrize("name", list(EARLY_EXITS))
def test_no_pass_without_proof(name):
    tests = ["f()", "check(f(), 1)", "assert f() == 1"] if name != "forged audit step" else ["assert 0", "assert 0"]
    v = run_program(EARLY_EXITS[name], tests, setup="def check(a, b):\n    assert a == b\n", **FAST)
    assert v.status != "pass", (name, v)


# ---- hostile programs: contained, non-pass, machine unharmed, bounded time -------------------------------------

HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "sleep forever": "import time\ntime.sleep(10**6)\n",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'sleep 100'])\n",
    "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n",
    "huge output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
    "write into the repo": f"open({str(ROOT / 'PWNED')!r}, 'w').write('x')\n",
    "write to /tmp": "open('/tmp/minisirev_PWNED', 'w').write('x')\n",
    "write via ..": "import os\nopen(os.path.join('..', '..', 'minisirev_PWNED'), 'w').write('x')\n",
    "network connect": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n",
    "network dns": "import socket\nsocket.getaddrinfo('example.com', 80)\n",
    "kill the parent": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n",
    "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
    "delete files": f"import os, shutil\nos.remove({str(CANARY)!r})\nshutil.rmtree({str(CANARY.parent)!r})\n",
    "early exit 0": "import os\nos._exit(0)\n",
}


def _harm_check():
    assert CANARY.is_file()
    assert not (ROOT / "PWNED").exists()
    assert not Path("/tmp/minisirev_PWNED").exists()


def _run_suite(**limits):
    names = list(HOSTILE)
    t0 = time.monotonic()
    verdicts = run_many([(HOSTILE[n], ["assert True"]) for n in names], workers=8, **limits)
    return dict(zip(names, verdicts)), time.monotonic() - t0


def test_hostile_suite_contained():
    results, seconds = _run_suite(**FAST)
    for name, v in results.items():
        assert isinstance(v, Verdict)
        assert v.status in ("fail", "timeout", "error"), (name, v)
    assert results["infinite loop"].status == "timeout"
    assert results["sleep forever"].status == "timeout"
    assert "output" in results["huge output"].reason or "too large" in results["huge output"].reason
    assert seconds < 30, f"hostile suite took {seconds:.1f}s"
    _harm_check()
    time.sleep(0.2)
    assert slot_processes() == []


@pytest.mark.skipif(not isolation()["pid_namespace"], reason="needs root with namespaces (the OS layer alone)")
def test_os_layer_alone_contains_without_the_audit_guard():
    """Same suite with the Python-level guard off: uid, namespaces and rlimits alone must contain it."""
    results, seconds = _run_suite(guard=False, **FAST)
    must_not_pass = ["infinite loop", "sleep forever", "fork bomb", "memory bomb", "huge output", "network connect",
                     "network dns", "kill the parent", "write into the repo", "delete files", "early exit 0"]
    for name in must_not_pass:
        assert results[name].status != "pass", (name, results[name])
    # writes to /tmp land in the program's private tmpfs: harmless, and gone with it
    assert seconds < 30
    _harm_check()
    time.sleep(0.2)
    assert slot_processes() == []


def test_timeout_is_bounded():
    t0 = time.monotonic()
    v = run_program("import time\ntime.sleep(60)\n", timeout=1.0)
    assert v.status == "timeout" and time.monotonic() - t0 < 5


def test_output_is_capped():
    v = run_program("print('y' * 100000)", output_bytes=100)
    assert v.passed and v.stdout.startswith("y" * 100) and v.stdout.endswith("[truncated]") and len(v.stdout) < 200


def test_run_many_parallel_in_order():
    progs = [(f"def f():\n    return {i}\n", [f"assert f() == {i}"]) for i in range(12)]
    progs[5] = ("def f():\n    return -1\n", ["assert f() == 5"])
    t0 = time.monotonic()
    verdicts = run_many(progs, workers=6)
    assert [v.passed for v in verdicts] == [i != 5 for i in range(12)]
    assert time.monotonic() - t0 < 30
    assert run_many([]) == []


def test_bad_arguments_are_verdicts_not_crashes():
    v = run_program(None, ["assert True"])  # type: ignore[arg-type]
    assert v.status == "error"


def test_isolation_report():
    info = isolation()
    assert info["probe"] == "pass"
    if info["root"]:
        assert info["uid"] != 0


def test_unprivileged_fallback(monkeypatch):
    """As a non-root caller would run it: no uid switch, no mount/pid namespace; verdicts and the guard still hold."""
    monkeypatch.setattr(sandbox, "_IS_ROOT", False)
    assert run_program(ADD, ["assert add(1, 2) == 3"], **FAST).passed
    assert run_program(ADD, ["assert add(1, 2) == 4"], **FAST).status == "fail"
    assert run_program("import os\nos._exit(0)\n", ["assert True"], **FAST).status == "fail"
    for name in ("fork bomb", "write into the repo", "delete files", "network connect", "kill the parent"):
        v = run_program(HOSTILE[name], ["assert True"], **FAST)
        assert v.status == "error" and "sandbox:" in v.reason, (name, v)
    v = run_program("open('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read())", **FAST)
    assert v.passed and v.stdout == "ok\n"  # the program's own temporary directory is writable
    _harm_check()


# ---- harness errors: "the harness could not run it" is never "the program failed" ------------------------------

@pytest.fixture
def fresh_self_test(monkeypatch):
    """An empty self-test cache, as in a new process."""
    monkeypatch.setattr(sandbox, "_self_test_cache", {})


def _break_child(monkeypatch, old: str, new: str) -> None:
    assert old in sandbox._CHILD_SOURCE
    monkeypatch.setattr(sandbox, "_CHILD_SOURCE", sandbox._CHILD_SOURCE.replace(old, new))


def test_self_test_passes_here_and_is_cached(fresh_self_test, monkeypatch):
    assert sandbox.self_test(**FAST) is None
    monkeypatch.setattr(sandbox, "run_many", lambda *a, **k: pytest.fail("the self-test ran twice"))
    assert sandbox.self_test(**FAST) is None


def test_setup_failure_is_a_harness_verdict_with_its_reason(fresh_self_test, monkeypatch):
    _break_child(monkeypatch, "    isolation = []\n    privileged =",
                 "    raise HarnessFailure('simulated set-up failure; fix: none needed')\n    isolation = []\n"
                 "    privileged =")
    v = run_program(ADD, ["assert add(1, 2) == 3"], **FAST)
    assert v.status == "harness" and v.harness_error and not v.passed
    assert v.reason == "sandbox: simulated set-up failure; fix: none needed"
    problem = sandbox.self_test(**FAST)
    assert problem.startswith("sandbox self-test failed: the known-good program could not be run: simulated")
    assert "\n" not in problem


@pytest.mark.parametrize("breakage", ["child exits at once", "child crashes in set-up", "no interpreter"])
def test_broken_harness_gives_harness_verdicts(breakage, monkeypatch):
    if breakage == "child exits at once":
        monkeypatch.setattr(sandbox, "_CHILD_SOURCE", "import os\nos._exit(0)\n")
    elif breakage == "child crashes in set-up":
        _break_child(monkeypatch, "    isolation = []\n", "    isolation = []\n    os.stat('/nonexistent')\n")
    else:
        monkeypatch.setattr(sandbox.sys, "executable", "/nonexistent/bin/python")
    for v in run_many([(ADD, ["assert add(1, 2) == 3"]), (ADD, ["assert add(1, 2) == 4"])], **FAST):
        assert v.status == "harness", (breakage, v)
    if breakage == "child crashes in set-up":
        assert "FileNotFoundError" in v.reason and "/nonexistent" in v.reason


@pytest.mark.parametrize("name", ["exit 72", "fake lines on every fd", "truncate every fd", "harness-like stderr"])
def test_a_program_cannot_make_its_verdict_a_harness_error(name):
    """A harness error stops a run, so a program must not be able to fake one: the set-up outcome goes to an fd
    that is closed before the program starts, tagged with the nonce."""
    code = {
        "exit 72": "import os\nos._exit(72)\n",
        "fake lines on every fd": "import os\nfor fd in range(3, 64):\n    try:\n"
                                  "        os.write(fd, b'HARNESS broken\\n')\n    except OSError:\n        pass\n"
                                  "os._exit(1)\n",
        "truncate every fd": "import os\nfor fd in range(3, 64):\n    try:\n        os.ftruncate(fd, 0)\n"
                             "    except OSError:\n        pass\nos._exit(0)\n",
        "harness-like stderr": "import sys\nsys.stderr.write('sandbox: the child ended before running the program')\n"
                               "raise SystemExit(3)\n",
    }[name]
    v = run_program(code, ["assert True"], **FAST)
    assert v.status in ("fail", "error"), (name, v)


def test_guard_kills_are_program_errors():
    """The guard's own kills ("sandbox: forbidden operation ...") are the program's doing, not the harness's."""
    v = run_program(HOSTILE["network connect"], ["assert True"], **FAST)
    assert v.status == "error" and "forbidden operation" in v.reason


def test_slow_start_is_retried_once_then_a_harness_error(monkeypatch):
    """A child that cannot even set up within the time limit (a busy machine) says nothing about the program."""
    _break_child(monkeypatch, "    isolation = []\n", "    isolation = []\n    __import__('time').sleep(2)\n")
    calls = []
    real_run = sandbox._run
    monkeypatch.setattr(sandbox, "_run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    v = run_program(ADD, ["assert add(1, 2) == 3"], timeout=0.5, memory_mb=256)
    assert v.status == "harness" and v.reason.startswith(sandbox._SLOW_START) and "fix:" in v.reason, v
    assert len(calls) == 2
