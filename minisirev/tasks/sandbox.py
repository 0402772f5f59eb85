"""Run model-written Python in isolation and prove a pass positively.

    run_program(code, tests=(), *, setup="", timeout=5.0, memory_mb=512, ...) -> Verdict
    run_many(programs, *, workers=None, **limits) -> list[Verdict]     (programs: (code, tests, setup) triples)
    Verdict(status: "pass" | "fail" | "timeout" | "error" | "harness", reason, stdout, stderr, seconds)
    self_test(**limits) -> str | None                                 (None, or what is broken and how to fix it)
    isolation() -> dict                                               (what this machine actually provides)

"fail", "timeout" and "error" are the program's doing. "harness" means the sandbox could not run the program
at all (it could not set itself up, the child died before the program started, no slot was free): nothing is
known about the program, and a caller must not count it as wrong. `self_test` runs a known-good and a known-bad
program once per process and says whether the verdicts can be trusted here.

`tests` are Python statements (MBPP's asserts) run after `code` and `setup` in the same namespace; with no tests,
a pass means the code ran to its end. Model-written code is hostile input, so each program runs:
  - in a fresh interpreter (`python -I -B`: no site-customisation from the environment, no bytecode written)
    with a scrubbed environment (PATH, HOME, TMPDIR, LANG only), in its own session and process group;
  - when the caller is root (as in this project's containers), under its own numeric uid/gid (one per parallel
    slot, no supplementary groups, PR_SET_NO_NEW_PRIVS), in new network, mount and pid namespaces: no network
    interface but a downed loopback, a private tmpfs for /tmp, /var/tmp and /dev/shm (its work dir /tmp/work
    vanishes with the namespace), / remounted read-only, and a pid-1 reaper whose exit makes the kernel kill
    every process the program left behind; RLIMIT_NPROC then counts only that slot's processes, which stops a
    fork bomb. What the program sees of the file system: / read-only, except that /tmp, /var/tmp and /dev/shm
    are fresh empty tmpfs (nothing other programs or users left there shows) and that directories the slot uid
    cannot traverse (a 0700 /root) are covered by an empty tmpfs. The interpreter's own files (sys.prefix,
    sys.base_prefix and every import-path directory: standard library, site-packages, .pth additions) stay
    visible, read-only, at their own paths wherever they live, since the program runs on that interpreter and
    may import from its site-packages; so a virtual environment in /tmp works, and nothing beside it shows;
  - otherwise in an unprivileged user + network namespace when the kernel allows it, else without namespaces,
    in a temporary directory the parent removes afterwards;
  - under rlimits on CPU time, address space, file size (which also caps stdout/stderr, written to unlinked
    files), open files, processes and core dumps, and a wall-clock timeout after which the parent kills the
    process group and every process of the slot uid;
  - under an audit hook (sys.addaudithook) that ends the program on network use, new processes, signals,
    writes or deletions outside the work dir and interpreter introspection (gc referrers, frames of other
    threads, tracing, ctypes, /proc/*/mem). `guard=False` drops the network/process/filesystem rules (never the
    introspection rules), to test that the OS layer alone contains a program.

Proof of a pass: the parent writes a fresh random nonce to the child's stdin (an unlinked file; never argv or
env). The child keeps it only inside the audit hook's closure and writes "NONCE PASS" to a private report fd
when every test's own code object has run to its last line. An early sys.exit(0) / os._exit(0), an exception
swallowed by atexit, a patched assert helper or a forged "PASS" print are therefore never a pass. Known limit:
a solution that returns objects whose __eq__ always answers True passes `assert f(x) == y` (that is reward
hacking of the tests, not a sandbox escape). The child reports its set-up ("NONCE READY" or "NONCE HARNESS
reason") on another unlinked file whose fd it closes before the program starts, so a program can neither fake a
harness error (which stops a run) nor hide one. Nothing here raises: every problem becomes a Verdict.
"""

from __future__ import annotations

import json
import math
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text()
_IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
_MAX_SLOTS = 64  # concurrent programs per caller process; each slot has its own uid
_SLOW_START = "sandbox: the child did not finish setting up within"


