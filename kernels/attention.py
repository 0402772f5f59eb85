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

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634


def _alloc(shape, *, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here (tests swap it for a NaN-filled allocator to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---- autotune configs -----------------------------------------------------------------------------------------

def _configs(shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages): a short list around Triton tutorial 06's Hopper
    choices, so a sweep tunes in seconds per shape rather than minutes."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _smem_pruner(resident_m: int, resident_n: int, streamed_m: int, streamed_n: int):
    """An early_config_prune dropping tiles whose buffers would not fit in ~200 KB of shared memory (H100: 228 KB):
    `resident_*` tiles of BLOCK_M / BLOCK_N rows stay for the whole program, `streamed_*` ones are pipelined
    num_stages deep, and D=256 keeps tiles at most 64 x 64 (register pressure)."""
    def prune(configs, named_args, **kwargs):
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        q = named_args.get("Q")
        esize = q.element_size() if hasattr(q, "element_size") else 2
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            rows = resident_m * bm + resident_n * bn + c.num_stages * (streamed_m * bm + streamed_n * bn)
            if esize * block_d * rows <= 200 * 1024 and not (block_d >= 256 and bm * bn > 64 * 64):
                kept.append(c)
        return kept or configs[-1:]
    return prune


if _INTERPRET:
    # Small, deliberately unequal tiles so the tests cross tile edges in both directions.
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    _DKDV_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    _DQ_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    _FWD_PRUNE = _DKDV_PRUNE = _DQ_PRUNE = None
else:
    _FWD_CONFIGS = _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 32, 4, 4),
                             (64, 64, 4, 4), (64, 32, 4, 3)])
    _DKDV_CONFIGS = _configs([(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 4),
                              (64, 64, 4, 3), (16, 64, 4, 3)])
    _DQ_CONFIGS = _configs([(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3),
                            (64, 32, 4, 4)])
    _FWD_PRUNE = {"early_config_prune": _smem_pruner(1, 0, 0, 2)}  # Q resident; K, V streamed
    _DKDV_PRUNE = {"early_config_prune": _smem_pruner(0, 2, 2, 0)}  # K, V resident; Q, dO streamed
    _DQ_PRUNE = {"early_config_prune": _smem_pruner(2, 0, 0, 2)}  # Q, dO resident; K, V streamed

# LOG2_CTX (the bit length of max(T, S)) is in the key: one tuning per power-of-two length bucket, not per length.
_TUNE_KEY = ["HEAD_D", "CAUSAL", "HAS_WINDOW", "HAS_KV_LENS", "LOG2_CTX"]


# The interpreter's tl.dot mishandles bf16 operands (numpy has no bf16); there, and only there, bf16 tiles are
# widened to fp32 first, which computes the same products the tensor cores form (exact bf16 x bf16, fp32 sums).
_WIDEN_BF16_DOTS: tl.constexpr = tl.constexpr(_INTERPRET)


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


