"""Flash attention in Triton: forward, backward and a split-K decode path, with GQA and Mistral's sliding window.

Math (one query head h, its KV head h // G, G = H / KVH; scale s = sm_scale, default 1 / sqrt(D)):

    S_ij = s * q_i . k_j          P_ij = exp(S_ij - L_i) if key j is visible to query i else 0
    L_i  = log sum_j exp(S_ij)    o_i  = sum_j P_ij v_j
    backward:  dV_j = sum_i P_ij dO_i        dP_ij = dO_i . v_j        Delta_i = dO_i . o_i  (= sum_j P_ij dP_ij)
               dS_ij = P_ij (dP_ij - Delta_i)     dQ_i = s sum_j dS_ij k_j     dK_j = s sum_i dS_ij q_i

Visibility. Query t (of T) of batch row b sits at absolute position p = kv_len[b] - T + t when causal (bottom-right
alignment, as FlashAttention >= 2.1, so a few new queries attend correctly to a longer cache); kv_len[b] = S
without `kv_lens`. Key j is visible iff j < kv_len[b], and when causal j <= p, and with a window W also
p - j < W (the window counts the query's own token: transformers' Mistral, `kv_idx > q_idx - sliding_window`).
A query that sees no key outputs 0 and gets zero gradients.

Algorithm: FlashAttention-2 (Dao 2023, arXiv 2307.08691). The forward walks the key tiles of a BLOCK_M-row query
tile with the online softmax (running max m, running sum l, fp32 accumulator, exp2 with s * log2(e) folded into
the scale) and stores only o and L (base 2). The key loop is split into at most three ranges: a masked range at
the window's lower edge, an unmasked middle where every key of the tile is visible to every row (no mask
arithmetic), and a masked range on the causal diagonal / the ragged end of the keys (Triton tutorial 06 does
the same split). Tiles wholly outside the causal triangle or the window are never visited, so windowed
attention costs O(T * W). The backward recomputes P tile by tile: a preprocessing kernel forms Delta, one kernel
per key tile accumulates dK, dV over the query tiles that see it and over the G query heads of its KV head
(no atomics, no repeated K/V), and one kernel per query tile accumulates dQ. Head dims that are not powers of
two are padded to BLOCK_D with masked loads.

Decode (flash-decoding, Dao et al. 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html): for few new
queries against a long KV cache, one program takes all G * T query rows of a KV head (each K/V tile is read
once for the whole group) and one slice of the keys; each split writes a normalised partial output and its
log-sum-exp, and a second kernel merges the splits: o = sum_s 2^(L_s - M) o_s / sum_s 2^(L_s - M).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634

# The online softmax computes exp2(s * log2(e) * q.k - m) and rescales acc * alpha + P V: both are meant to contract
# to FMAs. Triton 3.9 warns that its default for fp fusion turns off in 3.10, so every launch asks for it.
_LAUNCH_OPTS = dict(enable_fp_fusion=True)


def _alloc(shape, *, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests swap it for a NaN-filled allocator to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _configs(shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# Autotune candidates for Hopper, each free of register spills at the head dims and dtypes the model uses when
# compiled for sm_90a (tests/test_kernel_compile.py compiles every one and fails on a spill; docs/kernels.md has
# the table). 128 x 128 score tiles need 8 warps at D = 128; dK/dV keep two [BLOCK_N, D] fp32 accumulators and
# the K, V tiles resident, hence their narrow tiles. fp32 inputs (the KV cache, the prefill) use tf32x3 dots, which
# hold each operand as two tf32 halves: they get their own, smaller forward tiles, each with the largest head dim
# at which it stays spill-free (_FP32_FWD). The sliding window adds a third masked key loop, in which 128 x 128
# tiles spill: windowed launches keep tiles of at most _WINDOW_MAX_TILE scores.
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)])
_FP32_FWD = {(64, 16, 4, 1): 128, (64, 32, 4, 2): 64, (128, 32, 8, 2): 64}
_WINDOW_MAX_TILE = 128 * 64
_FWD_CONFIGS += _configs(list(_FP32_FWD))
# dK/dV: a program's work grows with its key tile (BLOCK_N keys resident, their two accumulators in registers), so
# 128-key tiles at 8 warps; at D = 128 only 16 queries a step stay spill-free, at D <= 64 32 or 64 (_DKDV_MAX_D:
# the largest BLOCK_D of a tile; the others serve every head dim). Added after the first GPU run, where the backward
# ran at half of cuDNN's rate with 16x64 tiles chosen everywhere; not timed on a GPU yet. 16-bit inputs only: in
# fp32 the 16x128 tile needs 272 KB of shared memory at D = 128 (the compile guard caught it).
_DKDV_MAX_D = {(16, 128, 8, 1): 128, (32, 128, 8, 2): 64, (64, 128, 8, 1): 64}
_DKDV_CONFIGS = _configs([(32, 32, 4, 2), (16, 64, 4, 1), *_DKDV_MAX_D])
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 4, 2)])
_DECODE_BLOCK_N, _DECODE_STAGES = 64, 3
_MAX_TILE_ROWS = 128  # the most rows (BLOCK_M or BLOCK_N) any tile has: see Addressing
assert all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= _MAX_TILE_ROWS
           for c in _FWD_CONFIGS + _DKDV_CONFIGS + _DQ_CONFIGS)
# The GPU candidates by kernel, kept when the interpreter swaps in its own below: the tests force each one in turn.
GPU_CONFIGS = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}

# ---- interpreter shims (TRITON_INTERPRET=1, the CPU test suite); nothing below this block depends on the mode ----
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if _INTERPRET:
    # Small, deliberately unequal tiles so the tests cross tile edges in both directions; one config each, so
    # nothing is autotuned (and no pruner is needed).
    _FWD_CONFIGS = _configs([(32, 16, 4, 1)])
    _DKDV_CONFIGS = _configs([(16, 32, 4, 1)])
    _DQ_CONFIGS = _configs([(32, 16, 4, 1)])
    _DECODE_BLOCK_N, _DECODE_STAGES = 32, 1
# The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16); there, and only there, bf16 tiles are
# widened to fp32 first, which computes the same products the tensor cores form (exact bf16 x bf16, fp32 sums).
_WIDEN_BF16_DOTS: tl.constexpr = tl.constexpr(_INTERPRET)
# ---- end of interpreter shims ---------------------------------------------------------------------------------


def _pruner(resident_m: int, resident_n: int, streamed_m: int, streamed_n: int, fp32_configs=None,
            tile_max_d=None):
    """An early_config_prune. Drops tiles whose buffers would not fit in ~200 KB of shared memory (H100: 228 KB):
    `resident_*` tiles of BLOCK_M / BLOCK_N rows stay for the whole program, `streamed_*` ones are pipelined
    num_stages deep; D=256 keeps tiles at most 64 x 64 and a window at most _WINDOW_MAX_TILE scores (register
    pressure). With `fp32_configs` ({(BLOCK_M, BLOCK_N, warps, stages): largest BLOCK_D}), fp32 inputs get exactly
    those (within their head dims) and 16-bit inputs all the others. The tiles `tile_max_d` names (the same form)
    serve 16-bit inputs up to that head dim (fp32's tf32x3 splits need more shared memory than this estimate).
    `prune.keeps(config, esize, block_d, windowed)` is the rule for one config (the tests ask it which dtypes
    each config serves)."""
    def keeps(c, esize, block_d, windowed) -> bool:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        wide = (tile_max_d or {}).get((bm, bn, c.num_warps, c.num_stages))
        if wide is not None and (esize == 4 or block_d > wide):
            return False
        if fp32_configs is not None:
            max_d = fp32_configs.get((bm, bn, c.num_warps, c.num_stages))
            if (esize == 4) != (max_d is not None) or (max_d is not None and block_d > max_d):
                return False
        rows = resident_m * bm + resident_n * bn + c.num_stages * (streamed_m * bm + streamed_n * bn)
        if esize * block_d * rows > 200 * 1024 or (block_d >= 256 and bm * bn > 64 * 64):
            return False
        return not (windowed and bm * bn > _WINDOW_MAX_TILE)

    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        windowed = kwargs.get("HAS_WINDOW", named_args.get("HAS_WINDOW"))
        q = named_args.get("Q")
        esize = q.element_size() if hasattr(q, "element_size") else 2
        return [c for c in configs if keeps(c, esize, block_d, windowed)] or configs[-1:]
    prune.keeps = keeps
    return prune


_FWD_PRUNE = {"early_config_prune": _pruner(1, 0, 0, 2, _FP32_FWD)}  # Q resident; K, V streamed
_DKDV_PRUNE = {"early_config_prune": _pruner(0, 2, 2, 0, tile_max_d=_DKDV_MAX_D)}  # K, V resident; Q, dO streamed
# Q, dO resident; K streamed in two layouts (K for dS K, K^T for Q K^T) and V: 3 tiles a stage. Counting 2 let
# the one fp32 D = 128 candidate through at 196 KB where Triton needs 256 KB (a GPU run of the tests caught it).
_DQ_PRUNE = {"early_config_prune": _pruner(2, 0, 0, 3)}

# One tuning per (head dim, masking flags, GQA ratio G, power-of-two buckets of T and of S): dK/dV's work per
# program grows with G, and a short prefill against a long cache (T << S) wants other tiles than T = S.
_TUNE_KEY = ["HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_KV_LENS", "G", "LOG2_T", "LOG2_S"]


@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr):
    if _WIDEN_BF16_DOTS:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _load(ptrs, mask, USE_MASK: tl.constexpr):
    """A tile load whose mask disappears at compile time where it is all true (interior tiles, D a power of two)."""
    if USE_MASK:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _visible(q_pos, key, kv_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Whether key index `key` is visible to the query at absolute position `q_pos` (the module docstring's rule);
    the two arguments are broadcast against each other ([BM, 1] and [1, BN], or transposed for dK/dV)."""
    valid = key < kv_len
    if CAUSAL:
        valid = valid & (key <= q_pos)
    if HAS_WINDOW:
        valid = valid & (key > q_pos - window)
    return valid


# Addressing. A tensor row r of a [.., rows, D] operand sits at base + r * stride_row. Program bases (batch, head)
# are int64; so is the tile's first row, start * stride_row, advanced once per tile as a scalar, because
# T * H * D reaches 2^31 (T = 256k at H * D = 8192) and an int32 product would wrap. Offsets inside a tile
# (< _MAX_TILE_ROWS rows) stay int32 and loop-invariant: the launchers copy an operand whose row stride would make
# them wrap (stride * _MAX_TILE_ROWS >= 2^31, never a model's layout), a case the first GPU run of the tests caught.

# ---- forward -------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, kv, pos, lo, hi, kv_len, window, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax of the query tile q (rows at absolute positions pos) over key tiles [lo, hi).
    kv = (K_base, V_base, stride_kn, stride_vn). MASKED: apply the visibility mask; otherwise every key of every
    tile is visible to every row and no mask is computed."""
    K_base, V_base, stride_kn, stride_vn = kv
    stride_kn64, stride_vn64 = stride_kn.to(tl.int64), stride_vn.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    USE_MASK: tl.constexpr = MASKED or HEAD_D != BLOCK_D
    kT_offs = offs_n[None, :] * stride_kn + offs_d[:, None]  # BD, BN
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]  # BN, BD
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT = _load(K_base + start_n * stride_kn64 + kT_offs, (cols[None, :] < kv_len) & d_ok[:, None],
                   USE_MASK)  # BD, BN
        qk = _dot(q, kT, None, DOT_PREC) * qk_scale  # BM, BN, base-2 logits
        if MASKED:
            qk = tl.where(_visible(pos[:, None], cols[None, :], kv_len, window, CAUSAL, HAS_WINDOW), qk,
                          float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V_base + start_n * stride_vn64 + v_offs, (cols[:, None] < kv_len) & d_ok[None, :],
                  USE_MASK)  # BN, BD
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile_key_ranges(p0, kv_len, window,
                           CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """For query rows at positions p0 .. p0 + BLOCK_M - 1: key ranges masked [lo, a), unmasked [a, b), masked
    [b, hi), with lo, a, b multiples of BLOCK_N. Divisions only ever see non-negative numbers."""
    if CAUSAL:
        hi = tl.maximum(tl.minimum(kv_len, p0 + BLOCK_M), 0)  # last row sees keys <= p0 + BLOCK_M - 1
        mid_hi = tl.maximum(tl.minimum(kv_len, p0 + 1), 0) // BLOCK_N * BLOCK_N  # first row sees whole tiles below
    else:
        hi = kv_len
        mid_hi = kv_len // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        lo = tl.maximum(p0 - window + 1, 0) // BLOCK_N * BLOCK_N  # first row's oldest visible key
        mid_lo = (tl.maximum(p0 + BLOCK_M - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N  # last row's, rounded up
    else:
        lo = hi * 0
        mid_lo = hi * 0
    a = tl.minimum(tl.maximum(mid_lo, lo), hi)
    b = tl.minimum(tl.maximum(mid_hi, a), hi)
    return lo, a, b, hi


@triton.jit
def _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr):
    """Row b's number of valid keys, and the absolute position of its query 0 (bottom-right alignment when causal:
    query t sits at kv_len - T + t)."""
    if HAS_KV_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + b).to(tl.int32), S)  # clamped: a bad length cannot read past S
    else:
        kv_len = S
    if CAUSAL:
        offset = kv_len - T
    else:
        offset = kv_len * 0
    return kv_len, offset


@triton.jit
def _query_tile_program(H, G):
    """For a grid (cdiv(T, BLOCK_M), B * H): the query tile, the flat (b, h) index, b, h and h's KV head (all but
    the tile int64: they multiply strides). The heaviest tiles (the last rows, when causal) are launched first,
    for a short tail."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    return start_m, bh, b, h, h // G