def _claim_uid_block() -> int:
    """First uid of a block of _MAX_SLOTS uids no other caller on this machine uses. A block is claimed by binding
    an abstract unix socket named after it, released by the kernel when this process ends (no file is left), so
    two callers never share uids: their NPROC counts and the kill of leftover processes by uid stay separate.
    Blocks stay inside the uids the kernel maps for us (a container may map only 65536)."""
    top = 1 << 31
    try:
        with open("/proc/self/uid_map") as f:
            top = max(int(a) + int(c) for a, _, c in (line.split() for line in f if line.strip()))
    except (OSError, ValueError):
        pass
    start, n_blocks = (200_000, 20_000) if top > 2_000_000 else (40_000, max(1, (min(top, 65_534) - 40_000) // 64))
    first = os.getpid() % n_blocks
    for k in range(n_blocks):
        base = start + ((first + k) % n_blocks) * _MAX_SLOTS
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(f"\0minisirev-sandbox-uid-{base}")
        except OSError:
            sock.close()
            continue
        _held_claims.append(sock)
        return base
    return start + first * _MAX_SLOTS


_held_claims: list[socket.socket] = []
_UID_BASE = _claim_uid_block() if _IS_ROOT else 0
_slots: queue.Queue[int] = queue.Queue()
for _i in range(_MAX_SLOTS):
    _slots.put(_UID_BASE + _i)


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass" | "fail" | "timeout" | "error" | "harness"
    reason: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def harness_error(self) -> bool:
        """True when the sandbox could not run the program at all (nothing is known about the program)."""
        return self.status == "harness"


def _read_head(f, limit: int) -> str:
    try:
        f.seek(0)
        data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    return text + ("...[truncated]" if len(data) > limit else "")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (escapees from the process group), until none is left."""
    for _ in range(100):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
                if int(uid_line.split()[1]) == uid:
                    found = True
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, StopIteration, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _signal_reason(sig: int, cpu_s: int, fsize_mb: int, memory_mb: int) -> tuple[str, str]:
    if sig == signal.SIGXCPU or sig == signal.SIGKILL:
        return "timeout", f"killed by {signal.Signals(sig).name} (CPU time limit {cpu_s}s or the kill at timeout)"
    if sig == signal.SIGXFSZ:
        return "error", f"killed by SIGXFSZ (file or output size limit {fsize_mb} MB)"
    if sig == signal.SIGSEGV:
        return "error", f"killed by SIGSEGV (often the address-space limit {memory_mb} MB)"
    return "error", f"killed by {_signal_name(sig)}"


def run_program(code: str, tests: list[str] | tuple[str, ...] = (), *, setup: str = "", timeout: float = 5.0,
                memory_mb: int = 512, cpu_s: int | None = None, fsize_mb: int = 16, nofile: int = 64,
                nproc: int = 32, output_bytes: int = 8192, namespaces: bool = True, guard: bool = True) -> Verdict:
    """Run `code`, then `setup`, then each statement of `tests`, in one isolated child; see the module docstring.

    timeout: wall-clock seconds; cpu_s: RLIMIT_CPU (default ceil(timeout) + 1); memory_mb: RLIMIT_AS;
    fsize_mb: RLIMIT_FSIZE (caps files and captured output); nofile / nproc: RLIMIT_NOFILE / RLIMIT_NPROC;
    output_bytes: how much of stdout/stderr the verdict keeps.
    """
    t0 = time.monotonic()
    for _ in range(2):  # a start-up that overran the time limit (a busy machine) is retried once
        try:
            uid = _slots.get(timeout=max(timeout, 1.0) * 10) if _IS_ROOT else None
        except queue.Empty:
            return Verdict("harness", "sandbox: no free execution slot after waiting "
                           f"{max(timeout, 1.0) * 10:g}s; fix: run fewer programs at once")
        try:
            v = _run(code, list(tests), setup, uid, timeout=timeout, memory_mb=memory_mb,
                     cpu_s=cpu_s or math.ceil(timeout) + 1, fsize_mb=fsize_mb, nofile=nofile, nproc=nproc,
                     output_bytes=output_bytes, namespaces=namespaces, guard=guard, t0=t0)
        except Exception as e:  # the caller never crashes on a program
            return Verdict("harness", f"sandbox: the parent side failed with {type(e).__name__}: {e}",
                           seconds=time.monotonic() - t0)
        finally:
            if uid is not None:
                _slots.put(uid)
        if not (v.harness_error and v.reason.startswith(_SLOW_START)):
            return v
    return v


def _run(code, tests, setup, uid, *, timeout, memory_mb, cpu_s, fsize_mb, nofile, nproc, output_bytes,
         namespaces, guard, t0) -> Verdict:
    if not isinstance(code, str) or not all(isinstance(t, str) for t in tests) or not isinstance(setup, str):
        return Verdict("error", "sandbox: code, tests and setup must be strings")
    private = tempfile.mkdtemp(prefix="minisirev-sbx-")  # 0700, ours: holds the work dir of unprivileged runs
    proc = None
    try:
        workdir = os.path.join(private, "work")
        os.mkdir(workdir, 0o700)
        if uid is not None:
            os.chmod(private, 0o711)
            os.chown(workdir, uid, uid)
        nonce = secrets.token_hex(16)
        files = {}
        for name in ("stdin", "stdout", "stderr", "report", "ready"):
            path = os.path.join(private, name)
            files[name] = open(path, "w+b")
            os.unlink(path)  # reachable only through the fd from now on
        payload = json.dumps({"code": code, "setup": setup, "tests": tests})
        files["stdin"].write(nonce.encode() + b"\n" + payload.encode("utf-8", "surrogatepass"))
        files["stdin"].flush()
        files["stdin"].seek(0)
        report_fd, ready_fd = files["report"].fileno(), files["ready"].fileno()
        cfg = {"uid": uid, "gid": uid, "workdir": workdir, "parent_pid": os.getpid(), "report_fd": report_fd,
               "ready_fd": ready_fd,
               "cpu_s": cpu_s, "memory_mb": memory_mb, "fsize_mb": fsize_mb, "nofile": nofile,
               "nproc": nproc if uid is not None else None, "namespaces": namespaces, "guard": guard,
               "tmpfs_mb": max(fsize_mb * 2, 16)}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", _CHILD_SOURCE, json.dumps(cfg)],
                                stdin=files["stdin"], stdout=files["stdout"], stderr=files["stderr"],
                                pass_fds=(report_fd, ready_fd), env=env, cwd=private, start_new_session=True,
                                close_fds=True)
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout + 1.0)  # + interpreter start-up and namespace set-up
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_all(proc, uid)
        rc = proc.wait()
        seconds = time.monotonic() - t0
        out = _read_head(files["stdout"], output_bytes)
        err = _read_head(files["stderr"], output_bytes)
        report = _read_head(files["report"], 1 << 16)
        tagged = [line[len(nonce) + 1:] for line in report.splitlines() if line.startswith(nonce + " ")]
        first = tagged[0] if tagged else None
        ready = [line[len(nonce) + 1:] for line in _read_head(files["ready"], 1 << 14).splitlines()
                 if line.startswith(nonce + " ")]

        def verdict(status, reason):
            return Verdict(status, reason, out, err, seconds)

        if not ready or ready[0] != "READY":  # the program never started: the harness failed, not the program
            if ready and ready[0].startswith("HARNESS "):
                return verdict("harness", "sandbox: " + ready[0][len("HARNESS "):])
            if timed_out:
                return verdict("harness", f"{_SLOW_START} {timeout + 1:g}s; fix: run fewer programs at once or "
                               "raise the timeout")
            sig = -rc if rc < 0 else rc - 128 if rc > 128 else None
            how = f"killed by {_signal_name(sig)}" if sig else f"exit code {rc}"
            tail = err.strip().splitlines()[-1] if err.strip() else "no message"
            return verdict("harness", f"sandbox: the child ended before running the program ({how}: {tail}); fix: "
                           f"check that {sys.executable} -I -B starts and imports json, ctypes and resource")
        if timed_out:
            return verdict("timeout", f"exceeded the {timeout:g}s wall-clock limit")
        if first == "PASS":
            return verdict("pass", "all tests ran") if rc == 0 else verdict("error", f"passed, then exit code {rc}")
        if first is not None:
            kind, _, reason = first.partition(" ")
            return verdict("fail" if kind == "FAIL" else "error", reason)
        sig = -rc if rc < 0 else rc - 128 if rc > 128 else None
        if sig:
            return verdict(*_signal_reason(sig, cpu_s, fsize_mb, memory_mb))
        if rc == 0:
            return verdict("fail", "exited with code 0 before the last test ran (no proof of a pass)")
        tail = err.strip().splitlines()[-1] if err.strip() else ""
        return verdict("error", f"exited with code {rc}" + (f": {tail}" if tail else ""))
    finally:
        if proc is not None and proc.poll() is None:
            _kill_all(proc, uid)
            proc.wait()
        for f in locals().get("files", {}).values():
            f.close()
        shutil.rmtree(private, ignore_errors=True)


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if uid is not None:
        _kill_uid(uid)


def run_many(programs, *, workers: int | None = None, **limits) -> list[Verdict]:
    """Run (code, tests, setup) triples (or (code, tests) pairs) in parallel, `workers` at a time (default: the
    CPU count, at most 16); verdicts in input order. `limits` are run_program's keyword arguments."""
    programs = [tuple(p) for p in programs]
    if not programs:
        return []
    workers = max(1, min(workers or min(os.cpu_count() or 1, 16), _MAX_SLOTS, len(programs)))

    def one(p):
        code, tests, setup = (tuple(p) + ((), ""))[:3]
        return run_program(code, tests, setup=setup or "", **limits)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, programs))


