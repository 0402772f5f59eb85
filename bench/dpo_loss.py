"""Benchmark of the fused linear DPO loss (kernels/dpo_loss.py, kernels/linear_logprobs.py): time and peak memory of
one DPO step's LM head, forward + backward: the reference model's sequence log-probs under no_grad, then the
policy's loss and its gradients for hidden and weight. N = 1k .. 32k tokens at C = 4096, V = 128256 (Llama 3), bf16.

Providers (each n/a where not installed or where it would not fit):
    ours         fused_sequence_logprobs (reference) + fused_linear_dpo_loss (policy)
    naive-ce     the fair naive path a user would write: logits = hidden @ W^T in bf16, per-token log-probs as
                 -F.cross_entropy(logits, targets, reduction="none") (fused log_softmax + gather), the same
                 dpo_loss on the sums
    naive-fp32   kernels.dpo_loss.linear_dpo_loss_ref: full logits, log_softmax upcast to fp32 (the tests' twin)
    liger-flce   Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none") for the per-token log-probs, the
                 same dpo_loss on the sums
    liger-dpo    Liger-Kernel's LigerFusedLinearDPOLoss (chunked, reference log-probs computed inside)

Figures: median ms over at least --min-runs calls and --min-seconds (CUDA events; triton's do_bench default of
100 ms would give one or two samples here), peak memory from max_memory_allocated (total and over the inputs),
and throughput as useful GEMM FLOPs of a step, 8 N C V (reference forward 2 N C V, policy forward 2 N C V,
backward 4 N C V), beside the hardware FLOPs each provider executes (ours and Liger recompute the logits in the
backward: 10 N C V; the naive paths 8 N C V), against cuBLAS on hidden @ weight^T of the same shape. Before any
timing, every provider's loss and gradients are checked against ours at that shape (bf16 tolerances), and ours
against naive-ce. The fused kernels are not autotuned; their fixed tiling (rows x vocabulary columns per logits
tile, Triton block) is recorded. Results: bench/results/dpo_loss_<gpu>.md and .png.

    python bench/dpo_loss.py                 # N = 1k .. 32k
    python bench/dpo_loss.py --tokens 1024 4096
    python bench/dpo_loss.py --smoke         # tiny shapes under the Triton interpreter, CPU (tests use it)
"""

import argparse
import gc
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ---- flags -----------------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                    help="N, total tokens per step (chosen + rejected)")
parser.add_argument("--seq-len", type=int, default=512, help="T, tokens per sequence; N must be a multiple of 2T")
parser.add_argument("--dim", type=int, default=4096, help="C, hidden size")
parser.add_argument("--vocab", type=int, default=128256, help="V, vocabulary size")
parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
parser.add_argument("--min-runs", type=int, default=10, help="at least this many timed calls per figure")
parser.add_argument("--min-seconds", type=float, default=2.0, help="and at least this long in total")
parser.add_argument("--out", default=None, help="result file (default bench/results/dpo_loss_<gpu>.md)")
parser.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU under the Triton interpreter: runs every step, times nothing real")
args = parser.parse_args()

if args.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: @triton.jit reads it then
    args.tokens, args.seq_len, args.dim, args.vocab = [32, 64], 16, 24, 123

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not torch.cuda.is_available() and not args.smoke:
    print("bench/dpo_loss.py needs a CUDA GPU (or --smoke for the interpreter run); nothing measured")
    sys.exit(0)

import triton  # noqa: E402

import kernels.linear_logprobs as LL  # noqa: E402
from kernels.dpo_loss import dpo_loss, fused_linear_dpo_loss, linear_dpo_loss_ref  # noqa: E402

try:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
except ImportError:
    LigerFusedLinearDPOLoss = LigerFusedLinearCrossEntropyLoss = None

DEVICE = torch.device("cpu" if args.smoke else "cuda")
DTYPE = torch.bfloat16
C, V, T = args.dim, args.vocab, args.seq_len
ATOL, RTOL = 6e-2, 5e-2  # bf16: tests/test_dpo_kernel.py's TOLERANCES
GPU = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu-interpreter-smoke"