@triton.jit
def _tile_ptrs(X, b, h, m0, stride, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers [BLOCK_M, BLOCK_D] to rows m0 .. m0 + BLOCK_M - 1 of head h of batch row b; stride = (batch, head,
    row) strides of X."""
    base = X + b * stride[0] + h * stride[1] + m0.to(tl.int64) * stride[2]
    return base + tl.arange(0, BLOCK_M)[:, None] * stride[2] + tl.arange(0, BLOCK_D)[None, :]


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_FWD_PRUNE)
@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, LSE, KV_LENS, stride_q, stride_k, stride_v, stride_o,
                     H, G, T, S, window, qk_scale, LOG2_T, LOG2_S,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H); stride_* = (batch, head, row) strides. Writes O [B, H, T, D] and
    LSE [B, H, T] (base 2; +inf for a row that sees no key)."""
    start_m, bh, b, h, kvh = _query_tile_program(H, G)
    kv_len, offset = _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL, HAS_KV_LENS)
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    pos = offset + offs_m
    m_ok = offs_m < T
    io_mask = m_ok[:, None] & (tl.arange(0, BLOCK_D) < HEAD_D)[None, :]
    q = tl.load(_tile_ptrs(Q, b, h, m0, stride_q, BLOCK_M, BLOCK_D), mask=io_mask, other=0.0)  # BM, BD
    kv = (K + b * stride_k[0] + kvh * stride_k[1], V + b * stride_v[0] + kvh * stride_v[1], stride_k[2], stride_v[2])

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, bb, hi = _query_tile_key_ranges(offset + m0, kv_len, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:  # the window's lower edge
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, pos, lo, a, kv_len, window, qk_scale, MASKED=True,
                                        CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                                        BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, pos, a, bb, kv_len, window, qk_scale, MASKED=False,
                                    CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                                    BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, pos, bb, hi, kv_len, window, qk_scale, MASKED=True,
                                    CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                                    BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(_tile_ptrs(Out, b, h, m0, stride_o, BLOCK_M, BLOCK_D), o.to(Out.dtype.element_ty), mask=io_mask)
    tl.store(LSE + bh * T + offs_m, lse, mask=m_ok)


# ---- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, DELTA, stride_o, stride_do, H, T,
                                HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta [B, H, T] = rowsum(dO * Out) in fp32. Grid (cdiv(T, BLOCK_M), B * H)."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask = (offs_m[:, None] < T) & (tl.arange(0, BLOCK_D)[None, :] < HEAD_D)
    o = tl.load(_tile_ptrs(Out, b, h, m0, stride_o, BLOCK_M, BLOCK_D), mask=mask, other=0.0).to(tl.float32)
    do = tl.load(_tile_ptrs(DO, b, h, m0, stride_do, BLOCK_M, BLOCK_D), mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, qd, offs_n, offset, lo, hi, T, kv_len, window, qk_scale,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile (keys offs_n) over query tiles [lo, hi) of one query head, in the
    transposed form (rows of the tiles are keys; Q is loaded as Q^T [BD, BM]). qd = (Q_base, DO_base, LSE_base,
    DELTA_base, stride_qt, stride_dot) for that head."""
    Q_base, DO_base, LSE_base, DELTA_base, stride_qt, stride_dot = qd
    stride_qt64, stride_dot64 = stride_qt.to(tl.int64), stride_dot.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    USE_MASK: tl.constexpr = MASKED or HEAD_D != BLOCK_D
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        r_ok = rows < T
        qT = _load(Q_base + start_m * stride_qt64 + offs_m[None, :] * stride_qt + offs_d[:, None],
                   r_ok[None, :] & d_ok[:, None], USE_MASK)  # BD, BM
        if MASKED:
            lse = tl.load(LSE_base + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(DELTA_base + rows, mask=r_ok, other=0.0)
        else:  # interior query tiles lie wholly below T
            lse = tl.load(LSE_base + rows)
            delta = tl.load(DELTA_base + rows)
        qkT = _dot(k, qT, None, DOT_PREC) * qk_scale  # BN, BM
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            valid = _visible((offset + rows)[None, :], offs_n[:, None], kv_len, window, CAUSAL, HAS_WINDOW)
            pT = tl.where(valid & r_ok[None, :], pT, 0.0)
        do = _load(DO_base + start_m * stride_dot64 + offs_m[:, None] * stride_dot + offs_d[None, :],
                   r_ok[:, None] & d_ok[None, :], USE_MASK)  # BM, BD
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC)
        dpT = _dot(v, tl.trans(do), None, DOT_PREC)  # BN, BM
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_DKDV_PRUNE)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS,
                          stride_q, stride_k, stride_v, stride_do, stride_dk, stride_dv,
                          H, KVH, G, T, S, window, sm_scale, qk_scale, LOG2_T, LOG2_S,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(S, BLOCK_N), B * KVH). One key tile of one KV head; loops over the G query heads of its group
    and, for each, over the query tiles that can see the key tile. Writes every key row < S (zeros past kv_len)."""
    bkh = tl.program_id(1).to(tl.int64)
    b, kvh = bkh // KVH, bkh % KVH
    kv_len, offset = _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL, HAS_KV_LENS)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < kv_len) & (tl.arange(0, BLOCK_D)[None, :] < HEAD_D)
    k = tl.load(_tile_ptrs(K, b, kvh, n0, stride_k, BLOCK_N, BLOCK_D), mask=kv_mask, other=0.0)  # BN, BD
    v = tl.load(_tile_ptrs(V, b, kvh, n0, stride_v, BLOCK_N, BLOCK_D), mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query-tile ranges: masked [lo, a), unmasked [a, bb), masked [bb, hi); the same for every head of the group.
    n1 = n0 + BLOCK_N - 1
    t_full = T // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M  # first row whose position reaches key n0
        mid_lo = (tl.maximum(n1 - offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # rows that see all of the tile
    else:
        lo = offset
        mid_lo = offset
    if HAS_WINDOW:
        hi = tl.minimum(tl.maximum(n1 + window - offset, 0), T)  # rows whose window still reaches key n1
        mid_hi = tl.minimum(tl.maximum(n0 + window - offset, 0), t_full) // BLOCK_M * BLOCK_M
    else:
        hi = T + offset * 0
        mid_hi = t_full + offset * 0
    hi = tl.where(n0 < kv_len, hi, 0)  # a tile past the valid keys gets zero gradients
    mid_lo = tl.where(n1 < kv_len, mid_lo, hi)  # a tile straddling kv_len is masked throughout
    a = tl.minimum(tl.maximum(mid_lo, lo), hi)
    bb = tl.minimum(tl.maximum(mid_hi, a), hi)

    for g in range(G):
        h = kvh * G + g
        qd = (Q + b * stride_q[0] + h * stride_q[1], DO + b * stride_do[0] + h * stride_do[1],
              LSE + (b * H + h) * T, DELTA + (b * H + h) * T, stride_q[2], stride_do[2])
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qd, offs_n, offset, lo, a, T, kv_len, window, qk_scale,
                                      MASKED=True, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_M=BLOCK_M,
                                      HEAD_D=HEAD_D, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qd, offs_n, offset, a, bb, T, kv_len, window, qk_scale,
                                      MASKED=False, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_M=BLOCK_M,
                                      HEAD_D=HEAD_D, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, qd, offs_n, offset, bb, hi, T, kv_len, window, qk_scale,
                                      MASKED=True, CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_M=BLOCK_M,
                                      HEAD_D=HEAD_D, BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)

    out_mask = (offs_n[:, None] < S) & (tl.arange(0, BLOCK_D)[None, :] < HEAD_D)
    tl.store(_tile_ptrs(DK, b, kvh, n0, stride_dk, BLOCK_N, BLOCK_D), (dk * sm_scale).to(DK.dtype.element_ty),
             mask=out_mask)
    tl.store(_tile_ptrs(DV, b, kvh, n0, stride_dv, BLOCK_N, BLOCK_D), dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, pos, lo, hi, kv_len, window, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi) (kv and MASKED as in _attn_fwd_inner)."""
    K_base, V_base, stride_kn, stride_vn = kv
    stride_kn64, stride_vn64 = stride_kn.to(tl.int64), stride_vn.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    USE_MASK: tl.constexpr = MASKED or HEAD_D != BLOCK_D
    k_offs = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vn + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < kv_len) & d_ok[None, :]
        k = _load(K_base + start_n * stride_kn64 + k_offs, kv_mask, USE_MASK)  # BN, BD
        v = _load(V_base + start_n * stride_vn64 + v_offs, kv_mask, USE_MASK)
        qk = _dot(q, tl.trans(k), None, DOT_PREC) * qk_scale  # BM, BN
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            p = tl.where(_visible(pos[:, None], cols[None, :], kv_len, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_DQ_PRUNE)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_LENS, stride_q, stride_k, stride_v, stride_do, stride_dq,
                        H, G, T, S, window, sm_scale, qk_scale, LOG2_T, LOG2_S,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H): dQ of one query tile over the key tiles it sees (the forward's ranges)."""
    start_m, bh, b, h, kvh = _query_tile_program(H, G)
    kv_len, offset = _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL, HAS_KV_LENS)
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    pos = offset + offs_m
    m_ok = offs_m < T
    mask = m_ok[:, None] & (tl.arange(0, BLOCK_D)[None, :] < HEAD_D)
    q = tl.load(_tile_ptrs(Q, b, h, m0, stride_q, BLOCK_M, BLOCK_D), mask=mask, other=0.0)
    do = tl.load(_tile_ptrs(DO, b, h, m0, stride_do, BLOCK_M, BLOCK_D), mask=mask, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * T + offs_m, mask=m_ok, other=0.0)
    kv = (K + b * stride_k[0] + kvh * stride_k[1], V + b * stride_v[0] + kvh * stride_v[1], stride_k[2], stride_v[2])
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, bb, hi = _query_tile_key_ranges(offset + m0, kv_len, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, pos, lo, a, kv_len, window, qk_scale, MASKED=True,
                                CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                                BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, pos, a, bb, kv_len, window, qk_scale, MASKED=False,
                            CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                            BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, kv, pos, bb, hi, kv_len, window, qk_scale, MASKED=True,
                            CAUSAL=CAUSAL, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                            BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
    tl.store(_tile_ptrs(DQ, b, h, m0, stride_dq, BLOCK_M, BLOCK_D), (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=mask)


# ---- decode (flash-decoding) ---------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(Q, K, V, O_PART, LSE_PART, KV_LENS, stride_q, stride_k, stride_v,
                   H, KVH, G, T, S, window, qk_scale, num_splits,
                   HAS_WINDOW: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B * KVH, cdiv(G * T, BLOCK_M), num_splits). Rows are the G * T (head, query) pairs of one KV head;
    split s takes the s-th slice of this row's visible keys. Writes O_PART [B, H, T, splits, D] (normalised, fp32)
    and LSE_PART [B, H, T, splits] (base 2, -inf for an empty slice)."""
    bkh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(2)
    b, kvh = bkh // KVH, bkh % KVH
    kv_len = tl.minimum(tl.load(KV_LENS + b).to(tl.int32), S)  # clamped to the cache, as in the prefill
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < G * T
    g = rows // T
    t = rows % T
    h = kvh * G + g  # BM, int64
    pos = kv_len - T + t
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(Q + b * stride_q[0] + h[:, None] * stride_q[1] + t[:, None] * stride_q[2] + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)

    if HAS_WINDOW:
        lo = tl.maximum(kv_len - T - window + 1, 0)  # oldest key the first query sees
    else:
        lo = kv_len * 0
    span = tl.maximum(kv_len - lo, 0)
    chunk = ((span + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    s_lo = lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, kv_len)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv = (K + b * stride_k[0] + kvh * stride_k[1], V + b * stride_v[0] + kvh * stride_v[1], stride_k[2], stride_v[2])
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, kv, pos, s_lo, s_hi, s_hi, window, qk_scale, MASKED=True,
                                    CAUSAL=True, HAS_WINDOW=HAS_WINDOW, BLOCK_N=BLOCK_N, HEAD_D=HEAD_D,
                                    BLOCK_D=BLOCK_D, DOT_PREC=DOT_PREC)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    part = ((b * H + h) * T + t) * num_splits + split  # BM
    tl.store(O_PART + part[:, None] * HEAD_D + offs_d[None, :], o, mask=r_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part, lse, mask=r_ok)


@triton.jit
def _decode_reduce_kernel(O_PART, LSE_PART, Out, num_splits,
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid (B * H * T,): merge the splits of one query row, o = sum_s w_s o_s / sum_s w_s, w_s = 2^(L_s - max L)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(O_PART + (row * num_splits + offs_s[:, None]) * HEAD_D + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(Out + row * HEAD_D + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_D)


# ---- launchers -----------------------------------------------------------------------------------------------

def _addressable(x: torch.Tensor) -> torch.Tensor:
    """x itself where the kernels can address it, else a contiguous copy: the last dim must be contiguous, and a
    tile's in-tile offsets (row < _MAX_TILE_ROWS times the row stride, in int32; see Addressing) must not wrap."""
    return x if x.stride(-1) == 1 and x.stride(-2) * _MAX_TILE_ROWS < 2**31 else x.contiguous()


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, row) strides of a [B, heads, rows, D] tensor whose last dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: "tf32x3" (three tf32 tensor-core products per product, error about fp32's; "ieee" would take
    the CUDA-core FMA path, which at these tile sizes spills tens of KB a thread). fp16 / bf16 inputs: the
    precision argument does not apply (exact products, fp32 sums)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, window, kv_lens):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q [B, H, T, D], k and v [B, KVH, S, D]"
    B, H, T, D = q.shape
    assert k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert k.shape[0] == B and k.shape[3] == D, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B or D"
    assert H % k.shape[1] == 0, f"H={H} is not a multiple of KVH={k.shape[1]}"
    assert q.dtype == k.dtype == v.dtype, f"dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert 16 <= D <= 256, f"head dim {D} outside 16..256"
    assert q.device == k.device == v.device, "q, k, v on different devices"
    assert window is None or window >= 1, f"window must be >= 1, got {window}"
    if kv_lens is not None:
        assert kv_lens.shape == (B,) and not kv_lens.is_floating_point(), "kv_lens: integer tensor [B]"
        assert kv_lens.device == q.device, "kv_lens on another device than q"


