"""Fused linear -> token log-probs, without ever holding the N x V logits.

Math. hidden h_n [C] (n < N tokens), output weight W [V, C], optional bias b [V], target y_n:

    z_n = W h_n + b                    (logits, never materialised beyond one tile)
    log p_n = z_{n, y_n} - lse_n,      lse_n = log sum_v exp(z_{n, v})       (0 where y_n = ignore_index)
    backward, g_n = dLoss / d log p_n (0 at ignored positions):
        dz_{n, v} = g_n (onehot(y_n)_v - softmax(z_n)_v) = g_n ([v = y_n] - exp(z_{n, v} - lse_n))
        dH = dz W      dW = dz^T H      db = sum_n dz_n

Algorithm (the chunked route of Liger-Kernel's fused linear cross entropy, Hsu et al. 2024, arXiv 2410.10989,
organised as cut cross-entropy's tiles, Wijmans et al. 2024, arXiv 2411.09009). The logits are formed one tile
of n_c rows x v_c vocabulary columns at a time by a cuBLAS GEMM into a reused buffer of at most _TILE_ELEMS
elements (2^26: 128 MiB in bf16; rows padded to a multiple of _ROW_ALIGN), and Triton kernels stream over it:
  forward   `_logprobs_fwd_kernel`, one program per BLOCK_N rows: merges the tile into the row's running max and
            sum of exponentials (online logsumexp in fp32) and picks the target logit when it falls in the tile.
            Only lse [N] (fp32) is saved for the backward.
  backward  the tile is recomputed, `_logprobs_bwd_kernel` turns it in place into dz (fp32 math, stored in the
            input dtype, as autograd would feed it to the GEMMs of the naive path), then two GEMMs: dH[rows] +=
            dz W[cols] into an fp32 accumulator, dW[cols] = dz^T H (or += into an fp32 accumulator of v_c rows
            when N spans several row chunks), db[cols] += column sums in fp32. The vocabulary is the outer loop, so
            dW is written once per column chunk and never needs a V x C fp32 buffer.
Cost: 4 GEMMs of 2 N C V flops (the forward one is recomputed in the backward), against 3 for the naive path,
which instead streams several fp32 N x V tensors through memory.
Memory beyond inputs and gradients: the tile (<= _TILE_ELEMS elements), N x C fp32 for dH's accumulator,
v_c x C fp32 for dW's when N > _MAX_ROWS, and O(N) fp32 vectors: O(N C + v_c C + _TILE_ELEMS), never O(N V).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Interpreter shim (TRITON_INTERPRET=1, the CPU tests): only _launch reads it, to pick small unequal blocks.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile of logits held at once: n_c * v_c <= _TILE_ELEMS with n_c <= _MAX_ROWS. n_c = v_c = sqrt(_TILE_ELEMS)
# balances the fp32 accumulator traffic of dH (N C per column chunk) against dW's (V C per row chunk), and keeps
# every GEMM at least 8192 x 4096 x 8192-ish (tensor cores saturated). Tests shrink both to cross chunk edges.
_TILE_ELEMS = 1 << 26
_MAX_ROWS = 8192
_V_ALIGN = 128  # column chunks are multiples of this (16-byte aligned leading dims for cuBLAS)
# The tile's row stride is the column count rounded up to this: with V = 32001 or 50257 in one chunk an odd stride
# would leave every row but the first misaligned, and the kernels' rows to scalar loads. 64 elements keep each row
# 128-byte aligned in 16-bit dtypes (Triton specialises the stride as divisible by 16, so it vectorises).
_ROW_ALIGN = 64
# Both kernels contract the online logsumexp (s * exp(m - m') + sum exp(z - m')) to FMAs; Triton's default for
# fp fusion turns off in 3.10, so the launches ask for it.
_LAUNCH_OPTS = dict(enable_fp_fusion=True)


def _alloc(shape, *, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here (tests swap it for a NaN-filled allocator to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---- kernels -------------------------------------------------------------------------------------------------

@triton.jit
def _logprobs_fwd_kernel(Z, stride_z, n_rows, n_cols, TGT, M, S, ZY, v0,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (cdiv(n_rows, BLOCK_N),). Z [n_rows, n_cols] holds the logits of vocabulary columns v0 .. v0 + n_cols
    - 1. Merges them into each row's running max M and sum S (= sum exp(z - M)), both fp32, and stores the target
    logit in ZY for the rows whose target is one of the tile's columns."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    z_row0 = Z + rows.to(tl.int64) * stride_z  # BN: each row's first column
    z_rows = z_row0[:, None]  # BN, 1
    m = tl.load(M + rows, mask=row_ok, other=0.0)
    s = tl.load(S + rows, mask=row_ok, other=0.0)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        z = tl.load(z_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < n_cols),
                    other=float("-inf")).to(tl.float32)  # BN, BV
        m_new = tl.maximum(m, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # only the padding rows stay at -inf
        s = s * tl.exp(m - m_use) + tl.sum(tl.exp(z - m_use[:, None]), 1)  # one exp per element; exp(-inf) = 0
        m = m_new
    tl.store(M + rows, m, mask=row_ok)
    tl.store(S + rows, s, mask=row_ok)
    local = tl.load(TGT + rows, mask=row_ok, other=-1).to(tl.int64) - v0
    hit = row_ok & (local >= 0) & (local < n_cols)
    zy = tl.load(z_row0 + local, mask=hit, other=0.0).to(tl.float32)
    tl.store(ZY + rows, zy, mask=hit)


@triton.jit
def _logprobs_bwd_kernel(Z, stride_z, n_rows, n_cols, TGT, LSE, G, v0, ignore_index,
                         BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Grid (cdiv(n_rows, BLOCK_N),). In place: Z (the logits of columns v0 .. v0 + n_cols - 1) becomes
    dz = g (onehot(target) - exp(z - lse)), computed in fp32 and stored in Z's dtype; g = 0 at ignored rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    z_rows = Z + rows.to(tl.int64)[:, None] * stride_z  # BN, 1
    tgt = tl.load(TGT + rows, mask=row_ok, other=0).to(tl.int64)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    g = tl.where(tgt == ignore_index, 0.0, g)[:, None]  # BN, 1
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)[:, None]
    local = (tgt - v0)[:, None]
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + offs
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # BN, BV
        dz = g * ((cols[None, :] == local).to(tl.float32) - tl.exp(z - lse))
        tl.store(z_rows + cols[None, :], dz.to(Z.dtype.element_ty), mask=mask)


# ---- launchers -----------------------------------------------------------------------------------------------

def _launch(kernel, z, *args):
    """Memory-bound streaming over the tile's rows: BLOCK_N rows x BLOCK_V contiguous columns per step (2 x 2048
    on a GPU: 16 elements per thread at 8 warps, coalesced rows; n_c / 2 programs, >= 512 for the N >= 1k of a
    training step). Fixed, not autotuned: both kernels update their buffers in place, so autotune's repeated
    trial runs would corrupt them. The interpreter gets small unequal blocks so the tests cross block edges in
    both directions."""
    n_rows, n_cols = z.shape
    if _INTERPRET:
        meta = dict(BLOCK_N=16, BLOCK_V=32, num_warps=4)
    else:
        meta = dict(BLOCK_N=2, BLOCK_V=min(2048, triton.next_power_of_2(n_cols)), num_warps=8)
    kernel[(triton.cdiv(n_rows, meta["BLOCK_N"]),)](z, z.stride(0), n_rows, n_cols, *args, **meta, **_LAUNCH_OPTS)


def _chunks(N: int, V: int) -> tuple[int, int]:
    """(n_c, v_c): rows and vocabulary columns of one logits tile, n_c * v_c <= _TILE_ELEMS."""
    n_c = max(1, min(N, _MAX_ROWS))
    v_c = max(1, _TILE_ELEMS // n_c)
    if v_c >= 8 * _V_ALIGN:
        v_c = v_c // _V_ALIGN * _V_ALIGN
    return n_c, min(V, v_c)


def _check(hidden, weight, targets, bias):
    assert hidden.dim() == 2 and weight.dim() == 2, f"hidden [N, C] and weight [V, C], got {hidden.shape}, " \
                                                    f"{weight.shape}"
    N, C = hidden.shape
    assert weight.shape[1] == C, f"weight {tuple(weight.shape)} does not match hidden's C = {C}"
    assert targets.shape == (N,), f"targets {tuple(targets.shape)} must be [N] = [{N}]"
    assert not targets.is_floating_point(), f"targets must be integer token ids, got {targets.dtype}"
    assert hidden.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {hidden.dtype}"
    assert weight.dtype == hidden.dtype, f"hidden {hidden.dtype} and weight {weight.dtype} must match"
    assert hidden.device == weight.device == targets.device, "hidden, weight, targets on different devices"
    if bias is not None:
        assert bias.shape == (weight.shape[0],) and bias.dtype == hidden.dtype, \
            f"bias must be [V] = [{weight.shape[0]}] in {hidden.dtype}, got {tuple(bias.shape)} {bias.dtype}"


def _row_stride(cols: int) -> int:
    return triton.cdiv(cols, _ROW_ALIGN) * _ROW_ALIGN


def _logits_tile(buf, h, w_c, b_c):
    """The [rows, cols] logits tile h @ w_c^T (+ b_c) in the input dtype, written into the reused buffer with row
    stride _row_stride(cols)."""
    rows, cols = h.shape[0], w_c.shape[0]
    ld = _row_stride(cols)
    z = buf[: rows * ld].view(rows, ld)[:, :cols]
    if b_c is None:
        torch.mm(h, w_c.t(), out=z)
    else:
        torch.addmm(b_c, h, w_c.t(), out=z)
    return z


@functools.cache
def _fp32_out_gemm(device: torch.device) -> bool:
    """Whether this torch has cuBLAS's half-precision GEMM with fp32 output and accumulate (torch.addmm
    out_dtype, CUDA only)."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        acc = torch.ones(16, 16, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool((acc == 17).all())
    except (RuntimeError, TypeError):
        return False


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc (fp32) += a @ b with the products accumulated in fp32 and no rounding of the partial sum."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _fp32_out_gemm(a.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif a.device.type == "cuda":
        acc.add_(a @ b)  # older torch: the chunk's partial is rounded once to the input dtype
    else:
        acc.addmm_(a.float(), b.float())  # CPU (tests): exact products, fp32 sums


