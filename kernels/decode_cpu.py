"""The sampler's decode step on a CPU: torch's matmuls with kernels/decode_cpu.c between them, through ctypes.

    Decoder(model)     generate's decode step for `model` (sampler.decode_step's logits, up to float rounding):
                       per layer RMSNorm (C), the q|k|v matmul, RoPE + cache write + attention (C), the output
                       projection with the residual added inside the GEMM, RMSNorm (C), the gate|up matmul,
                       SiLU * up (C), the down projection plus the residual: 4 C calls and 4 matmuls per layer
    Decoder.prefill    generate's prefill for `model`: a chunk's prompt tokens as one flat batch (no padding), the
                       same layers with prefill_layer_attention (C: RoPE, keys and values written to the prompt
                       slots, causal attention over each prompt)
    Linear(w)          one of those matmuls (kernels/packed_linear.py): oneDNN's GEMM on w packed once
    layer_weights(model)   the weights as a Decoder holds them (bench/sampler_models.py times the same Linears)
    usable(model)      whether generate decodes `model` with a Decoder: a CPU, fp32, attn "sdpa", the library built
    layer_attention, rms_norm, silu_mul   the C functions on tensors (what the Decoder calls; tests use them)
    library(G, D)      the compiled library for G query heads per KV head and head dim D, or None (see why)
    why(G, D)          the reason library(G, D) is None ("" when it is not)

The Decoder holds a copy of each layer's q, k, v weights concatenated (and gate, up): one matmul each instead of
three and two. It is built once per generate call (the weights cannot change during one).

Its matmuls are kernels/packed_linear.py's `Linear`s: oneDNN's GEMM on weights packed once into oneDNN's blocked
layout where torch ships oneDNN, torch.mm where it does not or where the batch is under PACKED_MIN_ROWS rows. On the
2-core AMD EPYC (Zen 5) of bench/results/ the packed GEMM runs 1.9-2.8x faster than torch.mm (MKL) at 256 rows,
and within float rounding of it.

The C source is compiled with the system's C compiler ($CC, else cc, gcc or clang) once per (G, D) and per machine:
`-O3 -march=native -fopenmp`, falling back to fewer flags where one is refused (no OpenMP: one thread). The shared
library goes to $MINISIREV_CACHE/kernels (default ~/.cache/minisirev/kernels) under a name that hashes the source,
the compiler and the CPU's flags, so a later process loads it in milliseconds and a home directory shared between
different CPUs never runs code built for another. Compiling takes about half a second. With torch's own OpenMP
runtime already loaded (libgomp.so.1 in torch's wheel), the library binds to it: one thread pool for both.

Where no compiler works, or MINISIREV_CPU_KERNELS=0, library() is None, generate warns once (not when switched off)
and decodes with the model's own layers (model.attention_shared's matmuls; the same numbers up to float rounding,
slower: see docs/kernels.md).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from kernels.packed_linear import Linear, packed

SOURCE = Path(__file__).with_name("decode_cpu.c")
FLAG_SETS = (  # tried in order: the first that compiles is used
    ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math"],  # no OpenMP (e.g. Apple clang): one thread
    ["-O3", "-fno-math-errno", "-fno-trapping-math"],
)
_LIBS: dict[tuple[int, int], ctypes.CDLL | None] = {}
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


def library(G: int, D: int) -> ctypes.CDLL | None:
    """The C library for (G, D) with its functions' signatures set, built or loaded once per process; None when it
    cannot be had (why(G, D) says why)."""
    if (G, D) not in _LIBS:
        lib = None
        if os.environ.get("MINISIREV_CPU_KERNELS", "1") == "0":
            _WHY[G, D] = "switched off by MINISIREV_CPU_KERNELS=0"
        else:
            try:
                lib = ctypes.CDLL(str(_build(G, D)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _WHY[G, D] = str(e)
            else:
                p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
                lib.decode_layer_attention.argtypes = [p, p, p, p, p, i64, i64, p, p, i64, i64, p, p, p,
                                                       i64, i64, i64, i64, i64, f32, p, i32]
                lib.decode_layer_attention.restype = i32
                lib.prefill_layer_attention.argtypes = [p, p, p, p, p, i64, i64, p, p, i64, i64, i64, i64, f32, p,
                                                        i32]
                lib.prefill_layer_attention.restype = i32
                lib.rms_norm.argtypes = [p, p, i64, i64, f32, p, i32]
                lib.rms_norm.restype = None
                lib.silu_mul.argtypes = [p, i64, i64, p, i32]
                lib.silu_mul.restype = None
                lib.sample_top_p.argtypes = [p, i64, i64, f32, ctypes.c_double, p, p, p, i32]
                lib.sample_top_p.restype = i32
        _LIBS[G, D] = lib
    return _LIBS[G, D]


def why(G: int, D: int) -> str:
    return _WHY.get((G, D), "")


def warn_if_missing(G: int, D: int):
    """One warning per process when the library was wanted but cannot be built (not when switched off)."""
    if library(G, D) is None and not _WARNED and "MINISIREV_CPU_KERNELS" not in why(G, D):
        _WARNED.append(True)
        warnings.warn(f"minisirev: the C decode step is unavailable ({why(G, D)}); decoding with the model's torch "
                      "layers (slower)", stacklevel=3)


def _group(model) -> tuple[int, int]:
    cfg = model.config
    return cfg.n_heads // cfg.n_kv_heads, cfg.head_dim


def usable(model) -> bool:
    """Whether generate decodes `model` with a Decoder: attn "sdpa" ("ref" keeps the model's own layers, the
    teaching path), on a CPU, in fp32, and the library built for its shape (if not, one warning)."""
    w = model.embed_tokens.weight
    if model.attn != "sdpa" or w.device.type != "cpu" or w.dtype != torch.float32:
        return False
    if library(*_group(model)) is None:
        warn_if_missing(*_group(model))
        return False
    return True


def path_for(model) -> str:
    """Which decode step generate runs for `model` (for benchmark tables)."""
    if usable(model):
        onednn = packed(model.output_weight) is not None
        return ("kernels/decode_cpu.c between " + ("oneDNN packed" if onednn else "torch") +
                " matmuls (decode_cpu.Decoder)")
    reason = why(*_group(model))
    return "the model's torch layers" + (f" (kernels/decode_cpu.c unavailable: {reason})" if reason else "")


# ---- the C functions on tensors -------------------------------------------------------------------------------

def _check_cache(cache):
    """The layout the C code indexes: fp32 caches [L, slots, KVH, positions, D], contiguous."""
    for t in (cache.prompts.k, cache.prompts.v, cache.rows.k, cache.rows.v):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("decode_cpu wants contiguous fp32 CPU caches [L, slots, KVH, positions, D]")


def _long(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.long or not t.is_contiguous():
        raise ValueError("decode_cpu wants contiguous int64 positions, prompt slots and prompt lengths")
    return t


def layer_attention(qkv: torch.Tensor, cache, layer: int, pos: torch.Tensor, sharing, kv_len: int,
                    cos: torch.Tensor, sin: torch.Tensor, scale: float, window: int | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """qkv [B, (H + 2 KVH) D] (q, k, v projections of one token per row, before RoPE) -> attention output
    [B, H * D]; writes the rotated key and the value of row b at its own-key index pos[b] - prompt_len[b] of
    `layer`. The same as model.py's apply_rope, PrefixCache write and attention_shared (rows 0 .. B-1 of the cache;
    sharing's prompt slots, prompt lengths and prompt_keys; own keys 0 .. kv_len - 1). cos, sin: model.rope_tables
    [positions, D/2]."""
    B = qkv.shape[0]
    rk = cache.rows.k[layer]
    KVH, D = rk.shape[1], rk.shape[-1]
    G = (qkv.shape[1] // D - 2 * KVH) // KVH
    _check_cache(cache)
    if qkv.dtype != torch.float32 or not qkv.is_contiguous() or qkv.shape[1] != (G + 2) * KVH * D:
        raise ValueError(f"decode_cpu wants a contiguous fp32 qkv [B, (H + 2 KVH) D], got {tuple(qkv.shape)}")
    out = torch.empty(B, G * KVH * D) if out is None else out
    idx = [_long(t[:B]) for t in (sharing.prompt, sharing.prompt_len, pos)]
    _attend(library(G, D), qkv, cos, sin, _layer_ptrs(cache, layer), idx, KVH, sharing.prompt_keys, kv_len,
            window, scale, out)
    return out


def _layer_ptrs(cache, layer: int) -> tuple[int, ...]:
    pk, pv, rk, rv = (t[layer] for t in (cache.prompts.k, cache.prompts.v, cache.rows.k, cache.rows.v))
    return pk.data_ptr(), pv.data_ptr(), pk.stride(0), pk.stride(1), rk.data_ptr(), rv.data_ptr(), rk.stride(0), \
        rk.stride(1)


def _attend(lib, qkv, cos, sin, ptrs, idx, KVH, Tp, S, window, scale, out):
    failed = lib.decode_layer_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), *ptrs,
                                        *(t.data_ptr() for t in idx), qkv.shape[0], KVH, Tp, S, window or 0, scale,
                                        out.data_ptr(), torch.get_num_threads())
    if failed:
        raise MemoryError("decode_cpu: no memory for the attention scratch lines")


def _attend_prefill(lib, qkv, cos, sin, ptrs, slot, pos, KVH, Tp, window, scale, out):
    failed = lib.prefill_layer_attention(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), *ptrs, slot.data_ptr(),
                                         pos.data_ptr(), qkv.shape[0], KVH, Tp, window or 0, scale, out.data_ptr(),
                                         torch.get_num_threads())
    if failed:
        raise MemoryError("decode_cpu: no memory for the attention scratch lines")


def _any_library() -> ctypes.CDLL:
    """A built library (rms_norm and silu_mul do not depend on G and D)."""
    lib = next((lib for lib in _LIBS.values() if lib is not None), None) or library(1, 8)
    if lib is None:
        raise RuntimeError(f"decode_cpu: no library: {why(1, 8)}")
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, C] fp32 contiguous -> weight * x / sqrt(mean(x^2) + eps) (model.RMSNorm)."""
    out = torch.empty_like(x) if out is None else out
    lib = _any_library()
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1], eps, out.data_ptr(),
                 torch.get_num_threads())
    return out


