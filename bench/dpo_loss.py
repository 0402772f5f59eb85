"""Benchmark of the fused linear DPO loss (kernels/dpo_loss.py): peak memory and time of forward + backward of one
DPO step's LM head (the reference model's sequence log-probs under no_grad, then the policy's loss and its
gradients for hidden and weight), for N = 1k .. 32k tokens at C = 4096, V = 128256 (Llama 3), bf16.

Providers: ours (fused_linear_dpo_loss + sequence_logprobs), the naive PyTorch twin (dpo_loss_ref: full logits,
log_softmax in fp32), and Liger-Kernel's LigerFusedLinearDPOLoss (optional: `pip install liger-kernel`).
N tokens = 2 B sequences of T = 512 (B pairs). Time: triton.testing.do_bench median. Memory: max_memory_allocated
during one step, total and as a delta over the inputs (hidden, weight, their reference twins). Throughput: the
useful GEMM flops of a step, 8 N C V (reference forward 2 N C V, policy forward 2 N C V, backward 4 N C V), over
the step's time, against cuBLAS on hidden @ weight^T of the same shape (2 N C V flops). Ours executes 10 N C V
(the backward recomputes the logits); the naive path and Liger execute 8 N C V.

    python bench/dpo_loss.py                 # writes bench/results/dpo_loss_<gpu>.md
    python bench/dpo_loss.py --tokens 1024 4096
"""

import argparse
import gc
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ---- flags -----------------------------------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768],
                    help="N, total tokens per step (chosen + rejected)")
parser.add_argument("--seq-len", type=int, default=512, help="T, tokens per sequence; N must be a multiple of 2T")
parser.add_argument("--dim", type=int, default=4096, help="C, hidden size")
parser.add_argument("--vocab", type=int, default=128256, help="V, vocabulary size")
parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
parser.add_argument("--out", default=None, help="result file (default bench/results/dpo_loss_<gpu>.md)")
args = parser.parse_args()

if not torch.cuda.is_available():
    print("bench/dpo_loss.py needs a CUDA GPU; none here, nothing measured, no result file written.")
    sys.exit(0)

import triton  # noqa: E402

from kernels.dpo_loss import dpo_loss_ref, fused_linear_dpo_loss, linear_logprobs_ref, sequence_logprobs  # noqa: E402

try:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
except ImportError:
    LigerFusedLinearDPOLoss = None

DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
C, V, T = args.dim, args.vocab, args.seq_len
GPU = torch.cuda.get_device_name(DEVICE)


def make_inputs(N):
    """Policy hidden [2B, T, C] and weight [V, C] (requiring grad), their reference twins, targets [2B, T] with
    a 64-token prompt ignored."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = N // T
    hidden = torch.randn(rows, T, C, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
    weight = (torch.randn(V, C, device=DEVICE, dtype=DTYPE, generator=gen) * C**-0.5).requires_grad_()
    ref_hidden = hidden.detach().clone()
    ref_weight = weight.detach().clone()
    targets = torch.randint(0, V, (rows, T), device=DEVICE, generator=gen)
    targets[:, :64] = -100
    return hidden, weight, ref_hidden, ref_weight, targets


def step_ours(hidden, weight, ref_hidden, ref_weight, targets):
    with torch.no_grad():
        ref = sequence_logprobs(ref_hidden, ref_weight, targets)
    B = targets.shape[0] // 2
    loss = fused_linear_dpo_loss(hidden, weight, targets, ref[:B], ref[B:], beta=args.beta)[0]
    loss.backward()


def step_naive(hidden, weight, ref_hidden, ref_weight, targets):
    with torch.no_grad():
        ref = linear_logprobs_ref(ref_hidden, ref_weight, targets).sum(-1)
    B = targets.shape[0] // 2
    loss = dpo_loss_ref(hidden, weight, targets, ref[:B], ref[B:], beta=args.beta)[0]
    loss.backward()


LIGER = LigerFusedLinearDPOLoss(beta=args.beta, use_ref_model=True) if LigerFusedLinearDPOLoss else None


def step_liger(hidden, weight, ref_hidden, ref_weight, targets):
    out = LIGER(weight, hidden, targets, ref_input=ref_hidden, ref_weight=ref_weight)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()


PROVIDERS = {"ours": step_ours, "naive": step_naive, "liger": step_liger if LIGER else None}


def clear():
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(step, inputs):
    """(median ms, peak MB total, peak MB over the inputs) of one forward + backward, or an error string."""
    hidden, weight = inputs[:2]
    try:
        clear()
        hidden.grad = weight.grad = None
        base = torch.cuda.memory_allocated(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        step(*inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(DEVICE)
        hidden.grad = weight.grad = None
        ms = triton.testing.do_bench(lambda: step(*inputs), grad_to_none=[hidden, weight], return_mode="median")
        return ms, peak / 2**20, (peak - base) / 2**20
    except torch.OutOfMemoryError:
        return "OOM"
    finally:
        hidden.grad = weight.grad = None
        clear()


def cublas_tflops(N):
    """TFLOP/s of cuBLAS on the forward GEMM, hidden [N, C] @ weight^T -> [N, V] in bf16."""
    try:
        a = torch.randn(N, C, device=DEVICE, dtype=DTYPE)
        b = torch.randn(V, C, device=DEVICE, dtype=DTYPE)
        ms = triton.testing.do_bench(lambda: a @ b.t(), return_mode="median")
        return 2 * N * C * V / ms / 1e9
    except torch.OutOfMemoryError:
        return None
    finally:
        clear()


rows = []
header = ("| N | provider | ms | peak MB | peak MB over inputs | useful TFLOP/s (8NCV) | vs cuBLAS |\n"
          "|---|---|---|---|---|---|---|")
print(f"fused linear DPO loss, fwd+bwd incl. reference log-probs; C={C}, V={V}, T={T}, bf16, {GPU}")
print(header)
for N in args.tokens:
    assert N % (2 * T) == 0, f"N = {N} must be a multiple of 2T = {2 * T}"
    ref_tf = cublas_tflops(N)
    inputs = make_inputs(N)
    for name, step in PROVIDERS.items():
        if step is None:
            line = f"| {N} | {name} | not installed | | | | |"
        else:
            res = measure(step, inputs)
            if isinstance(res, str):
                line = f"| {N} | {name} | {res} | | | | |"
            else:
                ms, peak, delta = res
                tf = 8 * N * C * V / ms / 1e9
                vs = f"{tf / ref_tf:.2f}" if ref_tf else "n/a"
                line = f"| {N} | {name} | {ms:.2f} | {peak:.0f} | {delta:.0f} | {tf:.0f} | {vs} |"
        print(line, flush=True)
        rows.append(line)
    line = f"| {N} | cuBLAS hidden @ weight^T | | | | {ref_tf:.0f} (2NCV) | 1.00 |" if ref_tf else \
        f"| {N} | cuBLAS hidden @ weight^T | OOM | | | | |"
    print(line, flush=True)
    rows.append(line)
    del inputs
    clear()

out = Path(args.out) if args.out else \
    Path(__file__).parent / "results" / f"dpo_loss_{re.sub(r'[^A-Za-z0-9]+', '-', GPU).strip('-')}.md"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(f"# fused linear DPO loss on {GPU}\n\nforward + backward of one DPO step's LM head (reference "
               f"log-probs under no_grad included), C={C}, V={V}, T={T}, bf16, torch {torch.__version__}, triton "
               f"{triton.__version__}. Median of triton.testing.do_bench; peak from max_memory_allocated.\n\n"
               + header + "\n" + "\n".join(rows) + "\n")
print(f"wrote {out}")