def _logprobs_fwd(hidden, weight, targets, bias, ignore_index):
    """hidden [N, C], weight [V, C], targets [N] -> (logprobs [N], lse [N]), both fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    m = torch.full((N,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(N, dtype=torch.float32, device=dev)
    zy = torch.zeros(N, dtype=torch.float32, device=dev)
    if N == 0:
        return zy, m
    n_c, v_c = _chunks(N, V)
    buf = _alloc((n_c * _row_stride(v_c),), dtype=hidden.dtype, device=dev)
    for n0 in range(0, N, n_c):
        h = hidden[n0:n0 + n_c]
        for v0 in range(0, V, v_c):
            z = _logits_tile(buf, h, weight[v0:v0 + v_c], None if bias is None else bias[v0:v0 + v_c])
            _launch(_logprobs_fwd_kernel, z, targets[n0:], m[n0:], s[n0:], zy[n0:], v0)
    lse = m + torch.log(s)
    logp = torch.where(targets == ignore_index, 0.0, zy - lse)
    return logp, lse


def _logprobs_bwd(grad, hidden, weight, targets, bias, lse, ignore_index, needs):
    """Gradients (dhidden, dweight, dbias) of sum_n grad_n log p_n, each None unless asked for in `needs`."""
    N, C = hidden.shape
    V = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    need_h, need_w, need_b = needs
    dh32 = torch.zeros(N, C, dtype=torch.float32, device=dev) if need_h else None
    dw = _alloc((V, C), dtype=dtype, device=dev) if need_w else None
    db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_b else None
    if N == 0:
        if need_w:
            dw.zero_()
        return dh32, dw, db32
    g = grad.to(torch.float32).contiguous()
    n_c, v_c = _chunks(N, V)
    several_row_chunks = N > n_c
    buf = _alloc((n_c * _row_stride(v_c),), dtype=dtype, device=dev)
    for v0 in range(0, V, v_c):
        w_c = weight[v0:v0 + v_c]
        dw32 = torch.zeros(w_c.shape[0], C, dtype=torch.float32, device=dev) if need_w and several_row_chunks \
            else None
        for n0 in range(0, N, n_c):
            h = hidden[n0:n0 + n_c]
            z = _logits_tile(buf, h, w_c, None if bias is None else bias[v0:v0 + v_c])
            _launch(_logprobs_bwd_kernel, z, targets[n0:], lse[n0:], g[n0:], v0, ignore_index)
            dz = z  # rows, cols: now the logits' gradient
            if need_h:
                _addmm_fp32(dh32[n0:n0 + n_c], dz, w_c)
            if need_w:
                if several_row_chunks:
                    _addmm_fp32(dw32, dz.t(), h)
                else:
                    torch.mm(dz.t(), h, out=dw[v0:v0 + v_c])  # the whole N in one GEMM: fp32 sums inside
            if need_b:
                db32[v0:v0 + v_c] += dz.sum(0, dtype=torch.float32)
        if dw32 is not None:
            dw[v0:v0 + v_c].copy_(dw32)
    return dh32, dw, db32


class _FusedLinearLogprobs(torch.autograd.Function):
    """Runs with autocast off (fused_linear_logprobs has already cast the inputs), like torch.amp.custom_fwd: the
    GEMMs here write into preallocated tiles through out=, which autocast would not intercept anyway."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index):
        with torch.autocast(hidden.device.type, enabled=False):
            logp, lse = _logprobs_fwd(hidden, weight, targets, bias, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.ignore_index = ignore_index
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        with torch.autocast(hidden.device.type, enabled=False):
            dh32, dw, db32 = _logprobs_bwd(grad, hidden, weight, targets, bias, lse, ctx.ignore_index, needs)
        dh = None if dh32 is None else dh32.to(hidden.dtype)
        db = None if db32 is None else db32.to(bias.dtype)
        return dh, dw, None, db, None


# ---- public functions ----------------------------------------------------------------------------------------

def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """log softmax(hidden @ weight^T + bias)[target] per token, in fp32, without the [..., V] logits.

    hidden [..., C], weight [V, C], targets [...] (token ids in [0, V), or ignore_index) -> log-probs [...] fp32,
    0 at ignored positions (which get no gradient). Differentiable in hidden, weight and bias; inputs fp32, fp16
    or bf16 (hidden, weight and bias in one dtype); any N, C, V. Under autocast for the inputs' device, the
    inputs are cast to the autocast dtype first (as torch.amp.custom_fwd(cast_inputs=...) does), so the GEMMs
    run in it. On a CPU the kernels need TRITON_INTERPRET=1."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    lead = hidden.shape[:-1]
    assert targets.shape == lead, f"targets {tuple(targets.shape)} must match hidden's leading shape {tuple(lead)}"
    h2 = hidden.reshape(-1, hidden.shape[-1])  # N, C
    t1 = targets.reshape(-1).contiguous()  # N
    _check(h2, weight, t1, bias)
    return _FusedLinearLogprobs.apply(h2, weight, t1, bias, ignore_index).view(lead)


def fused_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            average: bool = False, bias: torch.Tensor | None = None,
                            ignore_index: int = -100) -> torch.Tensor:
    """Per row of hidden [R, T, C] / targets [R, T]: the sum of the labelled tokens' log-probs, or their mean if
    `average` (0 for a row with none). [R] fp32, under the caller's grad mode (a reference model calls it under
    torch.no_grad)."""
    logp = fused_linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index)  # R, T
    return reduce_rows(logp, targets != ignore_index, average)


def reduce_rows(logp: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Token log-probs [R, T] (0 where mask is False) -> per-row sums [R], or means over the mask if `average`."""
    sums = logp.sum(-1)
    return sums / mask.sum(-1).clamp_min(1) if average else sums


# ---- plain PyTorch twin --------------------------------------------------------------------------------------

def linear_logprobs_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        bias: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """The twin of fused_linear_logprobs: full logits in the input dtype, log_softmax in fp32, gather, 0 at
    ignored positions. Memory O(N V)."""
    logits = F.linear(hidden, weight, bias)  # ..., V
    logp = torch.log_softmax(logits.float(), dim=-1)
    ignored = targets == ignore_index
    picked = logp.gather(-1, targets.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)
