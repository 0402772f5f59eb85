"""Sampler throughput: minisirev.sampler.generate against Hugging Face `generate` and against the matmul floor, on
the same checkpoint.

    python bench/sampler.py                       # CPU: the shipped base model and a ~10M one; 2 threads
    python bench/sampler.py --config llama-1b --dtype bfloat16 --device cuda

Both sides get the same prompts (ragged lengths), the same n, the same max_new_tokens and the same batch: HF runs all
prompts x n rows in one `generate` call (left-padded, each prompt repeated n times); ours gets max_batch_rows =
prompts x n. Stopping is switched off on both sides (no EOS) so both produce exactly rows x max_new_tokens tokens:
    tokens/s = rows * max_new_tokens / wall time (prefill included).
Greedy outputs of the two are compared token by token as a sanity check ("agree").

The matmul floor is what the decode cannot go below on a CPU: the time of the model's linear layers alone (every
projection of every layer plus the output projection, on the same weights) at the same number of rows, once per
generated token, plus the prefill's linear layers over the prompts' tokens:
    floor = max_new_tokens * t_linears(rows) + t_linears(prompt tokens);  "of floor" = floor / ours.
On a CPU in fp32 the linear layers are timed two ways (bench/sampler_models.linears_fn) and the floor of a round is
the faster: F.linear on each layer's weight (torch's GEMM, MKL) and oneDNN's GEMM on packed weights with q|k|v and
gate|up concatenated (decode_cpu.Linear, what our decode step runs). On the AMD EPYC (Zen 5) of bench/results/ the
second is about twice as fast at 256 rows, so it is the floor there (on the AVX2 machine the two are within
10-20%); both columns are printed.
HF, ours and the floors run alternately, `--repeats` times after a warm-up; the table gives median wall times and
the median of the per-round ratios (the machine may be shared: ratios taken within a round cancel its load), and the
same ratios in CPU seconds of the process (time.process_time), which on a shared machine leave out time spent
descheduled (with one thread they measure the work; with more they also count OpenMP spin-waits).

On CUDA also batch-1 decode bandwidth: the time of one decode step is the difference between a long and a short
generation divided by the extra tokens (prefill cancels); each step reads every weight once plus the KV cache so far:
    bytes/token = parameter bytes + 2 * L * KVH * D * itemsize * (mean cache length)
    achieved GB/s = bytes/token / seconds per token,
reported as a fraction of the GPU's datasheet peak (table below) and of a measured device-to-device copy
(2 * bytes / time for a 1 GiB copy: read + write).
"""

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampler_models import BASE_MODEL, CONFIGS, linears_fn  # noqa: E402

import kernels  # noqa: E402
from kernels import decode_cpu  # noqa: E402
from minisirev import cli  # noqa: E402
from minisirev.checkpoint import load_model, save_model  # noqa: E402
from minisirev.config import ModelConfig  # noqa: E402
from minisirev.model import Transformer  # noqa: E402
from minisirev.provenance import device_name  # noqa: E402
from minisirev.sampler import generate  # noqa: E402

# datasheet HBM bandwidth, bytes/s, matched against torch.cuda.get_device_name()
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
                  ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 864e9),
                  ("A10G", 600e9), ("L4", 300e9)]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
# ---- model
parser.add_argument("--config", nargs="+", default=["base", "10m"], choices=list(CONFIGS),
                    help="models, one table block each: base = data/base_model's weights, the others random")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on CUDA, fp32 on CPU)")
parser.add_argument("--attn", default=None, help="our attention backend (default: Transformer.default_attn)")
parser.add_argument("--compile", default=None, choices=["on", "off"],
                    help="our decode step compiled or not (default: generate's own choice, compiled on CUDA only)")
# ---- workload
parser.add_argument("--prompts", type=int, default=32, help="prompts per batch")
parser.add_argument("--min-len", type=int, default=16, help="shortest prompt")
parser.add_argument("--max-len", type=int, default=64, help="longest prompt")
parser.add_argument("--n", type=int, nargs="+", default=[8], help="samples per prompt (one table row each)")
parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 128], help="tokens generated per row")
parser.add_argument("--top-p", type=float, default=0.95, help="top-p of the sampled rows (temperature 1, no top-k)")
parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds per case; one warm-up before")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
# ---- output
parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for sampler_<device>.md")
parser.add_argument("--note", default="", help="a line added to the results file (e.g. how loaded the machine was)")
args = parser.parse_args()

