"""Training throughput of a ~1B-parameter random Llama through the kit's own trainer (minisirev.training.optimise,
the loop train.py runs): tokens/s and model FLOPs utilisation, bf16 autocast over fp32 master weights, AdamW.

    python bench/training.py                        # CUDA: the 1.2B config, checkpointing and fused loss on / off
    python bench/training.py --smoke                # a tiny model on the CPU: runs every step, times nothing real

Model: Llama 3.2 1B's shape (dim 2048, 16 layers, 32 heads of 64, 8 KV heads, FFN 8192, vocab 128256, tied
embeddings; 1.24B parameters) with random weights. Each step is one micro-batch of --batch rows x --seq-len tokens,
every token labelled (SFT loss). Variants: activation checkpointing of every block on / off, and the fused linear
log-prob loss (kernels/linear_logprobs.py; the [B, T, V] logits never exist) on / off (logits, then log_softmax).

Figures: the median step time over --steps steps after --warmup steps (the trainer's own per-step wall clock; it
syncs on the loss and the gradient norm every step), tokens/s = B * T / step time, and
    MFU = model FLOPs per step / step time / peak,
    model FLOPs per step = 6 * P_matmul * B * T  +  3 * 4 * L * H * D * B * T (T + 1) / 2,
P_matmul the weights of every linear layer plus the output projection (the embedding lookup is not a matmul; the
tied output projection is counted once), the second term causal attention's two matmuls forward and backward.
Checkpointing's recomputed forward is not counted (that is what makes it model FLOPs). peak = the datasheet's dense
bf16 rate (table below). Peak memory: torch.cuda.max_memory_allocated over the timed steps.
Results: bench/results/training_<gpu>.md.
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--batch", type=int, default=8, help="sequences per step")
parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, allocator warm-up)")
parser.add_argument("--steps", type=int, default=8, help="timed steps")
parser.add_argument("--variants", nargs="+", default=["ckpt+fused", "ckpt", "fused", "plain"],
                    choices=["ckpt+fused", "ckpt", "fused", "plain"],
                    help="any of ckpt+fused, ckpt, fused, plain (ckpt: activation checkpointing; fused: fused loss)")
parser.add_argument("--out", default=None, help="result file (default bench/results/training_<gpu>.md)")
parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, 1 + 1 steps (tests use it)")
args = parser.parse_args()
for flag in ("batch", "seq_len", "steps"):
    if getattr(args, flag) < 1:
        parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
if args.warmup < 0:
    parser.error(f"--warmup must be >= 0, got {args.warmup}")

if args.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # the fused loss runs in the Triton interpreter on the CPU

import torch  # noqa: E402

from minisirev.config import ModelConfig  # noqa: E402
from minisirev.losses import IGNORE, sequence_logprobs  # noqa: E402
from minisirev.model import Transformer  # noqa: E402
from minisirev.provenance import device_name  # noqa: E402
from minisirev.training import TrainArgs, optimise, sft_term  # noqa: E402

if not torch.cuda.is_available() and not args.smoke:
    print("bench/training.py needs a CUDA GPU (or --smoke for a CPU run); nothing measured")
    sys.exit(0)

# datasheet dense bf16 tensor-core FLOP/s (no sparsity), matched against the device name
PEAK_BF16 = [("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12)]
LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_id=2)

device = torch.device("cpu" if args.smoke else "cuda")
if args.smoke:
    config = ModelConfig.from_preset("tiny")
    args.batch, args.seq_len, args.warmup, args.steps = 2, 32, 1, 1
else:
    config = ModelConfig(**LLAMA_1B)
name = device_name(device)
peak = next((rate for key, rate in PEAK_BF16 if key in name), None)


def model_flops(cfg: ModelConfig, B: int, T: int) -> float:
    C, L, H, D, KVH, F = cfg.dim, cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.n_kv_heads, cfg.ffn_dim
    per_layer = C * H * D + 2 * C * KVH * D + H * D * C + 3 * C * F  # q, k and v, o, gate, up and down
    p_matmul = L * per_layer + cfg.vocab_size * C
    return 6 * p_matmul * B * T + 3 * 4 * L * H * D * B * T * (T + 1) / 2


def run_variant(variant: str) -> dict:
    ckpt, fused = "ckpt" in variant, "fused" in variant
    torch.manual_seed(0)
    model = Transformer(config, attn=Transformer.default_attn(device)).to(device)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(3, config.vocab_size, (args.batch, args.seq_len), generator=gen)
        labels = ids.clone()
        labels[:, 0] = IGNORE
        batches.append((ids.to(device), labels.to(device)))

    def loss_fn(model, batch):
        ids, labels = batch
        sums, counts = sequence_logprobs(model, ids, labels, fused=fused)
        return [(1.0, *sft_term(sums, counts, "mean"))], {}, int(counts.sum())

    targs = TrainArgs(lr=1e-4, batch_size=args.batch, warmup=0.0, autocast_bf16=device.type == "cuda",
                      grad_checkpoint=ckpt, fused=fused, log_every=10**9)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # optimise keeps each batch whole outside torchrun: the batch list items are the micro-batches
            log = optimise(model, batches, loss_fn, targs, Path(tmp) / "log.jsonl", desc=variant)
        except torch.cuda.OutOfMemoryError:
            return dict(variant=variant, oom=True)
    timed = log[args.warmup:]
    ms = statistics.median(r["ms"] for r in timed)
    tokens = args.batch * args.seq_len
    flops = model_flops(config, args.batch, args.seq_len)
    row = dict(variant=variant, ms=ms, tok_s=tokens / ms * 1e3, tflops=flops / ms * 1e-9,
               mfu=None if peak is None else flops / (ms * 1e-3) / peak, loss=timed[-1]["loss"],
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    del model, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


import triton  # noqa: E402

with torch.device("meta"):  # counted without allocating
    n_params = Transformer(config).num_params()
lines = [f"# Training throughput, {name}", "",
         f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}, triton "
         f"{triton.__version__}. `python bench/training.py{' --smoke' if args.smoke else ''}`: random Llama "
         f"(dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads of {config.head_dim}, "
         f"{config.n_kv_heads} KV heads, FFN {config.ffn_dim}, vocab {config.vocab_size}"
         f", {n_params / 1e9:.3g}B parameters), {args.batch} x {args.seq_len} "
         f"tokens a step, bf16 autocast over fp32 weights, AdamW, attention backend "
         f"{Transformer.default_attn(device)}; median of {args.steps} steps after {args.warmup}. MFU against "
         + (f"{peak / 1e12:.0f} TFLOP/s dense bf16 (datasheet)." if peak else "no known peak.")
         + (" SMOKE RUN: CPU timings, meaningless." if args.smoke else ""), "",
         "| variant | ms / step | tokens/s | model TFLOP/s | MFU | peak GiB | last loss |",
         "|---|---|---|---|---|---|---|"]
rows = []
for variant in args.variants:
    row = run_variant(variant)
    rows.append(row)
    print(json.dumps(row))
    if row.get("oom"):
        lines.append(f"| {variant} | oom | | | | | |")
        continue
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    peak_gib = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
    lines.append(f"| {variant} | {row['ms']:.1f} | {row['tok_s']:.0f} | {row['tflops']:.1f} | {mfu} | {peak_gib} | "
                 f"{row['loss']:.3f} |")
slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"training_{slug}.md"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {out}")