def silu_mul(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """h [B, 2F] fp32 contiguous (gate, then up) -> silu(gate) * up [B, F] (model.MLP's product)."""
    B, F2 = h.shape
    out = h.new_empty(B, F2 // 2) if out is None else out
    lib = _any_library()
    lib.silu_mul(h.data_ptr(), B, F2 // 2, out.data_ptr(), torch.get_num_threads())
    return out


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor, logprobs: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [B, V] fp32, uniforms u [B] fp64 -> (token [B], raw log-prob [B] or None): sampler.nucleus with top-k
    off, then sampler.sample(probs, u=u) (the same kept set and draw up to float rounding of the softmax), and
    log_softmax(logits)[token]. One C pass per row, no sort of the whole vocabulary unless its nucleus needs it."""
    logits, u = logits.float().contiguous(), u.double().contiguous()
    B, V = logits.shape
    token = torch.empty(B, dtype=torch.long)
    lp = torch.empty(B) if logprobs else None
    failed = _any_library().sample_top_p(logits.data_ptr(), B, V, temperature, top_p, u.data_ptr(),
                                         token.data_ptr(), None if lp is None else lp.data_ptr(),
                                         torch.get_num_threads())
    if failed:
        raise MemoryError("decode_cpu: no memory for the sampling scratch")
    return token, lp


# ---- the decode step ------------------------------------------------------------------------------------------

def layer_weights(model) -> tuple[list[tuple], Linear]:
    """The weights as the Decoder runs them: per layer (norm 1, q|k|v, o, norm 2, gate|up, down), the matmuls as
    Linears on copies (q, k, v and gate, up concatenated: one matmul each), and the output projection's Linear."""
    w = lambda m: m.weight.detach()  # noqa: E731
    layers = []
    for block in model.layers:
        a, mlp = block.self_attn, block.mlp
        layers.append((
            w(block.input_layernorm).contiguous(),
            Linear(torch.cat([w(a.q_proj), w(a.k_proj), w(a.v_proj)])),  # C -> (H + 2 KVH) D
            Linear(w(a.o_proj)),  # H D -> C
            w(block.post_attention_layernorm).contiguous(),
            Linear(torch.cat([w(mlp.gate_proj), w(mlp.up_proj)])),  # C -> 2F
            Linear(w(mlp.down_proj))))  # F -> C
    return layers, Linear(model.output_weight.detach())  # C -> V


class Decoder:
    """generate's decode step on a CPU, called as sampler.decode_step is: (model, cache, tokens [B], pos [B],
    kv_len, sharing) -> logits [B, V] (the model argument is ignored: the Decoder holds its own). Rows 0 .. B-1 of
    the PrefixCache; buffers are kept per B.

    It reads no cache entry it has not written (a row's prompt keys below its prompt's length, its own keys up to
    the one just written), so generate gives it an unzeroed cache (needs_zeroed_cache): the pages rows never reach
    are never touched. (The eval chunk of the default run, 4,096 rows x 192 positions, is a 1.6 GB cache, most of it
    past the rows' stop tokens; zeroing it faulted in every page.)"""

    needs_zeroed_cache = False

    def __init__(self, model):
        cfg = model.config
        self.G, self.D = _group(model)
        self.lib = library(self.G, self.D)
        if self.lib is None:
            raise RuntimeError(f"decode_cpu: no library for G={self.G}, D={self.D}: {why(self.G, self.D)}")
        self.KVH, self.C, self.F, self.eps = cfg.n_kv_heads, cfg.dim, cfg.ffn_dim, cfg.norm_eps
        self.scale, self.window = 1.0 / math.sqrt(cfg.head_dim), cfg.sliding_window
        self.layers, self.out = layer_weights(model)
        self.embed, self.norm = model.embed_tokens.weight.detach(), model.norm.weight.detach().contiguous()
        self.cache = None
        self.buffers: dict[int, tuple[torch.Tensor, ...]] = {}
        self.model = model

    def _bind(self, cache):
        """A new cache: its per-layer pointers, and RoPE tables covering its positions."""
        _check_cache(cache)
        self.cache = cache
        self.ptrs = [_layer_ptrs(cache, layer) for layer in range(len(self.layers))]
        positions = cache.prompts.max_len + cache.rows.max_len
        cos, sin = self.model.rope(torch.arange(positions)[None], positions)  # 1, 1, positions, D/2: the model's
        self.cos, self.sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()

    def _buffers(self, B: int) -> tuple[torch.Tensor, ...]:
        """Per row count: the embedding, the normed stream, the attention output, SiLU * up (reused every step:
        a fresh multi-MB tensor a step is a fresh round of page faults)."""
        if B not in self.buffers:
            self.buffers[B] = (torch.empty(B, self.C), torch.empty(B, self.C),
                               torch.empty(B, self.G * self.KVH * self.D), torch.empty(B, self.F))
        return self.buffers[B]

    def prefill(self, cache, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Prompts -> the logits [P, V] of the token after each (sampler.prefill_into's result): prompt i's keys
        and values go to prompt slot slots[i] of the PrefixCache, positions 0 .. len - 1. The prompts' tokens run
        as one flat batch, without padding: the same layers as the decode step, the attention causal over each
        prompt (prefill_layer_attention)."""
        if cache is not self.cache:
            self._bind(cache)
        lens = torch.tensor([len(p) for p in prompts])
        tokens = torch.tensor([t for p in prompts for t in p])
        N = len(tokens)
        start = torch.cumsum(lens, 0) - lens  # each prompt's first token in the flat batch
        pos = torch.arange(N) - start.repeat_interleave(lens)
        slot = torch.tensor(slots).repeat_interleave(lens)
        xn, y, a = torch.empty(N, self.C), torch.empty(N, self.G * self.KVH * self.D), torch.empty(N, self.F)
        x = self._layers(self.embed[tokens], xn, y, a, lambda qkv, ptrs: _attend_prefill(
            self.lib, qkv, self.cos, self.sin, ptrs[:4], slot, pos, self.KVH, cache.prompts.max_len, self.window,
            self.scale, y))
        last = x[start + lens - 1].contiguous()  # P, C: each prompt's last token
        self.lib.rms_norm(last.data_ptr(), self.norm.data_ptr(), len(prompts), self.C, self.eps, last.data_ptr(),
                          torch.get_num_threads())
        return self.out(last)  # P, V

    def _layers(self, x: torch.Tensor, xn: torch.Tensor, y: torch.Tensor, a: torch.Tensor, attend) -> torch.Tensor:
        """The residual stream x [B, C] through every layer -> x after the last (before the final norm). xn, y, a:
        buffers for the normed stream, the attention's output and SiLU * up; attend(qkv, layer pointers) writes y."""
        lib, threads, B, C, eps = self.lib, torch.get_num_threads(), x.shape[0], self.C, self.eps
        for (n1, qkv_proj, o_proj, n2, gate_up_proj, down_proj), ptrs in zip(self.layers, self.ptrs):
            lib.rms_norm(x.data_ptr(), n1.data_ptr(), B, C, eps, xn.data_ptr(), threads)
            attend(qkv_proj(xn), ptrs)
            x = o_proj(y, add=x)  # x + attention's output projection, in the matmul
            lib.rms_norm(x.data_ptr(), n2.data_ptr(), B, C, eps, xn.data_ptr(), threads)
            h = gate_up_proj(xn)
            lib.silu_mul(h.data_ptr(), B, self.F, a.data_ptr(), threads)
            x = down_proj(a, add=x)  # x + the MLP's down projection
        return x

    def __call__(self, model, cache, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int, sharing) -> torch.Tensor:
        if cache is not self.cache:
            self._bind(cache)
        B = tokens.shape[0]
        x, xn, y, a = self._buffers(B)
        torch.index_select(self.embed, 0, tokens, out=x)  # B, C: the residual stream
        idx = [_long(t[:B]) for t in (sharing.prompt, sharing.prompt_len, pos)]
        x = self._layers(x, xn, y, a, lambda qkv, ptrs: _attend(
            self.lib, qkv, self.cos, self.sin, ptrs, idx, self.KVH, sharing.prompt_keys, kv_len, self.window,
            self.scale, y))
        self.lib.rms_norm(x.data_ptr(), self.norm.data_ptr(), B, self.C, self.eps, xn.data_ptr(),
                          torch.get_num_threads())
        return self.out(xn)  # B, V