# ---- forward -------------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                    lo, hi, kv_bound, window, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key tiles [lo, hi). MASKED: apply the visibility mask (keys < kv_bound, causal,
    window); otherwise every key of every tile is visible to every row and no mask is computed."""
    d_ok = offs_d < HEAD_D
    USE_MASK: tl.constexpr = MASKED or HEAD_D != BLOCK_D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT_mask = (cols[None, :] < kv_bound) & d_ok[:, None]
        v_mask = (cols[:, None] < kv_bound) & d_ok[None, :]
        kT = _load(K_base + cols[None, :] * stride_kn + offs_d[:, None], kT_mask, USE_MASK)  # BD, BN
        qk = _dot(q, kT, None, DOT_PREC) * qk_scale  # BM, BN, base-2 logits
        if MASKED:
            valid = cols[None, :] < kv_bound
            if CAUSAL:
                valid = valid & (cols[None, :] <= pos[:, None])
            if HAS_WINDOW:
                valid = valid & (cols[None, :] > pos[:, None] - window)
            qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(V_base + cols[:, None] * stride_vn + offs_d[None, :], v_mask, USE_MASK)
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
    """For a grid (cdiv(T, BLOCK_M), B * H): the query tile, the flat (b, h) index, b, h and h's KV head. The
    heaviest tiles (the last rows, when causal) are launched first, for a short tail."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = (h // G).to(tl.int64)
    return start_m, bh, b, h.to(tl.int64), kvh


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY, prune_configs_by=_FWD_PRUNE)
@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, LSE, KV_LENS,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_ot,
                     H, G, T, S, window, qk_scale, LOG2_CTX,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                     HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H). Writes O [B, H, T, D] and LSE [B, H, T] (base 2; +inf for a row that
    sees no key)."""
    start_m, bh, b, h, kvh = _query_tile_program(H, G)
    kv_len, offset = _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL, HAS_KV_LENS)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offset + offs_m
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_D

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # BM, BD
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, bb, hi = _query_tile_key_ranges(offset + start_m * BLOCK_M, kv_len, window,
                                           CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                        lo, a, kv_len, window, qk_scale, True, CAUSAL, HAS_WINDOW,
                                        BLOCK_N, HEAD_D, BLOCK_D, DOT_PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                    a, bb, kv_len, window, qk_scale, False, CAUSAL, HAS_WINDOW,
                                    BLOCK_N, HEAD_D, BLOCK_D, DOT_PREC)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                    bb, hi, kv_len, window, qk_scale, True, CAUSAL, HAS_WINDOW,
                                    BLOCK_N, HEAD_D, BLOCK_D, DOT_PREC)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)


# ---- backward ------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess_kernel(Out, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                                H, T, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta [B, H, T] = rowsum(dO * Out) in fp32. Grid (cdiv(T, BLOCK_M), B * H)."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_D)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, stride_qt, stride_dot,
                         offs_n, offs_d, offset, lo, hi, T, kv_len, window, qk_scale,
                         MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi) of one query head (transposed form: rows of
    the tiles are keys)."""
    d_ok = offs_d < HEAD_D
    USE_MASK: tl.constexpr = MASKED or HEAD_D != BLOCK_D
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        r_ok = rows < T
        q_mask = r_ok[:, None] & d_ok[None, :]
        q = _load(Q_base + rows[:, None] * stride_qt + offs_d[None, :], q_mask, USE_MASK)  # BM, BD
        if MASKED:
            lse = tl.load(LSE_base + rows, mask=r_ok, other=float("inf"))
            delta = tl.load(DELTA_base + rows, mask=r_ok, other=0.0)
        else:  # interior query tiles lie wholly below T
            lse = tl.load(LSE_base + rows)
            delta = tl.load(DELTA_base + rows)
        qkT = _dot(k, tl.trans(q), None, DOT_PREC) * qk_scale  # BN, BM
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            pos = offset + rows
            valid = r_ok[None, :] & (offs_n[:, None] < kv_len)
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= pos[None, :])
            if HAS_WINDOW:
                valid = valid & (offs_n[:, None] > pos[None, :] - window)
            pT = tl.where(valid, pT, 0.0)
        do = _load(DO_base + rows[:, None] * stride_dot + offs_d[None, :], q_mask, USE_MASK)  # BM, BD
        dv = _dot(pT.to(do.dtype), do, dv, DOT_PREC)
        dpT = _dot(v, tl.trans(do), None, DOT_PREC)  # BN, BM
        dsT = pT * (dpT - delta[None, :])
        dk = _dot(dsT.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_TUNE_KEY, prune_configs_by=_DKDV_PRUNE)
