"""Flash attention benchmark in the Triton tutorial format (06-fused-attention): TFLOP/s of kernels/attention.py
against torch SDPA's flash backend and the naive PyTorch reference, forward, backward and both.

    FLOPs (forward) = 4 * B * H * T * S * D     (two matmuls, 2 FLOPs per multiply-add)
                      x 0.5 when causal (T == S); with a sliding window W, 4 * B * H * D * (visible query-key pairs)
    backward = 2.5 x forward (five matmuls instead of two), forward+backward = 3.5 x forward

Sweep: T = S from 512 to 16k with B * T = 16k tokens and H * D = 2048 (FlashAttention-2's setting), head dims 64
and 128, causal and not, a GQA configuration (8 query heads per KV head) and a windowed one (Mistral, W = 4096).
Medians of triton.testing.do_bench. Results go to bench/results/attention_<gpu>.md with the device name; a
machine without CUDA prints one line and exits (or runs `--cpu-smoke`, a tiny correctness check under the Triton
interpreter that writes nothing).

    python bench/attention.py            # the whole sweep
    python bench/attention.py --quick    # D=128, causal, T in {1k, 4k}
"""

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
# ---- what to run ----
parser.add_argument("--quick", action="store_true", help="a small subset: D=128, causal MHA, T in {1024, 4096}")
parser.add_argument("--configs", nargs="*", default=None,
                    help="subset of configurations (mha-causal, mha-full, gqa-causal, window-causal)")
parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128], help="head dims to sweep")
parser.add_argument("--seqlens", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384],
                    help="sequence lengths T = S to sweep")
parser.add_argument("--modes", nargs="*", default=["fwd", "bwd", "fwd+bwd"], help="fwd, bwd, fwd+bwd")
parser.add_argument("--providers", nargs="*", default=["ours", "sdpa-flash", "naive"], help="which implementations")
parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="input dtype")
# ---- output ----
parser.add_argument("--out", default=None, help="result file (default bench/results/attention_<gpu>.md)")
parser.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run a tiny correctness check under the Triton interpreter instead (writes nothing)")
args = parser.parse_args()

import torch  # noqa: E402

if not torch.cuda.is_available():
    if not args.cpu_smoke:
        print("bench/attention.py needs a CUDA GPU (run with --cpu-smoke for an interpreter correctness check)")
        sys.exit(0)
    os.environ["TRITON_INTERPRET"] = "1"  # before kernels.attention is imported: @triton.jit reads it then

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels.attention import attention_ref, flash_attention  # noqa: E402

