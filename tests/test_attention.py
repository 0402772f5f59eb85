"""kernels/attention.py against its plain PyTorch twin: forward and the three gradients (causal or not, GQA, sliding
window, T != S, ragged kv_lens, head dims that are not powers of two), the decode path, and the whole model with
attn="triton" against attn="ref". On a CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are small; on a GPU the same tests run natively."""

import pytest
import torch

import kernels.attention as attn_mod
from kernels.attention import flash_attention, flash_attention_ref, flash_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol, reason) against the fp32-scored reference on the same (upcast) inputs. Inputs are N(0, 1), so
# outputs are O(1) and gradients O(1) to O(10) (dV of a key seen by every query of a group sums all their dO);
# the measured maximum absolute errors over CASES (interpreter) are noted for each.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4, "fp32 inputs, dots in tf32x3 on a GPU (each product split in a high and a low "
                                "tf32 part, three tensor-core products, relative error ~2^-21 against ~2^-11 for "
                                "plain tf32), fp32 sums: only the summation order and that split differ from the "
                                "reference; the interpreter forms exact fp32 products: measured max 4.1e-6 (dV)"),
    torch.float16: (1e-2, 1e-2, "P and dS are rounded to fp16 (2^-11) before the tensor-core dots, as in "
                                "FlashAttention-2, and gradients sum up to S such terms: measured max 3.9e-3 (dV)"),
    # bf16 runs in the interpreter too: kernels/attention.py widens bf16 dot operands to fp32 there (numpy has no
    # bf16), which forms the same exact products the tensor cores do.
    torch.bfloat16: (6e-2, 5e-2, "bf16 keeps 8 mantissa bits (2^-8), 8x fp16's rounding of P and dS: measured "
                                 "max 3.1e-2 on O(1) values, 6.9e-2 on a dV of magnitude ~9 (rtol covers it)"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# id: (B, H, KVH, T, S, D, causal, window, kv_lens)
CASES = {
    "mha-causal": (2, 2, 2, 100, 100, 32, True, None, None),
    "mha-full": (2, 2, 2, 100, 100, 32, False, None, None),
    "gqa2-causal-T<S": (1, 4, 2, 37, 100, 64, True, None, None),
    "gqa4-full-T<S-d16": (1, 4, 1, 37, 100, 16, False, None, None),
    "gqa4-causal-T>S": (1, 4, 1, 100, 37, 32, True, None, None),  # the first 63 queries see no key
    "window16": (1, 2, 2, 100, 100, 32, True, 16, None),
    "gqa2-window24-T<S-d80": (1, 4, 2, 37, 100, 80, True, 24, None),  # D padded to 128 in the kernel
    "window1": (1, 2, 1, 37, 37, 16, True, 1, None),  # each query sees only itself
    # windows wider than a tile, so the unmasked middle range exists and its edges are exercised; offsets of 0 and
    # 46 (T=50, S=96) put the causal diagonal and the window edge at different places inside a tile
    "gqa2-window47": (1, 2, 1, 100, 100, 32, True, 47, None),
    "gqa2-window80-T<S": (1, 4, 2, 50, 96, 64, True, 80, None),
    "kvlens-causal": (2, 2, 1, 100, 100, 32, True, None, [100, 61]),
    "kvlens-window-T<S": (2, 4, 2, 37, 100, 32, True, 20, [100, 53]),
    "kvlens-full": (2, 2, 2, 37, 100, 64, False, None, [77, 1]),
    "kvlens-empty-row": (2, 2, 1, 37, 64, 16, True, None, [0, 20]),  # row 0 sees nothing at all
}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels allocate starts as NaN, so an element a kernel forgets to write fails the test."""
    monkeypatch.setattr(attn_mod, "_alloc", lambda shape, *, dtype, device: torch.full(shape, float("nan"),
                                                                                       dtype=dtype, device=device))


# the autotuned kernels by the names of attn_mod.GPU_CONFIGS, with their pruners
AUTOTUNED = {"fwd": (attn_mod._attn_fwd_kernel, attn_mod._FWD_PRUNE),
             "dkdv": (attn_mod._attn_bwd_dkdv_kernel, attn_mod._DKDV_PRUNE),
             "dq": (attn_mod._attn_bwd_dq_kernel, attn_mod._DQ_PRUNE)}


def force_configs(monkeypatch, kind, configs):
    """Narrow one autotuned kernel's candidates to `configs` for the test (its tuning cache emptied); returns it."""
    kernel = AUTOTUNED[kind][0]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    return kernel


def make_inputs(B, H, KVH, T, S, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen).to(DEVICE, dtype)
               for shape in ((B, H, T, D), (B, KVH, S, D), (B, KVH, S, D)))
    do = torch.randn((B, H, T, D), generator=gen).to(DEVICE, dtype)
    return q, k, v, do


