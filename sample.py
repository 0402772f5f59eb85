"""Sample N completions per question from a model and grade each with the task's verifier.

    python sample.py --model data/base_model --task arith --split test --n 50 --out samples.jsonl

Writes one JSON line per question, {"idx", "id", "prompt", "completions", "correct"[, "level"]}, the same rows as
a run's samples (minisirev/stages.py). Questions go in batches appended to OUT.partial (fsynced); a rerun of the
same command keeps the finished batches, so a killed run resumes where it stopped, and OUT appears when every
question is in. Random streams are keyed by the question's index, so a resumed run writes what an uninterrupted
run would have written on the same device. The settings are kept beside the output (OUT.settings.json): resuming
with other sampling flags is refused rather than mixing two distributions in one file.
"""

import argparse

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# ---- model and data
parser.add_argument("--model", default="data/base_model", help="checkpoint directory or Hub repo id")
parser.add_argument("--task", default="arith", help="task name: arith, gsm8k, math, csqa, mbpp")
parser.add_argument("--split", default="test", help="split name, resolved by the task (data/<task>/<split>.jsonl)")
parser.add_argument("--data", default=None, help="a JSONL file of questions, overriding --split")
parser.add_argument("--limit", type=int, default=None, help="only the first LIMIT questions")
# ---- sampling
parser.add_argument("--n", "--n-samples", type=int, default=50, dest="n",
                    help="completions per question (under torchrun write --n-samples: it takes --n for its own)")
parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; 1 keeps every token")
parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 keeps all")
parser.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion at most")
parser.add_argument("--seed", type=int, default=0, help="seed of the per-question random streams")
# ---- runtime
parser.add_argument("--batch-size", type=int, default=64, help="questions per generate call (and per file write)")
parser.add_argument("--max-rows", type=int, default=None, help="decode slots at most (default: the memory budget)")
parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weight dtype (default: as stored)")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the decode step (default: on CUDA, with CUDA graphs; off on a CPU)")
# ---- output
parser.add_argument("--out", required=True, help="the JSONL file to write, or to resume")
args = parser.parse_args()

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from minisirev import cli  # noqa: E402
from minisirev import distributed as dist  # noqa: E402
from minisirev.checkpoint import CheckpointError, ConfigError, load_model  # noqa: E402
from minisirev.run import read_json  # noqa: E402
from minisirev.stages import Sampling, generate_and_verify, generation_settings, settings_path  # noqa: E402
from minisirev.tasks import DataError, HarnessError, get_task  # noqa: E402
from minisirev.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

P = "sample.py"
cli.check_flags(P, args, {"limit": cli.INT_GE1, "n": cli.INT_GE1, "temperature": cli.NONNEG, "top_p": cli.PROB,
                          "top_k": cli.INT_GE0, "max_new_tokens": cli.INT_GE1, "batch_size": cli.INT_GE1,
                          "max_rows": cli.INT_GE1})
cli.tune_allocator()  # glibc: reuse freed memory rather than fault in fresh pages (minisirev/cli.py)
device = dist.setup(P, cli.resolve_device(P, args.device))  # torchrun: each rank samples a share
try:
    task = get_task(args.task)
    records = task.load(args.data or args.split)[:args.limit]
    tok = load_tokenizer(args.model)
except (DataError, TokenizerError, CheckpointError, ValueError) as e:
    cli.fail(P, str(e))

out = Path(args.out)
sampling = Sampling(args.n, args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
wanted = generation_settings(task, records, sampling)
sp = settings_path(out)
if sp.exists() and read_json(sp) != wanted:
    before = read_json(sp)
    changed = ", ".join(f"{k} {before.get(k)!r} -> {v!r}" for k, v in wanted.items() if before.get(k) != v)
    cli.fail(P, f"{out} was written with other settings ({changed}); use another --out")
if out.exists() and sp.exists():
    print(f"{P}: {out} is complete ({len(records)} questions); nothing to do")
    raise SystemExit(0)

try:
    model = load_model(args.model, device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = generate_and_verify(model, tok, task, records, out, sampling, chunk=args.batch_size, desc="sample",
                               gen_kw={"max_batch_rows": args.max_rows, "compile": args.compile})
except (CheckpointError, ConfigError) as e:
    cli.fail(P, str(e))
except HarnessError as e:
    cli.fail(P, f"the verifier could not run: {e}", code=1)
correct = sum(sum(r["correct"]) for r in rows)
print(f"{P}: wrote {len(rows)} questions x {args.n} to {out}; {correct} of {len(rows) * args.n} correct")
dist.shutdown()