if args.cpu_smoke:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 37, 64), torch.randn(1, 2, 53, 64), torch.randn(1, 2, 53, 64)
    for kw in (dict(causal=True), dict(causal=False), dict(causal=True, window=16)):
        errs = []
        for fn in (flash_attention, attention_ref):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            o = fn(qq, kk, vv, **kw)
            o.sum().backward()
            errs.append((o, qq.grad, kk.grad, vv.grad))
        print(kw, "max |ours - ref| over o, dq, dk, dv:",
              " ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(*errs)))
    print("cpu smoke only: no timings are taken without a GPU, no result file written")
    sys.exit(0)

DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
DEVICE = torch.device("cuda")
TOKENS, MODEL_DIM = 16384, 2048
# name: (KV heads per query head divisor G, causal, window)
CONFIGS = {
    "mha-causal": (1, True, None),
    "mha-full": (1, False, None),
    "gqa-causal": (8, True, None),
    "window-causal": (1, True, 4096),
}
if args.quick:
    args.head_dims, args.seqlens, CONFIGS = [128], [1024, 4096], {"mha-causal": CONFIGS["mha-causal"]}
if args.configs:
    CONFIGS = {name: CONFIGS[name] for name in args.configs}
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def forward_flops(B, H, T, S, D, causal, window):
    if window is not None:  # count the visible pairs exactly: query i (bottom-right aligned) sees min(i+1, W) keys
        pairs = sum(min(S - T + i + 1, window) for i in range(T))
        return 4 * B * H * D * pairs
    return 4 * B * H * T * S * D * (0.5 if causal else 1.0)


def make_fn(provider, q, k, v, causal, window):
    """A closure computing the forward of one provider, or None where it does not apply."""
    G = q.shape[1] // k.shape[1]
    if provider == "ours":
        return lambda: flash_attention(q, k, v, causal=causal, window=window)
    if provider == "sdpa-flash":
        if window is not None:
            return None  # the flash backend takes no mask, so it has no sliding window
        # GQA for SDPA: K/V repeated outside the timed region (its flash backend reads them repeated)
        kr, vr = (x.detach().repeat_interleave(G, 1).requires_grad_() for x in (k, v)) if G > 1 else (k, v)

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
        sdpa.leaves = [kr, vr]  # their .grad is reset between timed runs, like q's
        return sdpa
    if provider == "naive":
        B, H, T, D = q.shape
        if B * H * T * k.shape[2] * 4 * 4 > 16 * 2**30:  # fp32 scores, probs and their grads must fit in ~16 GB
            return None
        return lambda: attention_ref(q, k, v, causal=causal, window=window)
    raise ValueError(f"unknown provider {provider!r}")


def bench_one(provider, mode, B, H, KVH, T, D, causal, window):
    """Median milliseconds, or a string saying why there is no figure."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, H, T, D, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    k = torch.randn(B, KVH, T, D, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    v = torch.randn(B, KVH, T, D, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    fn = make_fn(provider, q, k, v, causal, window)
    if fn is None:
        return "n/a"
    leaves = [q, k, v, *getattr(fn, "leaves", [])]
    try:
        if mode == "fwd":
            fn()  # autotune outside the timed region
            return triton.testing.do_bench(fn, return_mode="median")
        o = fn()
        do = torch.randn_like(o)
        if mode == "bwd":
            o.backward(do, retain_graph=True)
            return triton.testing.do_bench(lambda: o.backward(do, retain_graph=True), grad_to_none=leaves,
                                           return_mode="median")
        fn().backward(do)
        return triton.testing.do_bench(lambda: fn().backward(do), grad_to_none=leaves, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        return "oom"
    except RuntimeError as e:  # e.g. the flash backend refusing a shape
        return "error: " + str(e).splitlines()[0][:60]
    finally:
        del q, k, v
        torch.cuda.empty_cache()


gpu = torch.cuda.get_device_name(DEVICE)
lines = [f"# Flash attention, {gpu}", "",
         f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
         f"triton {triton.__version__}, {args.dtype}, B*T = {TOKENS} tokens, H*D = {MODEL_DIM}. TFLOP/s from "
         "do_bench medians; FLOPs = 4*B*H*T*S*D (x0.5 causal, exact visible pairs with a window), x2.5 backward, "
         "x3.5 both. sdpa-flash: torch SDPA restricted to SDPBackend.FLASH_ATTENTION (K/V repeated for GQA; n/a with "
         "a window); naive: kernels.attention.attention_ref (n/a where its fp32 scores would not fit).", ""]
results = []  # (config, D, mode, T, provider, tflops or None)
for name, (G, causal, window) in CONFIGS.items():
    for D in args.head_dims:
        H = MODEL_DIM // D
        KVH = H // G
        for mode in args.modes:
            header = f"{name}  D={D}  H={H}  KVH={KVH}  {mode}  (TFLOP/s)"
            cols = ["T", *args.providers]
            table = [f"### {header}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            print(header)
            for T in args.seqlens:
                B = max(1, TOKENS // T)
                w = window if window is not None and window < T else None
                flops = forward_flops(B, H, T, T, D, causal, w) * MODE_FACTOR[mode]
                row = [str(T)]
                for provider in args.providers:
                    ms = bench_one(provider, mode, B, H, KVH, T, D, causal, w)
                    if isinstance(ms, str):
                        row.append(ms)
                        results.append((name, D, mode, T, provider, None))
                    else:
                        tflops = flops / ms * 1e-9
                        row.append(f"{tflops:.1f}")
                        results.append((name, D, mode, T, provider, tflops))
                print("  " + "  ".join(f"{c:>12}" for c in row))
                table.append("| " + " | ".join(row) + " |")
            lines += table + [""]

# Targets, judged only on figures measured above.
measured = {(c, d, m, t, p): f for c, d, m, t, p, f in results}
checks = []
for (c, d, m, t, p), f in measured.items():
    if p != "ours" or f is None:
        continue
    base = measured.get((c, d, m, t, "sdpa-flash"))
    if base is not None:
        checks.append(f"{'ok ' if f >= base else 'BELOW'} ours {f:.1f} vs sdpa-flash {base:.1f}: {c} D={d} {m} T={t}")
    if d == 128 and t >= 4096 and m in ("fwd", "bwd"):
        goal = 400 if m == "fwd" else 250
        checks.append(f"{'ok ' if f >= goal else 'BELOW'} ours {f:.1f} vs target {goal}: {c} D={d} {m} T={t}")
lines += ["## Targets (>= SDPA flash everywhere; H100 bf16 D=128 T>=4k: fwd > 400, bwd > 250)", "",
          *[f"- {c}" for c in checks], ""]
print("\n".join(checks))

out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                       f"attention_{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}.md")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines))
print(f"wrote {out}")
