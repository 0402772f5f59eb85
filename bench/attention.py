"""Flash attention benchmark: kernels/attention.py against the implementations a user would otherwise pick.

Providers (each n/a where it does not apply or is not installed):
    ours         kernels.attention.flash_attention (prefill, training) / flash_decode (decode)
    sdpa-flash   torch SDPA restricted to SDPBackend.FLASH_ATTENTION, enable_gqa=True (no mask: no window, no kv_lens)
    sdpa-cudnn   torch SDPA restricted to SDPBackend.CUDNN_ATTENTION, same inputs
    flex         torch FlexAttention (torch.compile'd) with a causal / sliding-window block mask
    flash-attn   the flash-attn package (flash_attn_func, window_size for Mistral; flash_attn_with_kvcache for
                 decode), when installed
    naive        kernels.attention.flash_attention_ref (explicit mask, fp32 scores; n/a where those would not fit)

Figures. Model FLOPs count the visible query-key pairs exactly: 4 * D * pairs per head (two matmuls, 2 FLOPs per
multiply-add; pairs = T * S, about half of it causal, about T * W with a window), x2.5 backward, x3.5 both
(FlashAttention-2's convention). Hardware FLOPs are what our kernels execute with the autotune config they chose:
whole BLOCK_M x BLOCK_N tiles, including the masked parts of the diagonal and window edges, 2 matmuls forward, 4
(dK/dV kernel) + 3 (dQ kernel) backward, the recomputed Q K^T included. Decode is memory-bound: GB/s of the K/V
rows read (kv_lens per row) plus q and o. Timing: CUDA events around each call, the L2 cache flushed between
calls, the median of at least --min-runs calls and at least --min-seconds of them (triton's do_bench default of
100 ms gives one to three samples at large T). Every provider's output is checked against the fp32 reference at
every shape before it is timed (on the first batch row and the first KV group, query rows in chunks, so the check
fits in memory); gradients are checked against ours. Results: a markdown table per sweep plus a PNG plot, in
bench/results/attention_<gpu>.md / .png, with the chosen autotune configs.

    python bench/attention.py                     # every sweep
    python bench/attention.py --sweeps seqlen     # one sweep (or several: seqlen-gqa4, gqa, headdim, window, ...)
    python bench/attention.py --smoke             # tiny shapes under the Triton interpreter, CPU (tests use it)
"""

import argparse
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
# ---- what to run ----
parser.add_argument("--sweeps", nargs="*",
                    default=["seqlen", "seqlen-gqa4", "gqa", "headdim", "window", "kvlens", "decode"],
                    help="which sweeps: seqlen (MHA), seqlen-gqa4 (4 query heads per KV head), gqa, headdim, window, "
                         "kvlens, decode")
parser.add_argument("--modes", nargs="*", default=["fwd", "bwd", "fwd+bwd"], help="fwd, bwd, fwd+bwd (not decode)")
parser.add_argument("--providers", nargs="*", default=["ours", "sdpa-flash", "sdpa-cudnn", "flex", "flash-attn",
                                                       "naive"], help="which implementations")
parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype")
# ---- timing ----
parser.add_argument("--min-runs", type=int, default=10, help="at least this many timed calls per figure")
parser.add_argument("--min-seconds", type=float, default=2.0, help="and at least this long in total")
# ---- output ----
parser.add_argument("--out", default=None, help="result file (default bench/results/attention_<gpu>.md)")
parser.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under the Triton interpreter: runs every step, times nothing real")
args = parser.parse_args()

if args.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels.attention is imported: @triton.jit reads it then

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available() and not args.smoke:
    print("bench/attention.py needs a CUDA GPU (or --smoke for the interpreter run); nothing measured")
    sys.exit(0)

import kernels.attention as A  # noqa: E402

DEVICE = torch.device("cpu" if args.smoke else "cuda")
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
# bf16 / fp16 against the fp32 reference: tests/test_attention.py's TOLERANCES
ATOL, RTOL = {torch.bfloat16: (6e-2, 5e-2), torch.float16: (1e-2, 1e-2)}[DTYPE]

try:
    import flash_attn
except ImportError:
    flash_attn = None

# ---- sweeps: name -> (x label, [(x, case)]); case = dict(B, H, KVH, T, S, D, window, kv_frac) --------------------
TOKENS, MODEL_DIM = (64, 64) if args.smoke else (16384, 2048)  # B * T and H * D (FlashAttention-2's setting)


