"""Provenance: what produced an iteration, recorded so that a rerun can be checked against it.

    sha256_file(path)           sha256 of a file's bytes, read in 1 MiB chunks (multi-GB shards never sit in memory)
    sha256_tree(dir)            sha256 of the text "<sha256 of file>  <relative path>\\n" over every file, sorted by
                                relative path: the output of
                                  (cd DIR && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum)
                                piped into sha256sum, so anyone can check a checkpoint directory with coreutils
    git_commit()                {"commit", "dirty"} of the kit's own checkout, or None (not a checkout, no git)
    package_versions()          installed versions of the packages results depend on (None: not installed)
    device_name(device)         the GPU's name for a CUDA device, else the CPU model and vector extension
    iteration_provenance(...)   one iteration's record: hashed files, verifier, seeds, sampling, code, environment
    check_provenance(rec, cur)  the differences between a recorded and a current record, one line each

Nothing here raises on a missing git, package or /proc file: provenance is best effort, a run never fails over it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PACKAGES = ("torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "math-verify")
CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_tree(path: str | Path, suffixes: tuple[str, ...] | None = None) -> str:
    """sha256 of a directory (see the module docstring); `suffixes` keeps only files ending in one of them."""
    root = Path(path)
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                   if p.is_file() and (suffixes is None or p.name.endswith(suffixes)))
    listing = "".join(f"{sha256_file(p)}  {rel}\n" for rel, p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256_file for a file, sha256_tree for a directory; FileNotFoundError names the path otherwise."""
    p = Path(path)
    if p.is_dir():
        return sha256_tree(p)
    if p.is_file():
        return sha256_file(p)
    raise FileNotFoundError(f"provenance: {p} is neither a file nor a directory")


def git_commit(root: str | Path = REPO_ROOT) -> dict | None:
    """{"commit": HEAD's sha, "dirty": uncommitted changes to tracked files} when `root` is the top of a git
    checkout (an installed copy inside some other repository does not count), else None."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
            return None
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, a hung git
        return None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its widest vector extension, e.g. "AMD EPYC (AVX2)": a hypervisor often shows only
    a vendor and family name, and machines of one name then differ by twice in fp32 throughput (AVX-512 or not).
    cpuinfo: the text of /proc/cpuinfo (default: read it; none on macOS or Windows)."""
    name, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not name:
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"))
                if flag in flags), None)
    return f"{name} ({isa})" if isa else name


def device_name(device: Any = None) -> str:
    """The GPU's name when `device` is a CUDA device (torch.device or "cuda:1"), else the CPU model."""
    if device is not None and str(device).startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(device))
        except Exception as e:  # no CUDA build or no such device: say so rather than fail
            return f"{device} (name unavailable: {type(e).__name__})"
    return _cpu_model()


def verifier_version(task_name: str) -> dict:
    """The verifier's identity: the task's name and the sha256 of every .py file of minisirev/tasks (the verdict
    code and everything it imports), plus math-verify's version when it is installed."""
    return {"task": task_name, "code_sha256": sha256_tree(TASKS_DIR, suffixes=(".py",)),
            "math-verify": package_versions(("math-verify",))["math-verify"]}


def environment(device: Any = None) -> dict:
    return {"git": git_commit(), "packages": package_versions(), "python": platform.python_version(),
            "platform": platform.platform(), "device": device_name(device)}


def _file_entry(value: Any) -> dict | None:
    if value is None:
        return None
    if isinstance(value, dict) and "sha256" in value:  # already hashed (e.g. the previous iteration's model)
        return dict(value)
    return {"path": str(value), "sha256": sha256_path(value)}


def iteration_provenance(*, iter: int, files: dict[str, Any] | None = None, verifier: dict | None = None,
                         seeds: dict | None = None, sampling: dict | None = None, device: Any = None,
                         **extra: Any) -> dict:
    """One iteration's provenance record (plain JSON):

        {"iter", "files": {name: {"path", "sha256"} or None}, "verifier", "seeds", "sampling",
         "git", "packages", "python", "platform", "device", **extra}

    `files` maps names to paths (hashed here: a file or a checkpoint directory) or to an entry already hashed,
    such as the previous record's {"path", "sha256"} of the same checkpoint, so no checkpoint is hashed twice.
    Suggested names: "start_model" (the weights M_t started from), "ref_model" (DPO's reference), "train_data",
    "samples", "model" (the weights M_t is). `verifier` is verifier_version(task); `seeds` and `sampling` are
    small dicts of the settings used (seed, n, temperature, top_p, top_k, max_new_tokens).
    """
    return {"iter": iter, "files": {k: _file_entry(v) for k, v in (files or {}).items()}, "verifier": verifier,
            "seeds": seeds, "sampling": sampling, **environment(device), **extra}


def check_provenance(recorded: dict, current: dict, *, ignore: tuple[str, ...] = ("path",)) -> list[str]:
    """The differences between two records, one line each: "files.train_data.sha256: recorded X, now Y".

    Keys are compared recursively; a key present on one side only is a difference ("absent" on the other). Keys
    named in `ignore` are skipped at any depth; by default "path", since a rerun elsewhere has other paths but
    must have the same hashes. An empty list means the rerun matches the record.
    """
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if k in ignore:
                    continue
                name = f"{where}.{k}" if where else str(k)
                if k not in a:
                    out.append(f"{name}: absent in the record, now {b[k]!r}")
                elif k not in b:
                    out.append(f"{name}: recorded {a[k]!r}, now absent")
                else:
                    walk(a[k], b[k], name)
        elif a != b:
            out.append(f"{where or 'record'}: recorded {a!r}, now {b!r}")

    walk(recorded, current, "")
    return out