def forward_backward(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(o.dtype)))


def assert_all_close(actual, expected, atol, rtol):
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected):
        assert torch.isfinite(a).all(), f"{name}: NaN or Inf (an unwritten element, or a row without keys)"
        torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_and_gradients_match_reference(case, dtype):
    B, H, KVH, T, S, D, causal, window, kv_lens = case
    kw = dict(causal=causal, window=window, kv_lens=None if kv_lens is None else torch.tensor(kv_lens, device=DEVICE))
    q, k, v, do = make_inputs(B, H, KVH, T, S, D, dtype)
    ours = forward_backward(flash_attention, q, k, v, do, **kw)
    ref = forward_backward(flash_attention_ref, q.float(), k.float(), v.float(), do.float(), **kw)
    assert all(x.dtype == dtype for x in ours)
    atol, rtol, _ = TOLERANCES[dtype]
    assert_all_close(ours, ref, atol, rtol)
    if kv_lens is not None:  # keys past a row's length get exactly zero gradient
        for b, n in enumerate(kv_lens):
            assert (ours[2][b, :, n:] == 0).all() and (ours[3][b, :, n:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_is_the_dtypes_not_the_kernels(dtype):
    """Justifies the table: against an fp64 truth, the kernel's error is within 2x (+ a rounding unit) of the
    error of the same math done naively in the low-precision dtype (FlashAttention's own test criterion)."""
    B, H, KVH, T, S, D, causal, window, kv_lens = CASES["gqa2-window24-T<S-d80"]
    q, k, v, do = make_inputs(B, H, KVH, T, S, D, dtype, seed=1)
    kw = dict(causal=causal, window=window)
    truth = forward_backward(flash_attention_ref, q.double(), k.double(), v.double(), do.double(), **kw)
    ours = forward_backward(flash_attention, q, k, v, do, **kw)
    naive = forward_backward(naive_in_dtype, q, k, v, do, **kw)
    for name, a, n, t in zip(("o", "dq", "dk", "dv"), ours, naive, truth):
        err_ours, err_naive = (a.double() - t).abs().max().item(), (n.double() - t).abs().max().item()
        assert err_ours <= 2 * err_naive + torch.finfo(dtype).eps, f"{name}: {err_ours:.2e} vs naive {err_naive:.2e}"


def naive_in_dtype(q, k, v, *, causal, window):
    """softmax(q k^T / sqrt(D) + mask) v with every op in q's dtype (scores too): the error floor of the dtype."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # B, H, S, D
    T, S = q.shape[2], k.shape[2]
    mask = attn_mod.visibility_mask(q.shape[0], T, S, causal=causal, window=window, device=q.device)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # B, H, T, S
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


@pytest.mark.parametrize("T,S,window", [(48, 48, 17), (64, 64, 18), (48, 48, 33), (20, 48, 13), (40, 57, 30),
                                         (37, 64, 47)], ids=lambda x: str(x))
def test_window_edges_at_every_tile_alignment(T, S, window):
    """Small fp32 shapes whose window edges and causal diagonals fall on, just before and just after tile
    boundaries (the interpreter's tiles are 32 x 16 forward and 16 x 32 for dK/dV), so an off-by-one in the loop
    bounds (a skipped or an unmasked tile) shows up."""
    q, k, v, do = make_inputs(1, 2, 1, T, S, 16, torch.float32, seed=T + window)
    ours = forward_backward(flash_attention, q, k, v, do, window=window)
    ref = forward_backward(flash_attention_ref, q, k, v, do, window=window)
    atol, rtol, _ = TOLERANCES[torch.float32]
    assert_all_close(ours, ref, atol, rtol)


def test_strided_inputs_and_explicit_scale():
    """q, k, v as the model makes them (a transpose of [B, T, H, D]), a non-default sm_scale."""
    B, H, KVH, T, S, D = 2, 4, 2, 37, 37, 32
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, T, H, D, generator=gen).to(DEVICE).transpose(1, 2)
    k, v = (torch.randn(B, S, KVH, D, generator=gen).to(DEVICE).transpose(1, 2) for _ in range(2))
    do = torch.randn(B, H, T, D, generator=gen).to(DEVICE)
    assert not q.is_contiguous()
    ours = forward_backward(flash_attention, q, k, v, do, sm_scale=0.3, window=9)
    ref = forward_backward(flash_attention_ref, q, k, v, do, sm_scale=0.3, window=9)
    atol, rtol, _ = TOLERANCES[torch.float32]
    assert_all_close(ours, ref, atol, rtol)


# id: (B, H, KVH, T, S_max, D, window, kv_lens, num_splits); None lets the launcher choose the splits
DECODE_CASES = {
    "mha-1tok-auto-splits": (2, 4, 4, 1, 128, 32, None, [128, 5], None),
    "gqa2-4tok-3splits": (2, 4, 2, 4, 200, 64, None, [200, 37], 3),
    "gqa4-16tok-window": (2, 4, 1, 16, 128, 16, 17, [128, 40], None),
    "d80-window-8splits": (1, 4, 2, 3, 150, 80, 33, [150], 8),
    "empty-and-short-rows": (3, 4, 2, 2, 96, 16, None, [2, 96, 0], 8),  # more splits than a short row has keys
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(DECODE_CASES.values()), ids=list(DECODE_CASES))
def test_decode_matches_reference(case, dtype):
    B, H, KVH, T, S, D, window, kv_lens, num_splits = case
    q, k, v, _ = make_inputs(B, H, KVH, T, S, D, dtype, seed=3)
    kv_lens = torch.tensor(kv_lens, device=DEVICE)
    out = flash_decode(q, k, v, kv_lens, window=window, num_splits=num_splits)
    ref = flash_attention_ref(q.float(), k.float(), v.float(), window=window, kv_lens=kv_lens)
    assert out.dtype == dtype and torch.isfinite(out).all()
    atol, rtol, _ = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def test_decode_clamps_kv_lens_to_the_cache():
    """kv_lens above S_max act as S_max (as in the prefill): the cache is a view into a longer NaN-filled buffer,
    so a kernel reading keys past S_max returns NaN."""
    B, H, KVH, T, S, D = 2, 4, 2, 2, 64, 16
    q, k, v, _ = make_inputs(B, H, KVH, T, S, D, torch.float32, seed=4)
    k_buf, v_buf = (torch.full((B, KVH, S + 64, D), float("nan"), device=DEVICE) for _ in range(2))
    k_buf[:, :, :S], v_buf[:, :, :S] = k, v
    out = flash_decode(q, k_buf[:, :, :S], v_buf[:, :, :S], torch.tensor([S + 50, 10], device=DEVICE))
    ref = flash_attention_ref(q, k, v, kv_lens=torch.tensor([S, 10], device=DEVICE))
    atol, rtol, _ = TOLERANCES[torch.float32]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("T,row", [(300, 2**23), (40, 2**26)], ids=["tile-bases", "in-tile"])
def test_offsets_past_2_31_elements(T, row, monkeypatch):
    """Row offsets t * stride_t above 2^31 elements (as T * H * D is at T = 256k, H * D = 8192) must not wrap in
    int32: q, k, v are [1, 1, T, 16] views with a huge row stride into one fp16 buffer of ~2.5e9 elements (5 GB of
    address space, of which only the T rows touched get memory). 300 rows of 2^23: rows >= 256 sit past 2^31, in
    tiles whose first row the kernels address in int64. 40 rows of 2^26: even offsets inside one 128-row tile
    would wrap in int32, so the launcher copies (the first GPU run hit an illegal address here). The GPU's
    128-row tiles are forced, on a CPU too: there, without the copy, the interpreter reads wild host memory and
    the process dies."""
    D = 16
    for kind in ("fwd", "dq"):
        tall = [c for c in attn_mod.GPU_CONFIGS[kind] if c.kwargs["BLOCK_M"] == attn_mod._MAX_TILE_ROWS][:1]
        force_configs(monkeypatch, kind, tall)
    buf = torch.empty((T - 1) * row + 3 * D, dtype=torch.float16, device=DEVICE)
    q, k, v = (buf.as_strided((1, 1, T, D), (0, 0, row, 1), storage_offset=i * D) for i in range(3))
    small = make_inputs(1, 1, 1, T, T, D, torch.float16, seed=5)
    for big, x in zip((q, k, v), small):
        big.copy_(x)
    buf.requires_grad_()  # q, k, v become views with a grad_fn; their gradients are asked for directly below
    q, k, v = (buf.as_strided((1, 1, T, D), (0, 0, row, 1), storage_offset=i * D) for i in range(3))
    assert q.stride(2) * (T - 1) >= 2**31
    o = flash_attention(q, k, v)
    ours = (o, *torch.autograd.grad(o, (q, k, v), small[3]))
    ref = forward_backward(flash_attention_ref, *(x.float() for x in small))
    atol, rtol, _ = TOLERANCES[torch.float16]
    assert_all_close(ours, ref, atol, rtol)


def test_autocast_runs_in_the_autocast_dtype():
    """Under autocast (the trainer's bf16; here CPU autocast) both entry points cast q, k, v as torch's SDPA does
    and return the autocast dtype; gradients reach the fp32 leaves in fp32."""
    q, k, v, do = make_inputs(1, 4, 2, 37, 37, 32, torch.float32, seed=6)
    q.requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        o = flash_attention(q, k, v)
        o_dec = flash_decode(q[:, :, -2:], k, v, torch.tensor([37], device=DEVICE))
    assert o.dtype == o_dec.dtype == torch.bfloat16
    o.backward(do.bfloat16())
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    ref = flash_attention_ref(*(x.bfloat16().float() for x in (q.detach(), k, v)))
    atol, rtol, _ = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(o.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(o_dec.float(), ref[:, :, -2:], atol=atol, rtol=rtol)


def test_autotune_key_separates_gqa_ratio_and_query_and_key_lengths():
    """dK/dV's work per program grows with G = H / KVH, and a short prefill against a long cache (T << S) wants
    other tiles than T = S: both must reach the autotune key, T and S in separate power-of-two buckets."""
    for kernel in (attn_mod._attn_fwd_kernel, attn_mod._attn_bwd_dkdv_kernel, attn_mod._attn_bwd_dq_kernel):
        assert {"G", "LOG2_T", "LOG2_S", "HEAD_D"} <= set(kernel.keys)
    q = torch.empty(1, 8, 512, 64)
    k = torch.empty(1, 2, 32768, 64)
    common = attn_mod._common(q, k, None, None)
    assert (common["G"], common["LOG2_T"], common["LOG2_S"]) == (4, 10, 16)


def _forced_cases():
    """(kernel, config, dtype, D) for every GPU autotune candidate and every dtype the pruner gives it, at D = 128
    or, for the tiles made for smaller head dims, 64 (the
    forward's fp32 tiles serve fp32 alone, its others the 16-bit dtypes; dK/dV and dQ tiles serve any dtype
    whose tiles fit in shared memory). In the interpreter, which ignores warps and stages and runs fp16 and bf16
    through the same widened dots: bf16, and fp32 for the forward's fp32 tiles."""
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if DEVICE == "cuda" else [torch.bfloat16,
                                                                                       torch.float32]
    for kind, configs in attn_mod.GPU_CONFIGS.items():
        keeps = AUTOTUNED[kind][1]["early_config_prune"].keeps
        for cfg in configs:
            tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
            name = "{}x{}-w{}-s{}".format(*tile)
            for dtype in dtypes:  # those the pruner lets this config serve, at the largest model head dim it can
                D = next((D for D in (128, 64) if keeps(cfg, dtype.itemsize, D, False)), None)
                if D is None or (DEVICE != "cuda" and dtype == torch.float32 and kind != "fwd"):
                    continue  # the interpreter: one dtype per dK/dV, dQ config is enough for the tile logic
                yield pytest.param(kind, cfg, dtype, D, id=f"{kind}-{name}-{str(dtype).removeprefix('torch.')}-d{D}")


@pytest.mark.parametrize("kind,cfg,dtype,D", list(_forced_cases()))
def test_every_gpu_autotune_config_matches_reference(kind, cfg, dtype, D, monkeypatch):
    """Autotuning picks one config per shape, so most candidates would never run in the other tests: each is
    forced here (the kernel's candidate list narrowed to it) on a GQA causal problem whose T crosses several
    128-row tiles and ends ragged, forward and all three gradients against the twin. On a GPU T = 300 and D = 128
    (the model's head dim, the register-heaviest) or 64 for the fp32 tiles made for it; in the interpreter T = 150
    and D = 64, where the tiles' logic is the same and time is short."""
    kernel = force_configs(monkeypatch, kind, [cfg])
    shape = (1, 4, 2, 300, 300, D) if DEVICE == "cuda" else (1, 2, 1, 150, 150, 64)
    q, k, v, do = make_inputs(*shape, dtype, seed=7)
    ours = forward_backward(flash_attention, q, k, v, do)
    ref = forward_backward(flash_attention_ref, *(x.float() for x in (q, k, v)), do.float())
    atol, rtol, _ = TOLERANCES[dtype]
    assert_all_close(ours, ref, atol, rtol)
    assert kernel.best_config is cfg  # the forced config is the one that ran


def test_window_and_non_causal_are_refused():
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(AssertionError, match="causal"):
        flash_attention(q, q, q, causal=False, window=2)


def test_model_logits_and_kv_cache_match_reference_backend():
    """The whole model (GQA + Mistral window) with attn="triton" gives attn="ref"'s logits, in a full forward and
    when decoding through the KV cache (a 20-token prefill uses flash_attention with kv_lens, chunks of 1 and 3
    use flash_decode)."""
    from minisirev.config import ModelConfig
    from minisirev.model import Transformer

    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                      sliding_window=5, model_type="mistral")
    model = Transformer(cfg, attn="ref").init_weights(seed=0).to(DEVICE)
    x = torch.randint(0, cfg.vocab_size, (2, 27), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ref = model(x)
        model.attn = "triton"
        full = model(x)
        cache = model.new_cache(2, 32)
        steps = [model(x[:, :20], pos=torch.zeros(2, dtype=torch.long, device=DEVICE), cache=cache, kv_len=20)]
        t = 20
        for size in (1, 3, 1, 2):
            steps.append(model(x[:, t:t + size], pos=torch.full((2,), t, device=DEVICE), cache=cache, kv_len=t + size))
            t += size
    # fp32 both ways; the kernels sum in a different order than the reference's matmuls
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), ref[:, :t], atol=1e-5, rtol=1e-5)