def case(T, D=128, G=1, S=None, window=None, kv_frac=None, tokens=TOKENS, dim=MODEL_DIM):
    H = max(1, dim // D)
    return dict(B=max(1, tokens // T), H=H, KVH=max(1, H // G), T=T, S=S or T, D=D, window=window, kv_frac=kv_frac)


if args.smoke:
    SWEEPS = {
        "seqlen": ("T", [(47, case(47, D=32))]),
        "seqlen-gqa4": ("T", [(47, case(47, D=32, G=4, dim=128))]),
        "gqa": ("G", [(2, case(32, D=32, G=2))]),
        "headdim": ("D", [(16, case(32, D=16))]),
        "window": ("W", [(20, case(48, D=32, window=20))]),
        "kvlens": ("kv_lens / S", [(0.5, case(16, D=32, S=48, kv_frac=0.5))]),
        "decode": ("S", [(96, case(1, D=32, G=2, S=96, tokens=2, kv_frac=0.75))]),
    }
else:
    SWEEPS = {
        "seqlen": ("T", [(T, case(T)) for T in (512, 1024, 2048, 4096, 8192, 16384)]),
        "seqlen-gqa4": ("T", [(T, case(T, G=4)) for T in (1024, 2048, 4096, 8192, 16384)]),  # Llama 3's 4:1
        "gqa": ("G = H / KVH", [(G, case(4096, G=G)) for G in (1, 2, 4, 8, 16)]),
        "headdim": ("D", [(D, case(4096, D=D)) for D in (32, 64, 128, 256)]),
        "window": ("W", [(W, case(16384, window=W)) for W in (512, 1024, 2048, 4096, 8192)]),
        # a prefill of 512 new tokens against a cache of S rows, each row kv_lens = kv_frac * S valid
        "kvlens": ("kv_lens / S", [(f, case(512, G=4, S=8192, kv_frac=f, tokens=8 * 512)) for f in (0.25, 0.5, 1.0)]),
        "decode": ("S", [(S, case(1, G=4, S=S, tokens=64, kv_frac=0.9)) for S in (1024, 4096, 16384, 65536)]),
    }
SWEEPS = {k: v for k, v in SWEEPS.items() if k in args.sweeps}


def make_inputs(c):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(c["B"], c["H"], c["T"], c["D"], device=DEVICE, dtype=DTYPE, generator=gen)
    k, v = (torch.randn(c["B"], c["KVH"], c["S"], c["D"], device=DEVICE, dtype=DTYPE, generator=gen)
            for _ in range(2))
    kv_lens = None
    if c["kv_frac"] is not None:  # ragged rows: kv_frac * S for the first row, down to half of it for the last
        lens = [max(c["T"], int(c["S"] * c["kv_frac"] * (1 - 0.5 * b / max(1, c["B"] - 1)))) for b in range(c["B"])]
        kv_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    return q, k, v, kv_lens


# ---- providers: forward closures, or None where they do not apply -------------------------------------------------

def provider_fn(name, q, k, v, c, kv_lens, decode):
    window, G = c["window"], c["H"] // c["KVH"]
    if name == "ours":
        if decode:
            return lambda: A.flash_decode(q, k, v, kv_lens, window=window)
        return lambda: A.flash_attention(q, k, v, window=window, kv_lens=kv_lens)
    if name in ("sdpa-flash", "sdpa-cudnn"):
        if DEVICE.type != "cuda" or window is not None or kv_lens is not None or decode:
            return None  # these backends take no mask (is_causal is top-left aligned: T == S only)
        if c["T"] != c["S"]:
            return None
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION

        def sdpa():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
        return sdpa
    if name == "flex":
        if DEVICE.type != "cuda" or decode or kv_lens is not None:
            return None
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        T, S = c["T"], c["S"]

        def mask_mod(b, h, qi, kj):  # bottom-right causal, and the window
            pos = qi + (S - T)
            keep = kj <= pos
            return keep & (pos - kj < window) if window is not None else keep
        block_mask = create_block_mask(mask_mod, None, None, T, S, device=DEVICE)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=G > 1)
    if name == "flash-attn":
        if flash_attn is None or DEVICE.type != "cuda":
            return None
        ws = (window - 1, 0) if window is not None else (-1, -1)
        if decode:
            kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # B, S, KVH, D (untimed)
            qt = q.transpose(1, 2).contiguous()
            return lambda: flash_attn.flash_attn_with_kvcache(qt, kc, vc, cache_seqlens=kv_lens, causal=True,
                                                              window_size=ws).transpose(1, 2)
        if kv_lens is not None:
            return None

        def fa():  # its layout is [B, T, H, D]: the transposes are views, as the model would pass them
            return flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                              window_size=ws).transpose(1, 2)
        return fa
    if name == "naive":
        if c["B"] * c["H"] * c["T"] * c["S"] * 4 * 4 > 16 * 2**30:  # fp32 scores, probs and grads in ~16 GB
            return None
        if decode:
            return lambda: A.flash_attention_ref(q, k, v, window=window, kv_lens=kv_lens)
        return lambda: A.flash_attention_ref(q, k, v, window=window, kv_lens=kv_lens)
    raise ValueError(f"unknown provider {name!r}")


# ---- correctness, before any timing --------------------------------------------------------------------------------

def reference_first_group(q, k, v, c, kv_lens, chunk=1024):
    """fp32 reference for batch row 0 and the query heads of KV head 0, query rows in chunks (memory T/chunk x
    smaller): a chunk of queries [t0, t1) sees keys [0, kv_len - T + t1), bottom-right aligned as the whole."""
    G = c["H"] // c["KVH"]
    T = c["T"]
    kv_len = int(kv_lens[0]) if kv_lens is not None else c["S"]
    q0, k0, v0 = q[:1, :G].float(), k[:1, :1].float(), v[:1, :1].float()
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        end = max(0, kv_len - T + t1)
        outs.append(A.flash_attention_ref(q0[:, :, t0:t1], k0[:, :, :end], v0[:, :, :end], window=c["window"]))
    return torch.cat(outs, 2)


def check(name, out, ref, G):
    got = out[:1, :G].float()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: NaN or Inf in the output")
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ---- timing --------------------------------------------------------------------------------------------------------

def time_ms(fn, leaves=()):
    """Median ms of fn() over at least --min-runs calls and --min-seconds, the L2 cache flushed before each call
    and the leaves' .grad cleared outside the timed region. On the CPU (--smoke) two wall-clock calls."""
    def reset():
        for x in leaves:
            x.grad = None
    if DEVICE.type != "cuda":
        times = []
        for _ in range(2):
            reset()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), len(times)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    reset()
    fn()  # warm-up: autotuning, compilation
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reset()
    fn()
    torch.cuda.synchronize()
    estimate_ms = (time.perf_counter() - t0) * 1e3
    n = max(args.min_runs, math.ceil(args.min_seconds * 1e3 / max(estimate_ms, 1e-3)))
    starts, ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)], \
        [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        reset()
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)), n