@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KV_LENS,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn,
                          stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                          H, KVH, G, T, S, window, sm_scale, qk_scale, LOG2_CTX,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(S, BLOCK_N), B * KVH). One key tile of one KV head; loops over the G query heads of its group
    and, for each, over the query tiles that can see the key tile. Writes every key row < S (zeros past kv_len)."""
    start_n = tl.program_id(0)
    bkh = tl.program_id(1)
    b = (bkh // KVH).to(tl.int64)
    kvh = (bkh % KVH).to(tl.int64)
    kv_len, offset = _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL, HAS_KV_LENS)
    n0 = start_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_D)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)  # BN, BD
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
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
        Q_base = Q + b * stride_qb + h * stride_qh
        DO_base = DO + b * stride_dob + h * stride_doh
        LSE_base = LSE + (b * H + h) * T
        DELTA_base = DELTA + (b * H + h) * T
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, stride_qt, stride_dot,
                                      offs_n, offs_d, offset, lo, a, T, kv_len, window, qk_scale,
                                      True, CAUSAL, HAS_WINDOW, BLOCK_M, HEAD_D, BLOCK_D, DOT_PREC)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, stride_qt, stride_dot,
                                      offs_n, offs_d, offset, a, bb, T, kv_len, window, qk_scale,
                                      False, CAUSAL, HAS_WINDOW, BLOCK_M, HEAD_D, BLOCK_D, DOT_PREC)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, stride_qt, stride_dot,
                                      offs_n, offs_d, offset, bb, hi, T, kv_len, window, qk_scale,
                                      True, CAUSAL, HAS_WINDOW, BLOCK_M, HEAD_D, BLOCK_D, DOT_PREC)

    out_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HEAD_D)
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                       lo, hi, kv_len, window, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi) (MASKED as in _attn_fwd_inner)."""
    d_ok = offs_d < HEAD_D
    USE_MASK: tl.constexpr = MASKED or HEAD_D != BLOCK_D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < kv_len) & d_ok[None, :]
        k = _load(K_base + cols[:, None] * stride_kn + offs_d[None, :], kv_mask, USE_MASK)  # BN, BD
        v = _load(V_base + cols[:, None] * stride_vn + offs_d[None, :], kv_mask, USE_MASK)
        qk = _dot(q, tl.trans(k), None, DOT_PREC) * qk_scale  # BM, BN
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            valid = cols[None, :] < kv_len
            if CAUSAL:
                valid = valid & (cols[None, :] <= pos[:, None])
            if HAS_WINDOW:
                valid = valid & (cols[None, :] > pos[:, None] - window)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=_TUNE_KEY, prune_configs_by=_DQ_PRUNE)
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_LENS,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        H, G, T, S, window, sm_scale, qk_scale, LOG2_CTX,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KV_LENS: tl.constexpr,
                        HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), B * H): dQ of one query tile over the key tiles it sees (the forward's ranges)."""
    start_m, bh, b, h, kvh = _query_tile_program(H, G)
    kv_len, offset = _row_kv_len_and_offset(KV_LENS, b, T, S, CAUSAL, HAS_KV_LENS)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offset + offs_m
    m_ok = offs_m < T
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask,
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=m_ok, other=0.0)
    K_base = K + b * stride_kb + kvh * stride_kh
    V_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, a, bb, hi = _query_tile_key_ranges(offset + start_m * BLOCK_M, kv_len, window,
                                           CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                                lo, a, kv_len, window, qk_scale, True, CAUSAL, HAS_WINDOW, BLOCK_N, HEAD_D,
                                BLOCK_D, DOT_PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                            a, bb, kv_len, window, qk_scale, False, CAUSAL, HAS_WINDOW, BLOCK_N, HEAD_D,
                            BLOCK_D, DOT_PREC)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, stride_kn, stride_vn, pos, offs_n, offs_d,
                            bb, hi, kv_len, window, qk_scale, True, CAUSAL, HAS_WINDOW, BLOCK_N, HEAD_D,
                            BLOCK_D, DOT_PREC)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# ---- decode (flash-decoding) ---------------------------------------------------------------------------------