_isolation_cache: dict | None = None
_isolation_lock = threading.Lock()


def isolation() -> dict:
    """Which containment layers work here, found by running a probe program (cached)."""
    global _isolation_cache
    with _isolation_lock:
        if _isolation_cache is None:
            probe = ("import os, socket\n"
                     "u = os.getuid()\n"
                     "names = [n for _, n in socket.if_nameindex()]\n"
                     "print(u, os.getpid(), os.getcwd(), ','.join(names))\n")
            v = run_program(probe, guard=False)
            fields = v.stdout.split()
            _isolation_cache = {
                "root": _IS_ROOT, "probe": v.status, "uid": int(fields[0]) if fields else None,
                "pid_namespace": bool(fields) and fields[1] == "2",
                "private_tmp": bool(fields) and fields[2] == "/tmp/work",
                "net_interfaces": fields[3] if len(fields) > 3 else "",
            }
        return dict(_isolation_cache)


# A known-good and a known-bad program, run once per process before the first real one (self_test).
_SELF_TEST_CODE = ("import collections\nimport os\nimport sys\nfrom fractions import Fraction\n\n\n"
                   "def mode(xs):\n    return collections.Counter(xs).most_common(1)[0][0]\n")
_SELF_TEST_GOOD = ["assert mode([3, 1, 3, 2]) == 3", "assert Fraction(mode([1, 1, 2]), 2) == Fraction(1, 2)",
                   "assert all(os.path.isdir(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)))"]
