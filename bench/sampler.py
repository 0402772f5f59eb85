"""Sampler throughput: minisirev.sampler.generate against Hugging Face `generate` on the same random checkpoint.

    python bench/sampler.py                       # CPU: the tiny preset; writes bench/results/sampler_<device>.md
    python bench/sampler.py --config llama-1b --dtype bfloat16 --device cuda

Both sides get the same prompts (ragged lengths), the same n, the same max_new_tokens and the same batch: HF runs all
prompts x n rows in one `generate` call (left-padded, num_return_sequences=n); ours gets max_batch_rows = prompts x n.
Stopping is switched off on both sides (no EOS) so both produce exactly rows x max_new_tokens tokens:
    tokens/s = rows * max_new_tokens / median wall time (prefill included).
Greedy outputs of the two are compared token by token as a sanity check ("agree").

On CUDA also batch-1 decode bandwidth: the time of one decode step is the difference between a long and a short
generation divided by the extra tokens (prefill cancels); each step reads every weight once plus the KV cache so far:
    bytes/token = parameter bytes + 2 * L * KVH * D * itemsize * (mean cache length)
    achieved GB/s = bytes/token / seconds per token,
reported as a fraction of the GPU's datasheet peak (table below) and of a measured device-to-device copy
(2 * bytes / time for a 1 GiB copy: read + write).
"""

import argparse
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisirev.checkpoint import save_model  # noqa: E402
from minisirev.config import ModelConfig  # noqa: E402
from minisirev.model import Transformer  # noqa: E402
from minisirev.sampler import generate  # noqa: E402

# datasheet HBM bandwidth, bytes/s, matched against torch.cuda.get_device_name()
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 864e9),
                  ("A10G", 600e9), ("L4", 300e9)]
CONFIGS = {
    "tiny": dict(ModelConfig.from_preset("tiny").to_dict()),
    # a Llama-shaped ~1.2B model: big enough that batch-1 decode on a GPU is bound by memory bandwidth
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                     max_seq_len=4096, bos_id=1, eos_id=2),
}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
# ---- model
parser.add_argument("--config", default="tiny", choices=list(CONFIGS), help="model shape (random weights)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--attn", default=None, help="our attention backend (default: Transformer.default_attn)")
parser.add_argument("--compile", action="store_true", help="also time generate(compile=True)")
# ---- workload
parser.add_argument("--prompts", type=int, default=8, help="prompts per batch")
parser.add_argument("--min-len", type=int, default=16, help="shortest prompt")
parser.add_argument("--max-len", type=int, default=64, help="longest prompt")
parser.add_argument("--n", type=int, nargs="+", default=[1, 4], help="samples per prompt (one table row each)")
parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per row")
parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median); one warm-up run before")
parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
# ---- output
parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for sampler_<device>.md")
args = parser.parse_args()

if args.threads:
    torch.set_num_threads(args.threads)
device = torch.device(args.device)
dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def device_name() -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, torch.compile
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- the same random checkpoint on both sides ------------------------------------------------------------------
import transformers  # noqa: E402

cfg = ModelConfig(**CONFIGS[args.config])
ours = Transformer(cfg).init_weights(seed=0)
with tempfile.TemporaryDirectory() as tmp:
    save_model(ours, tmp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=dtype)
hf = hf.to(device).eval()
hf.generation_config.eos_token_id = None  # fixed-length rows on both sides
hf.generation_config.pad_token_id = 0
ours = ours.to(device=device, dtype=dtype).eval()
ours.attn = args.attn or Transformer.default_attn(device)

g = torch.Generator().manual_seed(0)
lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
T = max(lens)
hf_ids = torch.zeros(len(prompts), T, dtype=torch.long)  # left-padded for HF
hf_mask = torch.zeros(len(prompts), T, dtype=torch.long)
for i, p in enumerate(prompts):
    hf_ids[i, T - len(p):] = torch.tensor(p)
    hf_mask[i, T - len(p):] = 1
hf_ids, hf_mask = hf_ids.to(device), hf_mask.to(device)


def run_hf(n: int, sampled: bool):
    # each prompt repeated n times (what num_return_sequences does inside HF, which refuses it for greedy)
    with torch.no_grad():
        return hf.generate(input_ids=hf_ids.repeat_interleave(n, 0), attention_mask=hf_mask.repeat_interleave(n, 0),
                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=sampled,
                           temperature=1.0 if sampled else None, top_p=0.95 if sampled else None,
                           top_k=50 if sampled else None)


