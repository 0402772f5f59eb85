"""The critical evaluation: every metric of PAPER.md for each iteration of a run, summary.json, report.md, plots.

    python eval.py --run runs/arith-sft-dpo                  # every iteration of a run (reuses finished metrics)
    python eval.py --model runs/arith-sft-dpo/iter_1/model --task arith --out runs/eval-m1

Generations (greedy and sampled test answers, greedy OOD answers) are kept under iter_t/eval/ and reused; metrics
are recomputed from them with --recompute. Settings not given on the command line come from the run's
config.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# ---- what to evaluate
parser.add_argument("--run", help="a run directory written by train.py: evaluate every iteration, write the report")
parser.add_argument("--model", help="one checkpoint (local directory or Hub id) to evaluate instead of a run")
parser.add_argument("--task", default=None, help="task of --model: arith, gsm8k, math, csqa, mbpp (default: the run's)")
parser.add_argument("--data", default=None, help="directory holding the task's split files (default data/TASK)")
parser.add_argument("--out", default=None, help="with --model: where to write (default runs/eval-MODELNAME)")
parser.add_argument("--recompute", action="store_true", help="recompute metrics.json even where it exists")
# ---- evaluation settings (default: the run's config.json, else these)
parser.add_argument("--n-test", type=int, default=None, help="test questions evaluated (default 200; 0 = all)")
parser.add_argument("--n-ood", type=int, default=None, help="OOD questions evaluated (default 250; 0 = all)")
parser.add_argument("--eval-samples", type=int, default=None, help="samples per test question (default 8)")
parser.add_argument("--eval-temperature", type=float, default=None, help="temperature of those samples (default 0.75)")
parser.add_argument("--top-p", type=float, default=None, help="nucleus p of those samples (default 0.95)")
parser.add_argument("--max-new-tokens", type=int, default=None, help="longest completion (default 160)")
parser.add_argument("--seed", type=int, default=None, help="sampling seed (default 0)")
parser.add_argument("--semantic-questions", type=int, default=None,
                    help="questions the semantic diversity is averaged over (default 40; 0 = all)")
# ---- system
parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
parser.add_argument("--attn", choices=["ref", "sdpa", "triton"], default=None, help="attention backend")
args = parser.parse_args()

from minisirev import selfimprove as si  # noqa: E402
from minisirev.checkpoint import CheckpointError, ConfigError, load_model  # noqa: E402
from minisirev.report import format_table  # noqa: E402
from minisirev.tasks import DataError, get_task  # noqa: E402
from minisirev.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def fail(msg: str):
    print(f"eval.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


if bool(args.run) == bool(args.model):
    fail("give exactly one of --run DIR or --model CHECKPOINT")

# -----------------------------------------------------------------------------
# the run to evaluate: a train.py run, or a one-iteration pseudo-run around a single checkpoint
if args.run:
    run_dir = Path(args.run)
    if not (run_dir / "config.json").exists():
        fail(f"{run_dir}: not a run directory (no config.json)")
    config = json.loads((run_dir / "config.json").read_text())
    iters = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("iter_*") if (p / "model" / "config.json").exists())
    if not iters or iters[0] != 1:
        fail(f"{run_dir}: no finished iteration (iter_1/model is missing)")
    iters = list(range(1, max(iters) + 1))
else:
    run_dir = Path(args.out or f"runs/eval-{Path(args.model).name}")
    config = {"task": args.task or "arith", "method": "none"}
    iters = [1]
pick = lambda key, default: getattr(args, key) if getattr(args, key) is not None else config.get(key, default)  # noqa
settings = dict(task=args.task or config["task"], n_test=pick("n_test", 200), n_ood=pick("n_ood", 250),
                eval_samples=pick("eval_samples", 8), eval_temperature=pick("eval_temperature", 0.75),
                top_p=pick("top_p", 0.95), top_k=config.get("top_k", 0), max_new_tokens=pick("max_new_tokens", 160),
                seed=pick("seed", 0), semantic_questions=pick("semantic_questions", 40))
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
attn = args.attn or ("triton" if device.type == "cuda" else "sdpa")

try:
    task = get_task(settings["task"])
    data = args.data or config.get("data")
    split = lambda name: (Path(data) / f"{name}.jsonl") if data else name  # noqa: E731
    test_recs = task.load(split(task.splits["test"]))[:settings["n_test"] or None]
    ood_task = get_task(task.ood_task) if getattr(task, "ood_task", None) else task
    ood_split = split(task.splits["ood"]) if ood_task is task else task.splits.get("ood")  # MATH for GSM8K
    ood_recs = ood_task.load(ood_split)[:settings["n_ood"] or None] if task.splits.get("ood") else []
    tok = load_tokenizer(args.model or run_dir / "iter_1" / "model")
except (DataError, CheckpointError, ConfigError, TokenizerError, ValueError) as e:
    fail(str(e))

# -----------------------------------------------------------------------------
# evaluate every iteration whose metrics are missing (or all, with --recompute)
for t in iters:
    it = run_dir / f"iter_{t}"
    it.mkdir(parents=True, exist_ok=True)
    if (it / "metrics.json").exists() and not args.recompute:
        print(f"iter {t}: metrics.json exists, reused (--recompute to redo)")
        continue
    src = args.model if args.model else it / "model"
    holder = {}

    def get_model(src=src, holder=holder):
        if "m" not in holder:
            holder["m"] = load_model(src, device=device, attn=attn)
        return holder["m"]

    step = si.step_methods(config.get("method", "sft"), t, config.get("schedule", "alternate")) \
        if config.get("method") != "none" else ["none"]
    try:
        m = si.evaluate(get_model, tok, task, ood_task, test_recs, ood_recs, it, run_dir, t=t,
                        step_method="+".join(step), n_samples=settings["eval_samples"],
                        temperature=settings["eval_temperature"], top_p=settings["top_p"], top_k=settings["top_k"],
                        max_new_tokens=settings["max_new_tokens"], seed=settings["seed"],
                        semantic_questions=settings["semantic_questions"])
    except (CheckpointError, ConfigError) as e:
        fail(str(e))
    print(f"iter {t}: pass@1 {100 * m['pass@1']:.1f}%")

summary = si.write_summary(run_dir, task=settings["task"], method=config.get("method", "none"), iters=max(iters),
                           config=config)
print(format_table(summary))
print(f"wrote {run_dir / 'summary.json'}, {run_dir / 'report.md'} and {run_dir / 'plots'}/")
