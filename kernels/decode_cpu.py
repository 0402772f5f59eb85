"""The sampler's decode attention on a CPU: kernels/decode_cpu.c, built on first use and called through ctypes.

    decode_attention(q, cache, layer, at, scale, window)  model.attention_shared's result, one C call per layer
    library(G, D)      the compiled kernel for G query heads per KV head and head dim D, or None (see why)
    why(G, D)          the reason library(G, D) is None ("" when it is not)

The C source is compiled with the system's C compiler ($CC, else cc, gcc or clang) once per (G, D) and per machine:
`-O3 -march=native -fopenmp`, falling back to fewer flags where one is refused (no OpenMP: one thread). The shared
library goes to $MINISIREV_CACHE/kernels (default ~/.cache/minisirev/kernels) under a name that hashes the source,
the compiler and the CPU's flags, so a later process loads it in milliseconds and a home directory shared between
different CPUs never runs code built for another. Compiling takes about half a second.

Where no compiler works, or MINISIREV_CPU_KERNELS=0, library() is None, generate warns once and the decode runs
model.attention_shared's matmuls instead (the same numbers up to float rounding; sampling 1.0-1.3x slower on the
2-core CPU, see docs/kernels.md)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_cpu.c")
FLAG_SETS = (  # tried in order: the first that compiles is used
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
    ["-O3", "-march=native", "-fno-math-errno"],  # a compiler without OpenMP (e.g. Apple clang): one thread
    ["-O3", "-fno-math-errno"],
)
_LIBS: dict[tuple[int, int], ctypes._CFuncPtr | None] = {}
_WHY: dict[tuple[int, int], str] = {}
_WARNED: list[bool] = []


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else the processor's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("MINISIREV_CACHE") or Path.home() / ".cache" / "minisirev"
    return Path(root) / "kernels"


def _build(G: int, D: int) -> Path:
    """Compile the kernel for (G, D) unless a matching build is cached -> the library's path. Raises RuntimeError
    with the compiler's last message when no flag set compiles."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(repr((source, cc, version, flags, G, D, _cpu_flags())).encode()).hexdigest()[:16]
        lib = _cache_dir() / f"decode_cpu_g{G}_d{D}_{key}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:  # build beside the target, then rename: atomic
            part = Path(tmp) / lib.name
            cmd = [cc, *flags, f"-DGROUP={G}", f"-DHEAD_DIM={D}", "-shared", "-fPIC", str(SOURCE), "-o", str(part),
                   "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(part, lib)
                return lib
            errors.append((done.stderr.strip().splitlines() or ["(no message)"])[-1])
    raise RuntimeError(f"{Path(cc).name} could not compile {SOURCE.name}: {errors[-1]}")


def library(G: int, D: int):
    """The C decode attention for (G, D) as a ctypes function, built or loaded once per process; None when it
    cannot be had (why(G, D) says why)."""
    if (G, D) not in _LIBS:
        fn = None
        if os.environ.get("MINISIREV_CPU_KERNELS", "1") == "0":
            _WHY[G, D] = "switched off by MINISIREV_CPU_KERNELS=0"
        else:
            try:
                fn = ctypes.CDLL(str(_build(G, D))).decode_attention
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _WHY[G, D] = str(e)
            else:
                p, i64 = ctypes.c_void_p, ctypes.c_int64
                fn.argtypes = [p, p, p, i64, i64, p, p, i64, i64, p, p, p, i64, i64, i64, i64, i64,
                               ctypes.c_float, p, ctypes.c_int]
                fn.restype = ctypes.c_int
        _LIBS[G, D] = fn
    return _LIBS[G, D]


def why(G: int, D: int) -> str:
    return _WHY.get((G, D), "")


def warn_if_missing(G: int, D: int):
    """One warning per process when the kernel was wanted but cannot be built (not when switched off)."""
    if library(G, D) is None and not _WARNED and "MINISIREV_CPU_KERNELS" not in why(G, D):
        _WARNED.append(True)
        warnings.warn(f"minisirev: the C decode attention is unavailable ({why(G, D)}); decoding with torch "
                      "matmuls (slower)", stacklevel=3)


def decode_attention(q: torch.Tensor, cache, layer: int, at, scale: float, window: int | None) -> torch.Tensor:
    """q [B, H, 1, D] fp32 on the CPU -> [B, H, 1, D]: model.attention_shared(q, cache, layer, at, scale) computed
    by the C kernel (which must be available: library(G, D) not None). The window, if any, is the model's
    sliding_window (at.bias already holds it for the matmul path)."""
    B, H, _, D = q.shape
    sh = at.sharing
    pk, pv = cache.prompts.k[layer], cache.prompts.v[layer]  # P_slots, KVH, Tp_max, D
    rk, rv = cache.rows.k[layer], cache.rows.v[layer]  # R, KVH, M, D
    KVH = rk.shape[1]
    for t in (pk, pv, rk, rv):
        if t.dtype != torch.float32 or (t.stride(-1), t.stride(-2), t.stride(0)) != (1, D, t.shape[1] * t.stride(1)):
            raise ValueError("decode_cpu wants fp32 caches with [slot, KVH, position, D] strides")
    q = q.contiguous()
    idx = [t.contiguous() for t in (sh.prompt[:B], sh.prompt_len[:B], at.pos[:B])]
    if any(t.dtype != torch.long for t in idx):
        raise ValueError("decode_cpu wants int64 prompt slots, prompt lengths and positions")
    out = torch.empty_like(q)
    failed = library(H // KVH, D)(
        q.data_ptr(), pk.data_ptr(), pv.data_ptr(), pk.stride(0), pk.stride(1),
        rk.data_ptr(), rv.data_ptr(), rk.stride(0), rk.stride(1),
        *(t.data_ptr() for t in idx), B, KVH, sh.prompt_keys, at.kv_len, window or 0, scale, out.data_ptr(),
        torch.get_num_threads())
    if failed:
        raise MemoryError("decode_cpu: no memory for the attention scratch lines")
    return out


def path_for(model) -> str:
    """Which decode attention generate runs for `model` (for benchmark tables): this kernel or the matmuls."""
    cfg, w = model.config, model.embed_tokens.weight
    G = cfg.n_heads // cfg.n_kv_heads
    if model.attn != "sdpa" or w.device.type != "cpu" or w.dtype != torch.float32:
        return "`attention_shared` matmuls"
    if library(G, cfg.head_dim) is None:
        return f"`attention_shared` matmuls (kernels/decode_cpu.c unavailable: {why(G, cfg.head_dim)})"
    return "kernels/decode_cpu.c"