def run_ours(n: int, sampled: bool, compile: bool = False):
    return generate(ours, prompts, n=n, max_new_tokens=args.max_new_tokens, temperature=1.0 if sampled else 0.0,
                    top_p=0.95, top_k=50, stop_ids=(), max_batch_rows=len(prompts) * n, compile=compile)


rows = []
header = ["mode", "n", "rows", "HF tok/s", "ours tok/s", "ours / HF"] + (["compiled tok/s"] if args.compile else [])
for n in args.n:
    for sampled in (False, True):
        tokens = len(prompts) * n * args.max_new_tokens
        t_hf = median_time(lambda: run_hf(n, sampled), args.repeats)
        t_ours = median_time(lambda: run_ours(n, sampled), args.repeats)
        row = ["sampled" if sampled else "greedy", n, len(prompts) * n, f"{tokens / t_hf:,.0f}",
               f"{tokens / t_ours:,.0f}", f"{t_hf / t_ours:.2f}x"]
        if args.compile:
            row.append(f"{tokens / median_time(lambda: run_ours(n, sampled, True), args.repeats):,.0f}")
        rows.append(row)
        print(" | ".join(map(str, row)), flush=True)

# greedy agreement: same checkpoint, so the same tokens up to near-ties (bf16 rounding differs between the two)
hf_out = run_hf(1, False)[:, T:].tolist()
our_out = [o[0] for o in run_ours(1, False)]
agree = sum(a == b for x, y in zip(hf_out, our_out) for a, b in zip(x, y)) / (len(prompts) * args.max_new_tokens)
first_diff = [next((t for t, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(hf_out, our_out)]

# ---- batch-1 decode bandwidth (GPU) ---------------------------------------------------------------------------
bw_lines = []
if device.type == "cuda":
    short, long = 32, 544
    one = [prompts[0]]

    def decode(k):
        return lambda: generate(ours, one, max_new_tokens=k, stop_ids=(), sync_every=64)

    t_tok = (median_time(decode(long), args.repeats) - median_time(decode(short), args.repeats)) / (long - short)
    param_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    mean_len = len(one[0]) + (short + long) / 2
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize * mean_len
    achieved = (param_bytes + kv_bytes) / t_tok
    name = device_name()
    peak = next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t_copy = median_time(lambda: y.copy_(x), 10)
    copy_bw = 2 * x.numel() / t_copy
    bw_lines = [
        f"batch-1 decode ({args.config}, {dtype}, attn={ours.attn}): {t_tok * 1e3:.3f} ms/token, "
        f"{(param_bytes + kv_bytes) / 1e9:.3f} GB/token -> {achieved / 1e9:,.0f} GB/s",
        f"  = {achieved / copy_bw:.0%} of a measured 1 GiB device copy ({copy_bw / 1e9:,.0f} GB/s)"
        + (f", {achieved / peak:.0%} of the datasheet peak ({peak / 1e9:,.0f} GB/s)" if peak else
           ", no datasheet peak for this GPU in the table"),
    ]
    for line in bw_lines:
        print(line)

# ---- the results file -----------------------------------------------------------------------------------------
name = device_name()
threads = torch.get_num_threads() if device.type == "cpu" else None
lines = [
    f"# Sampler throughput on {name}",
    "",
    f"`python bench/sampler.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
    "",
    f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
    + (f" ({threads} threads, load average {' '.join(f'{v:.1f}' for v in __import__('os').getloadavg())})"
       if threads else ""),
    f"config `{args.config}` ({ours.num_params() / 1e6:.1f}M parameters), {dtype}, our attention `{ours.attn}`, "
    f"HF attention `sdpa`; {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, {args.max_new_tokens} new "
    f"tokens per row, no EOS; sampled = temperature 1, top-k 50, top-p 0.95; median of {args.repeats} runs "
    "after a warm-up, prefill included.",
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *["| " + " | ".join(map(str, r)) + " |" for r in rows],
    "",
    f"Greedy agreement with HF: {agree:.1%} of tokens (first differing step per prompt: {first_diff}).",
]
if bw_lines:
    lines += ["", *bw_lines]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
path = out / f"sampler_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.md"
path.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {path}")