# ---- FLOPs ---------------------------------------------------------------------------------------------------------

def visible_pairs(T, S, window, kv_len=None):
    """Exact count of visible (query, key) pairs of one head, causal bottom-right (query i at kv_len - T + i)."""
    kv_len = S if kv_len is None else kv_len
    total = 0
    for i in range(T):
        pos = kv_len - T + i
        lo = 0 if window is None else max(0, pos - window + 1)
        total += max(0, min(pos, kv_len - 1) - lo + 1)
    return total


def tile_pairs(T, S, window, bm, bn, kv_len=None):
    """(query, key) pairs our forward / dQ kernels compute with BLOCK_M = bm, BLOCK_N = bn: the key range of each
    query tile (kernels/attention.py, _query_tile_key_ranges) in whole tiles, padding rows included."""
    kv_len = S if kv_len is None else kv_len
    total = 0
    for m0 in range(0, T, bm):
        p0 = kv_len - T + m0
        hi = max(min(kv_len, p0 + bm), 0)
        lo = 0 if window is None else max(p0 - window + 1, 0) // bn * bn
        total += bm * (math.ceil(max(hi - lo, 0) / bn) * bn)
    return total


def best(kernel):
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return None
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def fmt_cfg(cfg):
    return "-" if cfg is None else f"{cfg[0]}x{cfg[1]} w{cfg[2]} s{cfg[3]}"


# ---- run -----------------------------------------------------------------------------------------------------------

device_name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu-interpreter-smoke"
import triton  # noqa: E402

lines = [f"# Flash attention, {device_name}", "",
         f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}, triton "
         f"{triton.__version__}, {args.dtype}. Medians of >= {args.min_runs} calls and >= {args.min_seconds} s "
         "(CUDA events, L2 flushed). Model TFLOP/s count visible pairs (x2.5 backward, x3.5 both); hw TFLOP/s what "
         "our kernels execute with the chosen configs (whole tiles). Every output was checked against the fp32 "
         "reference first." + (" SMOKE RUN: interpreter timings, meaningless." if args.smoke else ""), ""]
