"""The child side of sandbox.py. The parent runs this file's source as `python -I -B -c SOURCE CONFIG_JSON` with
stdin an unlinked file holding one line with the nonce, then the JSON payload {"code", "setup", "tests"}.

Order of events in the child (running as root when the parent is root):
  1. PR_SET_PDEATHSIG: die with the parent. unshare(NEWNS | NEWNET | NEWPID) when privileged, else
     unshare(NEWUSER | NEWNET), else nothing; with a pid namespace the child forks a pid-1 reaper whose exit makes
     the kernel kill every process left in the namespace.
  2. With a mount namespace: tmpfs over /tmp, /var/tmp, /dev/shm (the private work dir is /tmp/work); when the
     Python prefix sits under a directory others cannot traverse (/root here), that directory is covered by an
     empty tmpfs and the prefix bound back at its own path, read-only; / remounted read-only.
  3. rlimits (CPU, address space, file size, open files, processes, no core), PR_SET_NO_NEW_PRIVS, drop to the
     slot uid/gid with no supplementary groups, chdir to the work dir, read stdin and replace it by /dev/null.
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
    """The first directory on the way to `path` that others cannot traverse, or None."""
    cur = ""
    for part in path.strip("/").split("/"):
        cur += "/" + part
        if not os.stat(cur).st_mode & 0o001:
            return cur
    return None


def _private_mounts(libc, cfg) -> str:
    """Private /tmp (work dir /tmp/work), read-only view of the Python prefix, read-only /; returns the work dir."""
    def mount(src, dst, fstype, flags, data):
        if libc.mount(src, dst, fstype, flags, data) != 0:
            raise OSError(f"mount {dst!r} failed")

    mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    size = f"size={cfg['tmpfs_mb']}m,mode=1777".encode()
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, size)
    # The sandbox uid must read the interpreter's prefix, which may sit under a directory it cannot traverse
    # (/root is 0700 here). Keep the prefix at its own path: bind it aside, cover the closed ancestor with an
    # empty tmpfs (hiding the rest of it), recreate the path and bind the prefix back, read-only.
    prefixes = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)})
    aside, covered = [], []
    for i, prefix in enumerate(prefixes):
        closed = _closed_ancestor(prefix)
        if closed is None:
            continue
        tmp = f"/tmp/.py{i}"
        os.mkdir(tmp)
        mount(prefix.encode(), tmp.encode(), None, MS_BIND | MS_REC, None)
        aside.append((tmp, prefix))
        if not any(closed == c or closed.startswith(c + "/") for c in covered):
            covered.append(closed)
    for closed in covered:
        mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755")
    for tmp, prefix in aside:
        os.makedirs(prefix, 0o755, exist_ok=True)
        mount(tmp.encode(), prefix.encode(), None, MS_BIND | MS_REC, None)
        mount(b"none", prefix.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
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
        except OSError as e:  # e.g. the uid is not mapped in this container: carry on with the guard only
            os.write(2, f"sandbox: could not switch to uid {cfg['uid']} ({e}); running with the guard only\n".encode())
        if os.getuid() == 0 and "mount" in isolation:
            os._exit(71)  # root with the prefix re-mounted: refuse rather than run as root
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"})

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
    report_fd = cfg["report_fd"]
    if sys.flags.optimize:
        os.write(report_fd, nonce + b" ERROR sandbox: interpreter runs with -O (asserts stripped)\n")
        os._exit(3)

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
