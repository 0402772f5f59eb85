"""The child side of sandbox.py. The parent runs this file's source as `python -I -B -c SOURCE CONFIG_JSON` with
stdin an unlinked file holding one line with the nonce, then the JSON payload {"code", "setup", "tests"}, and two
more unlinked files open as fds: `ready_fd` (set-up outcome) and `report_fd` (the program's outcome).

Order of events in the child (running as root when the parent is root):
  0. PR_SET_PDEATHSIG: die with the parent. Read stdin (nonce and payload), replace it by /dev/null.
  1. unshare(NEWNS | NEWNET | NEWPID) when privileged, else unshare(NEWUSER | NEWNET), else nothing; with a pid
     namespace the child forks a pid-1 reaper whose exit makes the kernel kill every process left in it.
  2. With a mount namespace: a fresh tmpfs over /tmp, /var/tmp, /dev/shm (the work dir is /tmp/work); the
     interpreter's own files (prefixes and import path: standard library, site-packages) stay visible read-only
     at their own paths even when they live under one of those dirs (a virtual environment in /tmp) or under a
     directory the slot uid cannot traverse (/root here, covered by an empty tmpfs); / remounted read-only.
  3. rlimits (CPU, address space, file size, open files, processes, no core), PR_SET_NO_NEW_PRIVS, drop to the
     slot uid/gid with no supplementary groups, check that the interpreter's directories are readable by it,
     chdir to the work dir.
     Steps 1-3 are the harness: if any fails, "NONCE HARNESS reason" goes to ready_fd and no code runs. When they
     succeed, "NONCE READY" goes there and ready_fd is closed, so the program can neither fake nor erase it, and
     the parent can tell "the harness could not run the program" from "the program failed".
  4. Install the audit hook (guard). The nonce lives only in the hook's closure; the hook writes "NONCE PASS" to
     the report fd only when every test's own code object has reached its last line (each test is compiled with
     a trailing `sys.audit("minisirev.step", i)` and the hook checks the calling frame's code object by identity).
     Forbidden events (network, new processes, signals to others, writes outside the work dir, interpreter
     introspection that could reach the nonce) end the process at once with "NONCE ERROR reason": the hook never
     raises and never calls user-controllable code, so its frame is never exposed.
  5. exec the code, the setup code and each test in one namespace; report "NONCE FAIL ..." or "NONCE ERROR ..."
     through the hook; flush and os._exit.
Nothing outside the standard library is imported, and this file is never imported by the child (it is sent as
source), so it must not rely on the repository being readable.
"""

import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

NETWORK = frozenset({"socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
                     "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg"})
PROCESSES = frozenset({"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                       "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.setsid",
                       "os.setpgid"})
INTROSPECTION = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                           "sys.settrace", "sys.setprofile", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
                           "ctypes.call_function", "ctypes.string_at", "ctypes.wstring_at", "ctypes.addressof",
                           "ctypes.create_string_buffer", "ctypes.set_errno"})
PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.utime": 1,
               "os.truncate": 1, "shutil.rmtree": 1, "os.rename": 2, "os.symlink": 0, "os.link": 0,
               "os.chflags": 1, "os.lchflags": 1, "os.mkfifo": 1, "os.mknod": 1, "os.setxattr": 1,
               "os.removexattr": 1}