plots = {}  # (sweep, mode) -> {provider: [(x, figure)]}
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
failures = []
for sweep, (xlabel, cases) in SWEEPS.items():
    decode = sweep == "decode"
    for mode in (["decode"] if decode else args.modes):
        unit = "GB/s" if decode else "model TFLOP/s"
        cols = [xlabel, *args.providers] + ([] if decode else ["ours hw TFLOP/s"]) + ["ours configs"]
        table = [f"### {sweep}, {mode} ({unit})", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        print(f"{sweep} {mode} ({unit})")
        series = plots.setdefault((sweep, mode), {})
        for x, c in cases:
            q, k, v, kv_lens = make_inputs(c)
            G = c["H"] // c["KVH"]
            kv_row = kv_lens.tolist() if kv_lens is not None else [c["S"]] * c["B"]
            pairs = sum(visible_pairs(c["T"], c["S"], c["window"], n) for n in kv_row) * c["H"]
            model_flops = 4 * c["D"] * pairs * MODE_FACTOR.get(mode, 1.0)
            bytes_moved = (2 * sum(kv_row) * c["KVH"] * c["D"] + 2 * q.numel()) * q.element_size()
            ref = reference_first_group(q, k, v, c, kv_lens)
            do = torch.randn(q.shape, device=DEVICE, dtype=DTYPE, generator=torch.Generator(DEVICE).manual_seed(1))
            row, hw, cfgs, ours_grads = [str(x)], "-", "-", None
            for name in args.providers:
                leaves = [x_.detach().requires_grad_(mode != "fwd" and not decode) for x_ in (q, k, v)]
                fn = provider_fn(name, *leaves, c, kv_lens, decode)
                if fn is None:
                    row.append("n/a")
                    continue
                try:
                    out = fn()
                    check(name, out, ref, G)
                    if mode in ("fwd", "decode"):
                        run, timed_leaves = fn, []
                    else:
                        grads = torch.autograd.grad(out, leaves, do)
                        if name == "ours":
                            ours_grads = grads
                        elif ours_grads is not None:
                            for g_name, a, b in zip(("dq", "dk", "dv"), grads, ours_grads):
                                torch.testing.assert_close(a.float(), b.float(), atol=2 * ATOL, rtol=2 * RTOL,
                                                           msg=lambda m, n=g_name: f"{name} {n} vs ours: {m}")
                        if mode == "bwd":
                            out = fn()
                            run = lambda out=out, do=do: out.backward(do, retain_graph=True)  # noqa: E731
                        else:
                            run = lambda fn=fn, do=do: fn().backward(do)  # noqa: E731
                        timed_leaves = leaves
                    ms, n = time_ms(run, timed_leaves)
                except torch.cuda.OutOfMemoryError:
                    row.append("oom")
                    continue
                except AssertionError as e:
                    failures.append(f"{sweep} {mode} x={x}: {str(e).splitlines()[0]}")
                    row.append("WRONG")
                    continue
                except (RuntimeError, ValueError, TypeError) as e:  # e.g. a backend refusing a shape
                    row.append("error: " + str(e).splitlines()[0][:50])
                    continue
                figure = bytes_moved / ms * 1e-6 if decode else model_flops / ms * 1e-9
                row.append(f"{figure:.3g}")
                series.setdefault(name, []).append((x, figure))
                if name == "ours":
                    if decode:
                        cfgs = "decode (fixed tiles)"
                    else:
                        f_cfg = best(A._attn_fwd_kernel)
                        dkdv, dq = best(A._attn_bwd_dkdv_kernel), best(A._attn_bwd_dq_kernel)
                        T, S, w = c["T"], c["S"], c["window"]
                        hw_pairs = sum(tile_pairs(T, S, w, *f_cfg[:2], n) for n in kv_row) * c["H"]
                        hw_flops = 4 * c["D"] * hw_pairs
                        if mode != "fwd" and dkdv and dq:  # 4 matmuls per dK/dV tile pair, 3 per dQ one
                            bwd = 2 * c["D"] * c["H"] * sum(4 * tile_pairs(T, S, w, *dkdv[:2], n) +
                                                            3 * tile_pairs(T, S, w, *dq[:2], n) for n in kv_row)
                            hw_flops = bwd + (hw_flops if mode == "fwd+bwd" else 0)
                        hw = f"{hw_flops / ms * 1e-9:.3g}"
                        cfgs = f"fwd {fmt_cfg(f_cfg)}" + ("" if mode == "fwd" else
                                                          f"; dkdv {fmt_cfg(dkdv)}; dq {fmt_cfg(dq)}")
            row += ([] if decode else [hw]) + [cfgs]
            print("  " + " | ".join(row))
            table.append("| " + " | ".join(row) + " |")
            del q, k, v
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
        lines += table + [""]

if failures:
    lines += ["## Correctness failures (not timed)", "", *[f"- {f}" for f in failures], ""]

slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"attention_{slug}.md"
out.parent.mkdir(parents=True, exist_ok=True)
png = out.with_suffix(".png")
lines.insert(2, f"Plot: {png.name}")
lines.insert(3, "")
out.write_text("\n".join(lines))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, axes = plt.subplots(1, len(plots), figsize=(4 * len(plots), 3.5), squeeze=False)
for ax, ((sweep, mode), series) in zip(axes[0], plots.items()):
    for name, pts in series.items():
        ax.plot([str(p[0]) for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_title(f"{sweep} {mode}", fontsize=9)
    ax.set_xlabel(SWEEPS[sweep][0])
    ax.set_ylabel("GB/s" if sweep == "decode" else "model TFLOP/s")
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(png, dpi=100)
print(f"wrote {out} and {png}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