@triton.jit
def _decode_kernel(Q, K, V, O_PART, LSE_PART, KV_LENS,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   H, KVH, G, T, window, qk_scale, num_splits,
                   HAS_WINDOW: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (B * KVH, cdiv(G * T, BLOCK_M), num_splits). Rows are the G * T (head, query) pairs of one KV head;
    split s takes the s-th slice of this row's visible keys. Writes O_PART [B, H, T, splits, D] (normalised, fp32)
    and LSE_PART [B, H, T, splits] (base 2, -inf for an empty slice)."""
    bkh = tl.program_id(0)
    split = tl.program_id(2)
    b = (bkh // KVH).to(tl.int64)
    kvh = (bkh % KVH).to(tl.int64)
    kv_len = tl.load(KV_LENS + b).to(tl.int32)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < G * T
    g = rows // T
    t = rows % T
    h = (kvh * G + g).to(tl.int64)
    pos = kv_len - T + t
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :],
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
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K + b * stride_kb + kvh * stride_kh,
                                    V + b * stride_vb + kvh * stride_vh, stride_kn, stride_vn, pos, offs_n, offs_d,
                                    s_lo, s_hi, s_hi, window, qk_scale, True, True, HAS_WINDOW,
                                    BLOCK_N, HEAD_D, BLOCK_D, DOT_PREC)
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

def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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


def _common(q, k, window, kv_lens):
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    return dict(H=H, G=H // KVH, T=T, S=S, window=window or 0, LOG2_CTX=max(T, S, 1).bit_length(),
                HAS_WINDOW=window is not None, HAS_KV_LENS=kv_lens is not None, HEAD_D=D,
                BLOCK_D=max(16, triton.next_power_of_2(D)),
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _attn_fwd(q, k, v, causal, window, sm_scale, kv_lens):
    B, H, T, D = q.shape
    o = _alloc((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = _alloc((B, H, T), dtype=torch.float32, device=q.device)
    kvl = kv_lens if kv_lens is not None else q  # any pointer; never read without HAS_KV_LENS
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_fwd_kernel[grid](q, k, v, o, lse, kvl, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                           qk_scale=sm_scale * _LOG2E, CAUSAL=causal, **_common(q, k, window, kv_lens))
    return o, lse


def _attn_bwd(do, q, k, v, o, lse, causal, window, sm_scale, kv_lens):
    B, H, T, D = q.shape
    KVH = k.shape[1]
    common = _common(q, k, window, kv_lens)
    do = _last_dim_contiguous(do)
    delta = _alloc((B, H, T), dtype=torch.float32, device=q.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T, 64), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                                             HEAD_D=D, BLOCK_D=common["BLOCK_D"], BLOCK_M=64)
    dq = _alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc(k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc(v.shape, dtype=v.dtype, device=v.device)
    kvl = kv_lens if kv_lens is not None else q
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    grid_kv = lambda meta: (triton.cdiv(k.shape[2], meta["BLOCK_N"]), B * KVH)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, kvl, *strides, *dk.stride()[:3],
                                   *dv.stride()[:3], KVH=KVH, sm_scale=sm_scale, qk_scale=sm_scale * _LOG2E,
                                   CAUSAL=causal, **common)
    grid_q = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, kvl, *strides, *dq.stride()[:3], sm_scale=sm_scale,
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
    """softmax(sm_scale * q k^T + mask) v: q [B, H, T, D], k and v [B, KVH, S, D] -> [B, H, T, D] in q's dtype.

    causal: bottom-right aligned (query t at position kv_len - T + t). window: Mistral's sliding window (needs
    causal). kv_lens: int tensor [B], valid keys per row in 0..S (keys >= kv_lens[b] are ignored; larger values
    act as S). Differentiable in q, k, v."""
    _check_inputs(q, k, v, window, kv_lens)
    assert window is None or causal, "a sliding window needs causal=True (Mistral's semantics)"
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    if kv_lens is not None:
        kv_lens = kv_lens.to(torch.int32).contiguous()
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _FlashAttention.apply(q, k, v, causal, window, sm_scale, kv_lens)


def _default_num_splits(q, k, block_m) -> int:
    """Enough splits to give every SM about two programs, none shorter than 256 keys, at most 64 (flash-decoding's
    rule of thumb). Based on the cache capacity, not kv_lens, so choosing it needs no host sync."""
    B, H, T, _ = q.shape
    KVH, S = k.shape[1], k.shape[2]
    programs = B * KVH * triton.cdiv((H // KVH) * T, block_m)
    if _INTERPRET or q.device.type != "cuda":
        return max(1, min(4, triton.cdiv(S, 64)))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return max(1, min(64, triton.cdiv(S, 256), triton.cdiv(2 * sms, programs)))


@torch.no_grad()
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_lens: torch.Tensor, *,
                 window: int | None = None, sm_scale: float | None = None,
                 num_splits: int | None = None) -> torch.Tensor:
    """Few queries against a KV cache (inference only): q [B, H, T, D] with T <= 16, caches [B, KVH, S_max, D],
    kv_lens [B] valid keys per row, at most S_max (the T new tokens included); causal bottom-right per row.
    Split-K over the keys (`num_splits` slices, default from the cache length and the SM count), merged by a second
    kernel."""
    _check_inputs(q, k_cache, v_cache, window, kv_lens)
    B, H, T, D = q.shape
    KVH = k_cache.shape[1]
    G = H // KVH
    q, k_cache, v_cache = (_last_dim_contiguous(x) for x in (q, k_cache, v_cache))
    kv_lens = kv_lens.to(torch.int32).contiguous()
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    block_m = max(16, min(64, triton.next_power_of_2(G * T)))
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 32 if _INTERPRET else (64 if block_d <= 128 else 32)
    num_splits = num_splits or _default_num_splits(q, k_cache, block_m)
    o_part = _alloc((B, H, T, num_splits, D), dtype=torch.float32, device=q.device)
    lse_part = _alloc((B, H, T, num_splits), dtype=torch.float32, device=q.device)
    grid = (B * KVH, triton.cdiv(G * T, block_m), num_splits)
    _decode_kernel[grid](q, k_cache, v_cache, o_part, lse_part, kv_lens, *q.stride()[:3], *k_cache.stride()[:3],
                         *v_cache.stride()[:3], H, KVH, G, T, window or 0, sm_scale * _LOG2E, num_splits,
                         HAS_WINDOW=window is not None, HEAD_D=D, BLOCK_D=block_d,
                         DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                         num_warps=4, num_stages=1 if _INTERPRET else 3)
    o = _alloc((B, H, T, D), dtype=q.dtype, device=q.device)
    _decode_reduce_kernel[(B * H * T,)](o_part, lse_part, o, num_splits, HEAD_D=D, BLOCK_D=block_d,
                                        BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return o


# ---- plain PyTorch twin ------------------------------------------------------------------------------------------

def attention_mask(B: int, T: int, S: int, *, causal: bool = True, window: int | None = None,
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


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
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
    mask = attention_mask(B, T, S, causal=causal, window=window, kv_lens=kv_lens, device=q.device)
    any_key = mask.any(-1, keepdim=True)  # B, 1, T, 1
    scores = (q.to(ct) @ k.transpose(-1, -2)) * sm_scale  # B, H, T, S
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~any_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask, 0.0)
    return (probs @ v).to(q.dtype)  # B, H, T, D
