"""The sentence encoder of semantic diversity (all-MiniLM-L6-v2, minisirev/embed.py) on a CPU: its linear layers on
oneDNN's packed GEMM (embed.pack_for_cpu, what load_encoder does on a CPU) against the same model on torch's
F.linear, side by side.

    python bench/encoder.py                       # the embedded task's 2,800 solutions, 2 threads
    python bench/encoder.py --texts runs/arith-sft-dpo/iter_1/eval/test_samples.jsonl   # a run's completions

Both encoders are built from the same weights in one process and timed alternately on the same texts (each
distinct text once, as the metrics encode them): the median of --repeats rounds after a warm-up. The table gives
texts/s and real (unpadded) tokens/s, the ratio, and the largest difference between the two embeddings (unit
vectors, fp32). Writes bench/results/encoder_<device>.md (--out) unless --smoke (a few texts, one round: the script
runs end to end, its timings mean nothing).
"""

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.packed_linear import PackedLinear  # noqa: E402
from minisirev import cli, embed  # noqa: E402
from minisirev.provenance import device_name  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--texts", default=None,
                    help="a jsonl file whose records hold 'completions' (a run's samples) or 'answer' (a task split); "
                         "default: the embedded task's solutions (data/arith/*.jsonl)")
parser.add_argument("--max-texts", type=int, default=0, help="the first N distinct texts (0 = all)")
parser.add_argument("--batch-size", type=int, default=64, help="texts per encoder call (Encoder.encode's default)")
parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds; one warm-up before")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
parser.add_argument("--smoke", action="store_true", help="64 texts, one round, no results file unless --out")
parser.add_argument("--out", default=None, help="results file (default bench/results/encoder_<CPU>.md)")
args = parser.parse_args()
if min(args.repeats, args.threads, args.batch_size) < 1 or args.max_texts < 0:
    parser.error("--repeats, --threads and --batch-size must be at least 1, --max-texts at least 0")
torch.set_num_threads(args.threads)
tuned = cli.tune_allocator()  # as train.py and eval.py do


def load_texts() -> list[str]:
    files = [Path(args.texts)] if args.texts else sorted((ROOT / "data" / "arith").glob("*.jsonl"))
    texts = []
    for f in files:
        try:
            lines = f.read_text().splitlines()
        except OSError as e:
            sys.exit(f"bench/encoder.py: {f}: {e.strerror}")
        for i, line in enumerate(lines, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"bench/encoder.py: {f} line {i}: not JSON ({e.msg})")
            got = r.get("completions", [r["answer"]] if "answer" in r else None)
            if not isinstance(got, list) or not all(isinstance(t, str) for t in got):
                sys.exit(f"bench/encoder.py: {f} line {i}: no 'completions' list or 'answer' string")
            texts += got
    texts = list(dict.fromkeys(texts))  # each distinct text once, as metrics.diversity_per_question does
    limit = 64 if args.smoke else args.max_texts
    return texts[:limit] if limit else texts


texts = load_texts()
if len(texts) < 2:
    sys.exit("bench/encoder.py: fewer than two distinct texts to encode")
try:
    weights, source = embed.find_weights()
except embed.EncoderUnavailable as e:
    sys.exit(f"bench/encoder.py: no all-MiniLM-L6-v2 weights: {e}")
original = embed.pack_for_cpu
embed.pack_for_cpu = lambda model: model  # the unpacked twin: the same model on F.linear
plain = embed._from_dir(weights, source, "cpu")
embed.pack_for_cpu = original
packed = embed._from_dir(weights, source, "cpu")
n_packed = sum(isinstance(m, PackedLinear) for m in packed.model.modules())
tokens = sum(sum(e.attention_mask) for e in plain.tokenizer.encode_batch(texts))  # real tokens only

encoders = {"oneDNN packed (ours)": packed, "F.linear": plain}
embeddings = {name: enc.encode(texts[:256], batch_size=args.batch_size) for name, enc in encoders.items()}  # warm-up
diff = (embeddings["oneDNN packed (ours)"] - embeddings["F.linear"]).abs().max().item()
times: dict[str, list[float]] = {name: [] for name in encoders}
for _ in range(1 if args.smoke else args.repeats):
    for name, enc in encoders.items():
        t0 = time.perf_counter()
        enc.encode(texts, batch_size=args.batch_size)
        times[name].append(time.perf_counter() - t0)
med = {name: statistics.median(v) for name, v in times.items()}

when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
cpu = device_name()
lines = [
    f"`python bench/encoder.py{' --smoke' if args.smoke else ''}` on {cpu}, {args.threads} threads, torch "
    f"{torch.__version__}, {when}" + (", glibc malloc tuned (minisirev.cli.tune_allocator)" if tuned else ""),
    "",
    f"{len(texts):,} distinct texts ({'from ' + args.texts if args.texts else 'the embedded task solutions'}), "
    f"{tokens:,} tokens without padding, batches of {args.batch_size} sorted by length; all-MiniLM-L6-v2 from "
    f"{source}; {n_packed} linear layers packed; median of {len(times['F.linear'])} alternating rounds after a "
    f"warm-up; largest |difference| between the two embeddings (unit vectors): {diff:.1e}",
    "",
    "| linear layers | seconds | texts/s | tokens/s | vs F.linear |",
    "|---|---|---|---|---|",
]
for name, t in med.items():
    lines.append(f"| {name} | {t:.2f} | {len(texts) / t:,.0f} | {tokens / t:,.0f} | {med['F.linear'] / t:.2f}x |")
table = "\n".join(lines)
print(table)
if diff > 1e-5:
    sys.exit(f"bench/encoder.py: the packed encoder's embeddings differ from F.linear's by {diff:.1e} (> 1e-5)")
if args.out or not args.smoke:
    out = Path(args.out) if args.out else \
        ROOT / "bench" / "results" / f"encoder_{re.sub(r'[^A-Za-z0-9]+', '_', cpu).strip('_')}.md"
    head = f"# Sentence encoder throughput on {cpu}\n\n"
    old = out.read_text() if out.exists() else ""
    body = old[len(head):] if old.startswith(head) else old
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head + "## " + when + "\n\n" + table + "\n\n" + body)
    print(f"\nwritten to {out}")