def make_inputs(N):
    """Policy hidden [2B, T, C] and weight [V, C] (requiring grad), their reference twins, targets [2B, T] with
    an eighth of each row (the prompt) ignored."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = N // T
    hidden = torch.randn(rows, T, C, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    weight = (torch.randn(V, C, device=DEVICE, dtype=DTYPE, generator=gen) * C**-0.5).requires_grad_()
    ref_hidden = (hidden.detach() + 0.1 * torch.randn(hidden.shape, device=DEVICE, dtype=DTYPE, generator=gen))
    ref_weight = weight.detach().clone()
    targets = torch.randint(0, V, (rows, T), device=DEVICE, generator=gen)
    targets[:, : T // 8] = -100
    return hidden, weight, ref_hidden, ref_weight, targets


def dpo_from_token_logps(logp, targets, ref):
    B = targets.shape[0] // 2
    seq = logp.sum(-1)
    return dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=args.beta)[0].mean()


def step_ours(hidden, weight, ref_hidden, ref_weight, targets):
    with torch.no_grad():
        ref = LL.fused_sequence_logprobs(ref_hidden, ref_weight, targets)
    B = targets.shape[0] // 2
    return fused_linear_dpo_loss(hidden, weight, targets, ref[:B], ref[B:], beta=args.beta)[0]


def ce_logps(hidden, weight, targets):
    logits = hidden @ weight.t()  # 2B, T, V in bf16
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return -nll.view(targets.shape).float()


def step_naive_ce(hidden, weight, ref_hidden, ref_weight, targets):
    with torch.no_grad():
        ref = ce_logps(ref_hidden, ref_weight, targets).sum(-1)
    return dpo_from_token_logps(ce_logps(hidden, weight, targets), targets, ref)


def step_naive_fp32(hidden, weight, ref_hidden, ref_weight, targets):
    with torch.no_grad():
        ref = LL.linear_logprobs_ref(ref_hidden, ref_weight, targets).sum(-1)
    B = targets.shape[0] // 2
    return linear_dpo_loss_ref(hidden, weight, targets, ref[:B], ref[B:], beta=args.beta)[0]


LIGER_CE = LigerFusedLinearCrossEntropyLoss(reduction="none") if LigerFusedLinearCrossEntropyLoss else None
LIGER_DPO = LigerFusedLinearDPOLoss(beta=args.beta, use_ref_model=True) if LigerFusedLinearDPOLoss else None


def liger_logps(hidden, weight, targets):
    return -LIGER_CE(weight, hidden.flatten(0, 1), targets.flatten()).view(targets.shape).float()


def step_liger_flce(hidden, weight, ref_hidden, ref_weight, targets):
    with torch.no_grad():
        ref = liger_logps(ref_hidden, ref_weight, targets).sum(-1)
    return dpo_from_token_logps(liger_logps(hidden, weight, targets), targets, ref)


def step_liger_dpo(hidden, weight, ref_hidden, ref_weight, targets):
    out = LIGER_DPO(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)
    return out[0] if isinstance(out, tuple) else out


ON_GPU = DEVICE.type == "cuda"
PROVIDERS = {  # name: (step, hardware GEMM FLOPs in units of N C V)
    "ours": (step_ours, 10),
    "naive-ce": (step_naive_ce, 8),
    "naive-fp32": (step_naive_fp32, 8),
    "liger-flce": (step_liger_flce if LIGER_CE and ON_GPU else None, 10),
    "liger-dpo": (step_liger_dpo if LIGER_DPO and ON_GPU else None, 10),
}


def clear():
    gc.collect()
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def grads_of(step, inputs):
    hidden, weight = inputs[:2]
    hidden.grad = weight.grad = None
    loss = step(*inputs)
    loss.backward()
    out = (loss.detach().float(), hidden.grad.float(), weight.grad.float())
    hidden.grad = weight.grad = None
    return out


def time_ms(fn, leaves):
    """Median ms over at least --min-runs calls and --min-seconds (CUDA events); on the CPU two wall-clock calls."""
    def reset():
        for x in leaves:
            x.grad = None
    if not ON_GPU:
        times = []
        for _ in range(2):
            reset()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    n = max(args.min_runs, math.ceil(args.min_seconds / max(time.perf_counter() - t0, 1e-6)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        reset()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def measure(step, inputs):
    """(median ms, peak MB total, peak MB over the inputs) of one forward + backward."""
    hidden, weight = inputs[:2]
    clear()
    hidden.grad = weight.grad = None
    if ON_GPU:
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
    step(*inputs).backward()
    peak = torch.cuda.max_memory_allocated(DEVICE) if ON_GPU else 0
    ms = time_ms(lambda: step(*inputs).backward(), [hidden, weight])
    hidden.grad = weight.grad = None
    return ms, peak / 2**20, (peak - base) / 2**20 if ON_GPU else 0.0


def cublas_tflops(N):
    """TFLOP/s of cuBLAS on the forward GEMM, hidden [N, C] @ weight^T -> [N, V] in bf16."""
    if not ON_GPU:
        return None
    try:
        a = torch.randn(N, C, device=DEVICE, dtype=DTYPE)
        b = torch.randn(V, C, device=DEVICE, dtype=DTYPE)
        return 2 * N * C * V / time_ms(lambda: a @ b.t(), []) / 1e9
    except torch.OutOfMemoryError:
        return None
    finally:
        clear()


n_c, v_c = LL._chunks(max(args.tokens), V)
tiling = (f"ours: logits tiles of {n_c} rows x {v_c} columns (row stride {LL._row_stride(v_c)}) at N = "
          f"{max(args.tokens)}, at most {LL._TILE_ELEMS} elements; Triton blocks of 2 rows x min(2048, next pow2 "
          "of the columns) at 8 warps on a GPU (16 x 32 in the interpreter); not autotuned")
header = ("| N | provider | ms | peak MB | peak MB over inputs | useful TFLOP/s (8NCV) | hw TFLOP/s | vs cuBLAS |\n"
          "|---|---|---|---|---|---|---|---|")
print(f"fused linear DPO loss, fwd+bwd incl. reference log-probs; C={C}, V={V}, T={T}, bf16, {GPU}\n{tiling}")
print(header)
rows, failures, series = [], [], {}
for N in args.tokens:
    assert N % (2 * T) == 0, f"--tokens: N = {N} must be a multiple of 2T = {2 * T}"
    ref_tf = cublas_tflops(N)
    inputs = make_inputs(N)
    truth = grads_of(step_ours, inputs)
    for name, (step, hw_units) in PROVIDERS.items():
        if step is None:
            line = f"| {N} | {name} | n/a | | | | | |"
        else:
            try:
                got = grads_of(step, inputs)
                for what, a, b in zip(("loss", "d_hidden", "d_weight"), got, truth):
                    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, w=what: f"{name} {w}: {m}")
                ms, peak, delta = measure(step, inputs)
                tf, hw = 8 * N * C * V / ms / 1e9, hw_units * N * C * V / ms / 1e9
                vs = f"{tf / ref_tf:.2f}" if ref_tf else "n/a"
                line = f"| {N} | {name} | {ms:.3g} | {peak:.0f} | {delta:.0f} | {tf:.3g} | {hw:.3g} | {vs} |"
                series.setdefault(name, []).append((N, ms))
            except torch.OutOfMemoryError:
                line = f"| {N} | {name} | OOM | | | | | |"
            except AssertionError as e:
                failures.append(f"N={N}: {str(e).splitlines()[0]}")
                line = f"| {N} | {name} | WRONG | | | | | |"
            except (RuntimeError, ValueError, TypeError) as e:  # an outside package refusing a shape or an option
                line = f"| {N} | {name} | error: {str(e).splitlines()[0][:60]} | | | | | |"
            finally:
                clear()
        print(line, flush=True)
        rows.append(line)
    line = f"| {N} | cuBLAS hidden @ weight^T | | | | {ref_tf:.0f} (2NCV) | | 1.00 |" if ref_tf else \
        f"| {N} | cuBLAS hidden @ weight^T | n/a | | | | | |"
    print(line, flush=True)
    rows.append(line)
    del inputs
    clear()

slug = re.sub(r"[^A-Za-z0-9]+", "-", GPU).strip("-").lower()
out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"dpo_loss_{slug}.md"
out.parent.mkdir(parents=True, exist_ok=True)
png = out.with_suffix(".png")
out.write_text(f"# fused linear DPO loss on {GPU}\n\nforward + backward of one DPO step's LM head (reference "
               f"log-probs under no_grad included), C={C}, V={V}, T={T}, bf16, torch {torch.__version__}, triton "
               f"{triton.__version__}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. Median of >= "
               f"{args.min_runs} calls and >= {args.min_seconds} s; peak from max_memory_allocated; every provider "
               f"checked against ours first. {tiling}. Plot: {png.name}"
               + (". SMOKE RUN: interpreter timings, meaningless" if args.smoke else "") + "\n\n"
               + header + "\n" + "\n".join(rows) + "\n"
               + ("\n## Correctness failures (not timed)\n\n" + "\n".join(f"- {f}" for f in failures) + "\n"
                  if failures else ""))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(5, 3.5))
for name, pts in series.items():
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("N tokens")
ax.set_ylabel("ms, fwd + bwd")
ax.set_title(f"DPO LM head, C={C}, V={V}", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(png, dpi=100)
print(f"wrote {out} and {png}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