def _autocast(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast for the inputs' device, cast them to its dtype (attention runs in low precision under
    autocast, as torch's scaled_dot_product_attention does); otherwise unchanged."""
    device_type = xs[0].device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return xs
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) for x in xs)


def _common(q, k, window, kv_lens):
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    return dict(H=H, G=H // KVH, T=T, S=S, window=window or 0, LOG2_T=max(T, 1).bit_length(),
                LOG2_S=max(S, 1).bit_length(), HAS_WINDOW=window is not None, HAS_KV_LENS=kv_lens is not None,
                HEAD_D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_PREC=_dot_precision(q.dtype),
                **_LAUNCH_OPTS)


def _attn_fwd(q, k, v, causal, window, sm_scale, kv_lens):
    B, H, T, D = q.shape
    o = _alloc((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = _alloc((B, H, T), dtype=torch.float32, device=q.device)
    kvl = kv_lens if kv_lens is not None else q  # any pointer; never read without HAS_KV_LENS
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, kvl, _strides(q), _strides(k), _strides(v), _strides(o),
                           qk_scale=sm_scale * _LOG2E, CAUSAL=causal, **_common(q, k, window, kv_lens))
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, causal, window, sm_scale, kv_lens):
    B, H, T, D = q.shape
    KVH = k.shape[1]
    common = _common(q, k, window, kv_lens)
    do = _addressable(do)
    delta = _alloc((B, H, T), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, _strides(o), _strides(do), H, T,
                                                             HEAD_D=D, BLOCK_D=common["BLOCK_D"], BLOCK_M=64,
                                                             **_LAUNCH_OPTS)
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    kvl = kv_lens if kv_lens is not None else q
    strides = (_strides(q), _strides(k), _strides(v), _strides(do))
    grid_kv = lambda meta: (triton.cdiv(k.shape[2], meta["BLOCK_N"]), B * KVH)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, kvl, *strides, _strides(dk), _strides(dv),
                                   KVH=KVH, sm_scale=sm_scale, qk_scale=sm_scale * _LOG2E, CAUSAL=causal, **common)
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, kvl, *strides, _strides(dq), sm_scale=sm_scale,
                                qk_scale=sm_scale * _LOG2E, CAUSAL=causal, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, sm_scale, kv_lens):
        o, lse = _attn_fwd(q, k, v, causal, window, sm_scale, kv_lens)
        ctx.save_for_backward(q, k, v, o, lse, kv_lens)
        ctx.causal, ctx.window, ctx.sm_scale = causal, window, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_lens = ctx.saved_tensors
        dq, dk, dv = _attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.window, ctx.sm_scale, kv_lens)
        return dq, dk, dv, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, sm_scale: float | None = None,
                    kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(sm_scale * q k^T + mask) v: q [B, H, T, D], k and v [B, KVH, S, D] -> [B, H, T, D] in q's dtype
    (under autocast: the autocast dtype, as torch's SDPA).

    causal: bottom-right aligned (query t at position kv_len - T + t). window: Mistral's sliding window (needs
    causal). kv_lens: int tensor [B], valid keys per row in 0..S (keys >= kv_lens[b] are ignored; larger values
    act as S). Differentiable in q, k, v."""
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v, window, kv_lens)
    assert window is None or causal, "a sliding window needs causal=True (Mistral's semantics)"
    q, k, v = (_addressable(x) for x in (q, k, v))
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32).contiguous()
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _FlashAttention.apply(q, k, v, causal, window, sm_scale, kv_lens)


def _default_num_splits(q, k, block_m) -> int:
    """Enough splits to give every SM about two programs, none shorter than 256 keys, at most 64 (flash-decoding's
    rule of thumb). Based on the cache capacity, not kv_lens, so choosing it needs no host sync."""
    B, H, T, _ = q.shape
    KVH, S = k.shape[1], k.shape[2]
    if q.device.type != "cuda":  # the interpreter (tests): a few splits, so the merge is exercised
        return max(1, min(4, triton.cdiv(S, 64)))
    programs = B * KVH * triton.cdiv((H // KVH) * T, block_m)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(64, triton.cdiv(S, 256), triton.cdiv(2 * sms, programs)))


@torch.no_grad()
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                 window: int | None = None, sm_scale: float | None = None,
                 num_splits: int | None = None) -> torch.Tensor:
    """Few queries against a KV cache (inference only): q [B, H, T, D] with T <= 16, caches [B, KVH, S_max, D],
    kv_lens [B] valid keys per row (the T new tokens included; values above S_max act as S_max); causal
    bottom-right per row. Split-K over the keys (`num_splits` slices, default from the cache length and the SM
    count), merged by a second kernel. Under autocast, runs and returns in the autocast dtype."""
    q, k_cache, v_cache = _autocast(q, k_cache, v_cache)
    _check_inputs(q, k_cache, v_cache, window, kv_lens)
    B, H, T, D = q.shape
    KVH, S = k_cache.shape[1], k_cache.shape[2]
    G = H // KVH
    q, k_cache, v_cache = (_addressable(x) for x in (q, k_cache, v_cache))
    kv_lens = kv_lens.to(torch.int32).contiguous()
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    block_m = max(16, min(64, triton.next_power_of_2(G * T)))
    block_d = max(16, triton.next_power_of_2(D))
    # half the key tile where a row of it exceeds 256 bytes (fp32 at D = 128, any dtype at D = 256): spill-free
    block_n = _DECODE_BLOCK_N if block_d * q.element_size() <= 256 else _DECODE_BLOCK_N // 2
    num_splits = num_splits or _default_num_splits(q, k_cache, block_m)
    o_part = _alloc((B, H, T, num_splits, D), dtype=torch.float32, device=q.device)
    lse_part = _alloc((B, H, T, num_splits), dtype=torch.float32, device=q.device)
    grid = (B * KVH, triton.cdiv(G * T, block_m), num_splits)
    _decode_kernel[grid](q, k_cache, v_cache, o_part, lse_part, kv_lens, _strides(q), _strides(k_cache),
                         _strides(v_cache), H, KVH, G, T, S, window or 0, sm_scale * _LOG2E, num_splits,
                         HAS_WINDOW=window is not None, HEAD_D=D, BLOCK_D=block_d, DOT_PREC=_dot_precision(q.dtype),
                         BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=_DECODE_STAGES, **_LAUNCH_OPTS)
    o = _alloc((B, H, T, D), dtype=q.dtype, device=q.device)
    _decode_reduce_kernel[(B * H * T,)](o_part, lse_part, o, num_splits, HEAD_D=D, BLOCK_D=block_d,
                                        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), **_LAUNCH_OPTS)
    return o


# ---- plain PyTorch twin ------------------------------------------------------------------------------------------

def visibility_mask(B: int, T: int, S: int, *, causal: bool = True, window: int | None = None,
                   kv_lens: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Boolean [B, 1, T, S]: which keys each query sees, under the visibility rule of the module docstring."""
    kv = kv_lens.to(device=device, dtype=torch.long) if kv_lens is not None else torch.full((B,), S, device=device)
    j = torch.arange(S, device=device)[None, None, None, :]  # 1, 1, 1, S
    kvb = kv[:, None, None, None]  # B, 1, 1, 1
    allowed = j < kvb
    if causal:
        i = kvb - T + torch.arange(T, device=device)[None, None, :, None]  # B, 1, T, 1: absolute query positions
        allowed = allowed & (j <= i)
        if window is not None:
            allowed = allowed & (j > i - window)
    return allowed


def flash_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  window: int | None = None, sm_scale: float | None = None,
                  kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """The twin of flash_attention: explicit mask, scores in fp32 (fp64 for fp64 inputs), GQA by
    repeat_interleave. A query that sees no key outputs 0 with zero gradients."""
    assert window is None or causal, "a sliding window needs causal=True"
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    ct = torch.promote_types(q.dtype, torch.float32)
    k = k.to(ct).repeat_interleave(H // KVH, dim=1)  # B, H, S, D
    v = v.to(ct).repeat_interleave(H // KVH, dim=1)  # B, H, S, D
    mask = visibility_mask(B, T, S, causal=causal, window=window, kv_lens=kv_lens, device=q.device)
    any_key = mask.any(-1, keepdim=True)  # B, 1, T, 1
    scores = (q.to(ct) @ k.transpose(-1, -2)) * sm_scale  # B, H, T, S
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~any_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    return (probs @ v).to(q.dtype)  # B, H, T, D