torch.set_num_threads(args.threads)
tuned = cli.tune_allocator()  # as train.py, sample.py and eval.py do: both sides and the floor run with it
device = torch.device(args.device)
dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
compile = None if args.compile is None else args.compile == "on"


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared CPU the second excludes time spent descheduled."""
    c = time.process_time()
    return timed(fn), time.process_time() - c


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, torch.compile
    return statistics.median(timed(fn) for _ in range(repeats))


if clash := kernels.hub_kernels_clash():  # transformers >= 5.25 would fail to import beside our kernels/
    sys.exit(f"bench/sampler.py: {clash}")
import transformers  # noqa: E402


def load_pair(name: str):
    """(ours, HF) with the same weights: the shipped checkpoint, or a random one saved and reloaded."""
    with tempfile.TemporaryDirectory() as tmp:
        if CONFIGS[name] is None:
            src = BASE_MODEL
            ours = load_model(src)
        else:
            ours = Transformer(ModelConfig(**CONFIGS[name])).init_weights(seed=0)
            save_model(ours, tmp)
            src = tmp
        hf = transformers.AutoModelForCausalLM.from_pretrained(src, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # fixed-length rows on both sides
    hf.generation_config.pad_token_id = 0
    ours = ours.to(device=device, dtype=dtype).eval()
    ours.attn = args.attn or Transformer.default_attn(device)
    return ours, hf


def bench_config(name: str) -> tuple[list[list], str]:
    ours, hf = load_pair(name)
    cfg = ours.config
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=g).tolist()
    prompts = [[1] + torch.randint(3, cfg.vocab_size, (n - 1,), generator=g).tolist() for n in lens]
    T = max(lens)
    hf_ids = torch.zeros(len(prompts), T, dtype=torch.long)  # left-padded for HF
    hf_mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        hf_ids[i, T - len(p):] = torch.tensor(p)
        hf_mask[i, T - len(p):] = 1
    hf_ids, hf_mask = hf_ids.to(device), hf_mask.to(device)

    def run_hf(n: int, new: int, sampled: bool):
        with torch.no_grad():
            return hf.generate(input_ids=hf_ids.repeat_interleave(n, 0), attention_mask=hf_mask.repeat_interleave(n, 0),
                               max_new_tokens=new, min_new_tokens=new, do_sample=sampled,
                               temperature=1.0 if sampled else None, top_p=args.top_p if sampled else None,
                               top_k=0 if sampled else None)

    def run_ours(n: int, new: int, sampled: bool):
        return generate(ours, prompts, n=n, max_new_tokens=new, temperature=1.0 if sampled else 0.0,
                        top_p=args.top_p, stop_ids=(), max_batch_rows=len(prompts) * n, compile=compile)

    def floor_fn(model, rows: int, prompt_tokens: int, new: int, packed: bool):
        step = linears_fn(model, rows, device, dtype, packed=packed)
        prefill = linears_fn(model, prompt_tokens, device, dtype, packed=packed)

        def floor():
            prefill()
            for _ in range(new):
                step()
        return floor

    rows = []
    for new in args.max_new_tokens:
        for n in args.n:
            R = len(prompts) * n
            floors = {"F.linear": floor_fn(ours, R, sum(lens), new, packed=False)}
            if packed_floor:
                floors["oneDNN"] = floor_fn(ours, R, sum(lens), new, packed=True)

            for sampled in (False, True):
                fns = {"hf": lambda: run_hf(n, new, sampled), "ours": lambda: run_ours(n, new, sampled), **floors}
                for fn in fns.values():
                    fn()  # warm-up
                times = {k: [] for k in fns}
                cpu = {k: [] for k in fns}
                for _ in range(args.repeats):  # alternating: a load spike hits the three alike
                    for k, fn in fns.items():
                        wall, c = timed_cpu(fn)
                        times[k].append(wall)
                        cpu[k].append(c)
                for t in (times, cpu):  # the floor of a round: the faster way to run its linear layers
                    t["floor"] = [min(ts) for ts in zip(*(t[k] for k in floors))]
                med = {k: statistics.median(v) for k, v in times.items()}

                def ratio(t, a, b):
                    return statistics.median(x / y for x, y in zip(t[a], t[b]))
                tokens = R * new
                row = [name, "sampled" if sampled else "greedy", n, R, new, f"{tokens / med['hf']:,.0f}",
                       f"{tokens / med['ours']:,.0f}", *(f"{tokens / med[k]:,.0f}" for k in floor_names),
                       f"{ratio(times, 'hf', 'ours'):.2f}x", f"{ratio(times, 'floor', 'ours'):.0%}",
                       f"{ratio(cpu, 'hf', 'ours'):.2f}x", f"{ratio(cpu, 'floor', 'ours'):.0%}"]
                rows.append(row)
                print(" | ".join(map(str, row)), flush=True)

    # greedy agreement: same checkpoint, so the same tokens up to near-ties
    new = args.max_new_tokens[0]
    hf_out = run_hf(1, new, False)[:, T:].tolist()
    our_out = [o[0] for o in run_ours(1, new, False)]
    agree = sum(a == b for x, y in zip(hf_out, our_out) for a, b in zip(x, y)) / (len(prompts) * new)
    desc = (f"`{name}`: {ours.num_params() / 1e6:.2f}M parameters "
            f"({'data/base_model, trained' if CONFIGS[name] is None else 'random, init std 0.02'}), "
            f"{len(prompts)} prompts of {min(lens)}-{max(lens)} tokens; greedy agreement with HF {agree:.1%} "
            f"of tokens; decode step: {decode_cpu.path_for(ours)}")
    bench_config.last = (ours, cfg, prompts)
    return rows, desc


packed_floor = device.type == "cpu" and dtype == torch.float32  # oneDNN's packed GEMM: fp32 on a CPU
floor_names = ["F.linear", "oneDNN"] if packed_floor else ["F.linear"]
all_rows, descs = [], []
header = ["model", "mode", "n", "rows", "new tokens", "HF tok/s", "ours tok/s",
          *(f"floor tok/s ({k})" for k in floor_names), "ours / HF", "of floor", "ours / HF (CPU s)",
          "of floor (CPU s)"]
print(" | ".join(header))
for name in args.config:
    r, d = bench_config(name)
    all_rows += r
    descs.append(d)

# ---- batch-1 decode bandwidth (GPU) ---------------------------------------------------------------------------
bw_lines = []
if device.type == "cuda":
    ours, cfg, prompts = bench_config.last
    short, long = 32, 224  # both in the compiled step's first kv_len bucket (256 keys): one compilation
    one = [prompts[0]]

    def decode(k):
        return lambda: generate(ours, one, max_new_tokens=k, stop_ids=(), sync_every=64, compile=compile)

    t_tok = (median_time(decode(long), args.repeats) - median_time(decode(short), args.repeats)) / (long - short)
    param_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    mean_len = len(one[0]) + (short + long) / 2
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize * mean_len
    achieved = (param_bytes + kv_bytes) / t_tok
    name = device_name(device)
    peak = next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t_copy = median_time(lambda: y.copy_(x), 10)
    copy_bw = 2 * x.numel() / t_copy
    bw_lines = [
        f"batch-1 decode ({args.config[-1]}, {dtype}, attn={ours.attn}): {t_tok * 1e3:.3f} ms/token, "
        f"{(param_bytes + kv_bytes) / 1e9:.3f} GB/token -> {achieved / 1e9:,.0f} GB/s",
        f"  = {achieved / copy_bw:.0%} of a measured 1 GiB device copy ({copy_bw / 1e9:,.0f} GB/s)"
        + (f", {achieved / peak:.0%} of the datasheet peak ({peak / 1e9:,.0f} GB/s)" if peak else
           ", no datasheet peak for this GPU in the table"),
    ]
    for line in bw_lines:
        print(line)

# ---- the results file -----------------------------------------------------------------------------------------
name = device_name(device)
threads = torch.get_num_threads() if device.type == "cpu" else None
lines = [
    f"# Sampler throughput on {name}",
    "",
    f"`python bench/sampler.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
    "",
    f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}"
    + (f" ({threads} threads, load average at the end {' '.join(f'{v:.1f}' for v in os.getloadavg())})"
       if threads else "")
    + ("; glibc malloc tuned as the scripts tune it (minisirev.cli.tune_allocator)" if tuned else ""),
    f"{dtype}, our attention `{Transformer.default_attn(device) if args.attn is None else args.attn}` (prefill), "
    f"HF attention `sdpa`; no EOS; sampled = temperature 1, top-p {args.top_p}, no top-k (both sides); median of "
    f"{args.repeats} alternating rounds after a warm-up, prefill included; ratios are medians of per-round ratios.",
    *[f"- {d}" for d in descs],
    "",
    "| " + " | ".join(header) + " |",
    "|" + "---|" * len(header),
    *["| " + " | ".join(map(str, r)) + " |" for r in all_rows],
]
if args.note:
    lines += ["", args.note]
if bw_lines:
    lines += ["", *bw_lines]
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
path = out / f"sampler_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.md"
path.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"wrote {path}")