_SELF_TEST_BAD = ["assert mode([3, 1, 3, 2]) == 3", "assert mode([1, 2, 2]) == 1"]
_self_test_cache: dict[tuple, str | None] = {}
_self_test_lock = threading.Lock()


def self_test(**limits) -> str | None:
    """Run a known-good and a known-bad program under `limits` (run_program's keyword arguments) and check that
    the first passes and the second fails, once per process and set of limits (the result is cached).

    Returns None when both verdicts are right, else one line naming the cause and the fix, e.g. "sandbox self-test
    failed: the known-good program could not be run: the interpreter's directory ... is not readable by the
    sandbox uid 40000; fix: chmod o+rx ...". A wrong verdict here means every verdict would be suspect, so the
    caller must stop rather than count programs as wrong."""
    key = (tuple(sorted(limits.items())), _IS_ROOT)
    with _self_test_lock:
        if key not in _self_test_cache:
            good, bad = run_many([(_SELF_TEST_CODE, _SELF_TEST_GOOD), (_SELF_TEST_CODE, _SELF_TEST_BAD)],
                                 workers=2, **limits)
            _self_test_cache[key] = _self_test_problem(good, bad, limits.get("timeout", 5.0))
        return _self_test_cache[key]


def _self_test_problem(good: Verdict, bad: Verdict, timeout: float) -> str | None:
    head = "sandbox self-test failed: "
    for name, v in (("known-good", good), ("known-bad", bad)):
        if v.harness_error:
            return head + f"the {name} program could not be run: " + v.reason.removeprefix("sandbox: ")
    if good.status == "timeout":
        return head + (f"a known-good program took longer than the {timeout:g}s limit ({good.reason}); fix: run "
                       "fewer programs at once (the machine is too busy) or raise the sandbox timeout")
    if not good.passed:
        return head + (f"a known-good program was judged '{good.status}' ({good.reason}); fix: the interpreter's "
                       f"files ({sys.prefix}, its standard library and site-packages) must be visible and readable "
                       "inside the sandbox: make them world-readable, or use an interpreter installed elsewhere")
    if bad.status != "fail":
        return head + (f"a known-bad program (a false assert) was judged '{bad.status}' ({bad.reason}); fix: none "
                       "from here, the sandbox's verdicts cannot be trusted on this machine (report it as a bug)")
    return None
