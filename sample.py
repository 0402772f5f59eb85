"""Sample N completions per question from a model and grade each with the task's verifier.

    python sample.py --model data/base_model --task arith --split test --n 50 --out samples.jsonl

Writes one JSON line per question, {"idx", "id", "prompt", "completions", "correct"}, appending batch by batch
(flushed and fsynced). A rerun with the same --out skips the questions already there, so a killed run resumes where
it stopped; a partial last line left by the kill is cut off first. Random streams are keyed by the question's idx
(minisirev/sampler.py), so a resumed run writes what an uninterrupted run would have written on the same device.
The flags of the first run are kept beside the output (FILE.args.json); resuming with other sampling flags is
refused rather than mixing two distributions in one file.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from minisirev.checkpoint import load_model
from minisirev.sampler import generate
from minisirev.tasks import get_task
from minisirev.tokenizer import load_tokenizer

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
# ---- model and data
parser.add_argument("--model", default="data/base_model", help="checkpoint directory or Hub repo id")
parser.add_argument("--task", default="arith", help="task name: arith, gsm8k, math, csqa, mbpp")
parser.add_argument("--split", default="test", help="split name, resolved by the task (data/<task>/<split>.jsonl)")
parser.add_argument("--data", default=None, help="a JSONL file of questions, overriding --split")
parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT questions")
# ---- sampling
parser.add_argument("--n", type=int, default=50, help="completions per question")
parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 keeps every token")
parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion at most")
parser.add_argument("--seed", type=int, default=0, help="seed of the per-question random streams")
# ---- runtime
parser.add_argument("--batch-size", type=int, default=64, help="questions per generate call (and per file write)")
parser.add_argument("--max-rows", type=int, default=None, help="decode slots at most (default: the memory budget)")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default: as stored)")
parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on CUDA)")
# ---- output
parser.add_argument("--out", required=True, help="the JSONL file to write, or to resume")
args = parser.parse_args()

SAMPLING_FLAGS = ("model", "task", "split", "data", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed")


def fail(message: str):
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0:
    fail("--n, --batch-size and --max-new-tokens must be >= 1 and --temperature >= 0")
if not 0 < args.top_p <= 1:
    fail("--top-p must be in (0, 1]")

# ---- questions
try:
    task = get_task(args.task)
    records = task.load(args.data or args.split)
except ValueError as e:  # unknown task, DataError (missing or malformed file)
    fail(str(e))
if args.limit is not None:
    records = records[:args.limit]

# ---- model
try:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.model, device=args.device, dtype=dtype)
    tok = load_tokenizer(args.model)
except (ValueError, FileNotFoundError) as e:  # CheckpointError, ConfigError, TokenizerError, bad Hub id
    fail(str(e))
eos = model.config.eos_id
stop_ids = set([eos] if isinstance(eos, int) else eos or [])
if tok.eos_id is not None:
    stop_ids.add(tok.eos_id)

# ---- resume: cut a partial last line, skip the questions already written
out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
args_file = out.with_name(out.name + ".args.json")
done = set()
if out.exists():
    data = out.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(out, "r+b") as f:
            f.truncate(keep)
        print(f"sample.py: cut a partial last line ({len(data) - keep} bytes) from {out}", file=sys.stderr)
    for lineno, line in enumerate(data[:keep].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                done.add(json.loads(line)["idx"])
            except (json.JSONDecodeError, KeyError, TypeError):
                fail(f"{out}:{lineno}: not a line this script wrote; use another --out")
    if done and args_file.exists():
        before = json.loads(args_file.read_text())
        changed = ["--" + k.replace("_", "-") for k in SAMPLING_FLAGS if before.get(k) != vars(args)[k]]
        if changed:
            fail(f"{out} was written with other flags ({', '.join(changed)}); use another --out")
if not done:
    args_file.write_text(json.dumps(vars(args), indent=2) + "\n")
todo = [i for i in range(len(records)) if i not in done]
print(f"sample.py: {len(records)} questions, {len(done)} already in {out}, {len(todo)} to sample", file=sys.stderr)
if not todo:
    sys.exit(0)

# ---- sample, grade, append
bar = tqdm(total=len(records), initial=len(done), unit="q", desc="sample", dynamic_ncols=True)
n_tokens, t0 = 0, time.perf_counter()


def on_tokens(k: int):
    global n_tokens
    n_tokens += k
    bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):.0f} tok/s", refresh=True)


with open(out, "a", encoding="utf-8") as f:
    for start in range(0, len(todo), args.batch_size):
        idxs = todo[start:start + args.batch_size]
        texts = [task.prompt(records[i]) for i in idxs]
        prompts = [tok.encode_prompt(t) for t in texts]
        outs = generate(model, prompts, n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, stop_ids=sorted(stop_ids), seed=args.seed, keys=idxs,
                        max_batch_rows=args.max_rows, progress=on_tokens, compile=args.compile)
        for i, text, samples in zip(idxs, texts, outs):
            completions = tok.decode_batch(samples)
            correct = task.is_correct_batch([records[i]] * len(completions), completions)
            line = {"idx": i, "id": records[i].get("id", i), "prompt": text, "completions": completions,
                    "correct": [bool(c) for c in correct]}
            f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
        bar.update(len(idxs))
bar.close()
print(f"sample.py: wrote {len(todo)} questions to {out} ({n_tokens} tokens, "
      f"{n_tokens / (time.perf_counter() - t0):.0f} tok/s)", file=sys.stderr)