PRELOAD = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string", "operator", "copy",
           "random", "statistics", "fractions", "decimal", "datetime", "typing", "array", "cmath", "json",
           "dataclasses", "encodings.idna", "textwrap", "unicodedata", "calendar", "numbers", "hashlib")
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # each gets a fresh tmpfs
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _status_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _fork_init(libc) -> None:
    """Outer child -> pid 1 (reaper) -> pid 2 (worker); returns only in the worker."""
    pid = os.fork()
    if pid:  # outer child, in the caller's pid namespace: mirror pid 1's exit code
        os._exit(_status_code(os.waitpid(pid, 0)[1]))
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    pid = os.fork()
    if pid:  # pid 1: reap everything; when the worker ends, exit, and the kernel kills the rest of the namespace
        while True:
            try:
                p, status = os.wait()
            except ChildProcessError:
                os._exit(70)
            if p == pid:
                os._exit(_status_code(status))
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _closed_ancestor(path: str) -> str | None:
    """The first directory on the way to `path` (itself included) that others cannot traverse, or None."""
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _outermost(paths) -> list[str]:
    """The paths that lie inside no other one of them (sorted, so a parent comes before its children)."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(_within(p, q) for q in out):
            out.append(p)
    return out


def _interpreter_paths() -> list[str]:
    """What the interpreter itself reads: its prefixes and its import path (standard library, lib-dynload,
    site-packages, directories added by .pth files), each as written and resolved, existing ones only."""
    found = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path):
        if isinstance(p, str) and p:
            p = os.path.abspath(p)
            found |= {q for q in (p, os.path.realpath(p)) if os.path.exists(q)}
    return sorted(found)


class HarnessFailure(Exception):
    """The sandbox could not be set up; the message names the cause and the fix."""


def _private_mounts(libc, cfg) -> str:
    """Private tmpfs on /tmp, /var/tmp, /dev/shm; the interpreter's files visible read-only at their own paths;
    / remounted read-only. Returns the work dir.

    An interpreter path can be hidden in two ways: it lies under one of the private tmpfs dirs (a virtual
    environment in /tmp), or under a directory the sandbox uid cannot traverse (/root is 0700), which is covered
    by an empty tmpfs so that nothing else in it shows. Each such path is opened (O_PATH) before any cover goes
    on; afterwards its own path is recreated inside the cover and the open directory is bind-mounted there
    through /proc/self/fd, read-only, so exactly that directory, and nothing beside it, is visible again."""
    def mount(src, dst, fstype, flags, data):
        if libc.mount(src, dst, fstype, flags, data) != 0:
            import ctypes

            raise HarnessFailure(f"mount on {dst.decode()} failed ({os.strerror(ctypes.get_errno())}); fix: run "
                                 "as root in a container that allows mount namespaces, or as a non-root user")

    os.umask(0o022)
    mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    private = [d for d in PRIVATE_DIRS if os.path.isdir(d)]
    keep = _interpreter_paths()
    for p in keep:
        if p in private:
            raise HarnessFailure(f"the interpreter's directory {p} would be replaced by the sandbox's private "
                                 "tmpfs; fix: use an interpreter installed elsewhere")
    closed = [c for c in (_closed_ancestor(p) for p in keep if not any(_within(p, d) for d in private))
              if c is not None and c not in keep]  # a closed path itself stays closed: reported after the uid drop
    covers = _outermost(private + closed)
    rebind = _outermost(p for p in keep if any(_within(p, c) and p != c for c in covers))
    fds = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in rebind}
    size = f"size={cfg['tmpfs_mb']}m,mode=1777".encode()
    for c in covers:
        mount(b"tmpfs", c.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size if c in private else b"size=1m,mode=0755")
    for p, fd in fds.items():
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(p, 0o755, exist_ok=True)
        else:  # a zip archive on the import path
            os.makedirs(os.path.dirname(p), 0o755, exist_ok=True)
            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(f"/proc/self/fd/{fd}".encode(), p.encode(), None, MS_BIND | MS_REC, None)
        mount(b"none", p.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        os.close(fd)
    os.mkdir("/tmp/work", 0o700)
    os.chown("/tmp/work", cfg["uid"], cfg["gid"])
    libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)  # best effort
    return "/tmp/work"


def _make_guard(nonce: bytes, report_fd: int, codes: tuple, workdir: str, guard: bool):
    """The audit hook. Only C functions captured here and operations on exact str/int/bytes run inside it."""
    write, exit_, getcwd, getframe = os.write, os._exit, os.getcwd, sys._getframe
    str_, bytes_, int_, type_, len_ = str, bytes, int, type, len
    blocked = INTROSPECTION | (NETWORK | PROCESSES if guard else frozenset())
    n_tests, done = len(codes), set()
    state = [False]  # [passed]

    def emit(kind: str, text: str) -> None:
        write(report_fd, nonce + b" " + (kind + " " + text[:2000].replace("\n", " | ")).encode("utf-8", "replace")
              + b"\n")

    def die(text: str) -> None:
        emit("ERROR", "sandbox: " + text)
        exit_(3)

    def norm(path):
        if type_(path) is int_:
            return None  # an fd: the OS decides
        if type_(path) is bytes_:
            path = path.decode("utf-8", "surrogateescape")
        if type_(path) is not str_:
            die("unusual path object " + type_(path).__name__ + " (use str paths)")
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        parts = []
        for c in path.split("/"):
            if c == "" or c == ".":
                continue
            if c == "..":
                if parts:
                    parts.pop()
            else:
                parts.append(c)
        return "/" + "/".join(parts)

    def inside(p):
        return p is None or p == workdir or p.startswith(workdir + "/") or p == "/dev/null"

    def hook(event, args):
        try:
            if type_(event) is not str_:  # a str subclass could run user code in its __eq__
                return
            if event == "minisirev.step":
                i = args[0]
                if type_(i) is int_ and 0 <= i < n_tests and getframe(1).f_code is codes[i] and not state[0]:
                    done.add(i)
                    if len_(done) == n_tests:
                        state[0] = True
                        write(report_fd, nonce + b" PASS\n")
                return
            if event == "minisirev.report":
                if not state[0] and len_(args) == 2 and type_(args[0]) is str_ and type_(args[1]) is str_ \
                        and (args[0] == "FAIL" or args[0] == "ERROR"):
                    emit(args[0], args[1])
                return
            if event == "sys._getframe" or event == "object.__getattr__":
                return
            if event in blocked:
                die("forbidden operation " + event)
            if event == "open":
                p = norm(args[0])
                if p is not None and p.startswith("/proc/") and ("/mem" in p or "/map_files" in p or "/pagemap" in p):
                    die("forbidden read of process memory " + p)
                mode, flags = args[1], args[2]
                wants_write = (type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) \
                    or (type_(flags) is int_ and flags & WRITE_FLAGS)
                if guard and wants_write and not inside(p):
                    die("write outside the work directory: " + p)
                return
            if guard and event in PATH_EVENTS:
                k = PATH_EVENTS[event]
                if k == 0:
                    die("forbidden operation " + event)
                for a in args[:k]:
                    p = norm(a)
                    if not inside(p):
                        die(event + " outside the work directory: " + p)
        except BaseException:  # never let an exception (and with it this frame) reach user code
            exit_(4)

    return hook


def _prepare(libc, cfg) -> str:
    """Steps 1-3 of the module docstring; returns the work dir. Raises HarnessFailure (or any exception) when the
    sandbox cannot be set up: no program has run yet, so that is the harness's fault, never the program's."""
    isolation = []
    privileged = os.geteuid() == 0 and cfg["uid"] is not None
    if cfg["namespaces"] and privileged:
        if libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID) == 0:
            isolation += ["net", "mount", "pid"]
        elif libc.unshare(CLONE_NEWNET) == 0:
            isolation += ["net"]
    elif cfg["namespaces"] and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        isolation += ["user", "net"]
    if "pid" in isolation:
        _fork_init(libc)
    workdir = _private_mounts(libc, cfg) if "mount" in isolation else cfg["workdir"]

    cpu = cfg["cpu_s"]
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (cfg["memory_mb"] << 20,) * 2),
              (resource.RLIMIT_FSIZE, (cfg["fsize_mb"] << 20,) * 2), (resource.RLIMIT_NOFILE, (cfg["nofile"],) * 2),
              (resource.RLIMIT_CORE, (0, 0))]
    if privileged or cfg["nproc"] is not None:
        limits.append((resource.RLIMIT_NPROC, (cfg["nproc"],) * 2))
    for res, lim in limits:
        resource.setrlimit(res, lim)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if privileged and "mount" not in isolation and _closed_ancestor(os.path.realpath(sys.prefix)):
        # the dropped uid will not be able to read the standard library: import the usual modules now
        for name in PRELOAD:
            try:
                __import__(name)
            except ImportError:
                pass
    if privileged:
        try:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        except OSError as e:  # e.g. the uid is not mapped in this container
            if "mount" in isolation:  # never run as root with the interpreter's files re-mounted
                raise HarnessFailure(f"could not switch to uid {cfg['uid']} ({e.strerror}); fix: run in a "
                                     "container whose user namespace maps that uid, or as a non-root user") from None
            os.write(2, f"sandbox: could not switch to uid {cfg['uid']} ({e}); running with the guard only\n".encode())
    if "mount" in isolation:  # the re-mounted interpreter must be usable by the slot uid
        for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.__file__)):
            try:
                os.stat(p)
            except FileNotFoundError:
                raise HarnessFailure(f"the interpreter's directory {p} is not visible inside the sandbox (hidden by "
                                     "its private mounts); fix: use an interpreter outside /tmp, /var/tmp and "
                                     "/dev/shm until the sandbox's mounts are fixed") from None
            except OSError:
                pass  # not traversable: the access check below says so
            if not os.access(p, os.R_OK | os.X_OK):
                raise HarnessFailure(f"the interpreter's directory {p} is not readable by the sandbox uid "
                                     f"{os.getuid()}; fix: chmod o+rx {p} and its parents (o+r on its files), or "
                                     "use an interpreter installed with world-readable files")
    if sys.flags.optimize:
        raise HarnessFailure("the interpreter runs with -O, which strips assert statements; fix: start it without -O")
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})
    return workdir


def main() -> None:
    cfg = json.loads(sys.argv[1])
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for fn in ("prctl", "unshare", "mount"):  # Linux only; elsewhere every such call reports failure
        if not hasattr(libc, fn):
            setattr(libc, fn, lambda *a: -1)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(70)  # the parent died before prctl took effect
    data = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        data += chunk
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    nonce, payload = data.split(b"\n", 1)
    del data
    payload = json.loads(payload)
    report_fd, ready_fd = cfg["report_fd"], cfg["ready_fd"]
    try:
        workdir = _prepare(libc, cfg)
    except BaseException as e:
        text = str(e) if isinstance(e, HarnessFailure) else f"set-up failed with {type(e).__name__}: {e}"
        os.write(ready_fd, nonce + b" HARNESS " + text.replace("\n", " | ").encode("utf-8", "replace") + b"\n")
        os._exit(72)
    # from here on, whatever goes wrong is the program's doing; the fd closes so that the program cannot touch it
    os.write(ready_fd, nonce + b" READY\n")
    os.close(ready_fd)

    tests = payload["tests"] or []
    step = "\n__import__('sys').audit('minisirev.step', {})\n"
    try:
        code = compile(payload["code"] + ("" if tests else step.format(0)), "<solution>", "exec", optimize=0)
        setup = compile(payload["setup"] or "", "<setup>", "exec", optimize=0)
        test_codes = tuple(compile(t + step.format(i), f"<test {i}>", "exec", optimize=0) for i, t in enumerate(tests))
    except SyntaxError as e:
        os.write(report_fd, nonce + f" ERROR SyntaxError: {e.msg} (line {e.lineno})\n".encode())
        os._exit(1)
    hook = _make_guard(nonce, report_fd, test_codes if tests else (code,), workdir, cfg["guard"])
    sys.addaudithook(hook)
    del hook, nonce, ctypes, libc
    # bind what the harness uses after user code runs: the program may rebind builtins (proof of a pass does not
    # depend on these, only the quality of the reasons does)
    run, audit = exec, sys.audit
    AssertionError_, SystemExit_, MemoryError_, RecursionError_, BaseException_ = (
        AssertionError, SystemExit, MemoryError, RecursionError, BaseException)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    stage = "solution"
    try:
        run(code, namespace)
        stage = "setup"
        run(setup, namespace)
        for i, t in enumerate(test_codes):
            stage = f"test {i}"
            run(t, namespace)
    except AssertionError_:
        where = f"{stage}: {tests[int(stage[5:])]}" if stage.startswith("test ") else stage
        audit("minisirev.report", "FAIL", f"assertion failed in {where}")
    except SystemExit_ as e:
        audit("minisirev.report", "FAIL", f"the program exited (SystemExit {_safe(e.code)}) during {stage}")
    except MemoryError_:
        audit("minisirev.report", "ERROR", f"MemoryError (limit {cfg['memory_mb']} MB) during {stage}")
    except RecursionError_:
        audit("minisirev.report", "ERROR", f"RecursionError during {stage}")
    except BaseException_ as e:
        kind = "FAIL" if stage.startswith("test") else "ERROR"
        audit("minisirev.report", kind, f"{type(e).__name__}: {_safe(e)} during {stage}")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)


def _safe(obj) -> str:
    """str(obj) for a reason message; user code may make __str__ raise or loop, so guard it."""
    try:
        s = str(obj)
        return s if type(s) is str else "?"
    except BaseException:
        return "?"


if __name__ == "__main__":
    main()
