"""The self-improvement loop of arXiv 2407.05013 (PAPER.md, Algorithm 1), end to end, resumable.

    python train.py --iter 3 --method sft-dpo          # the embedded default: tiny model + arith, any machine

M1 = SFT on the gold solutions; then, for t = 2..T: sample N completions per training question from M_{t-1},
verify them, train M_t from M_{t-1} on the correct ones (SFT) or on correct/incorrect pairs (DPO), evaluate.
Everything lands in the run directory (README: "Run directory"). Rerunning the same command after a kill
continues from the last finished stage; --iter may be raised to extend a finished run.
"""

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# ---- the experiment
parser.add_argument("--iter", type=int, default=3,
                    help="iterations T: M1 (SFT on gold) plus T-1 self-improvement rounds")
parser.add_argument("--method", choices=["sft", "dpo", "sft-dpo"], default="sft-dpo",
                    help="self-improvement method of rounds t >= 2")
parser.add_argument("--schedule", choices=["alternate", "both"], default="alternate",
                    help="sft-dpo only: 'alternate' = DPO at even t, SFT at odd t; 'both' = SFT then DPO every round")
parser.add_argument("--model", default="data/base_model", help="base model M0: a local HF-format directory or Hub id")
parser.add_argument("--task", default="arith", help="task: arith, gsm8k, math, csqa, mbpp")
parser.add_argument("--data", default=None,
                    help="directory holding the task's split files (train.jsonl, test.jsonl, ...); default data/TASK")
parser.add_argument("--out", default=None, help="run directory (default runs/TASK-METHOD)")
parser.add_argument("--force", action="store_true", help="delete an existing run directory and start over")
# ---- data sizes
parser.add_argument("--n-train", type=int, default=256, help="training questions used (the first N of the split)")
parser.add_argument("--n-test", type=int, default=200, help="test questions evaluated (first N; 0 = all)")
parser.add_argument("--n-ood", type=int, default=250, help="OOD questions evaluated (first N; 0 = all)")
# ---- sampling (self-improvement data)
parser.add_argument("--n-samples", type=int, default=8, help="N: completions sampled per training question")
parser.add_argument("--temperature", type=float, default=0.75, help="sampling temperature (paper: 0.75)")
parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling p (paper: 0.95)")
parser.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
parser.add_argument("--max-new-tokens", type=int, default=160, help="longest completion generated")
parser.add_argument("--max-per-question", type=int, default=4,
                    help="K: at most K distinct correct samples (SFT) or K pairs (DPO) per question")
# ---- evaluation
parser.add_argument("--eval-samples", type=int, default=8,
                    help="samples per test question for pass@k, diversity and the improvement set")
parser.add_argument("--eval-temperature", type=float, default=None,
                    help="temperature of those samples (default: --temperature)")
parser.add_argument("--semantic-questions", type=int, default=40,
                    help="questions the semantic (MiniLM) diversity is averaged over, the first ones; 0 = all")
# ---- optimisation
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of M1's SFT on gold solutions (AdamW)")
parser.add_argument("--si-lr", type=float, default=None,
                    help="peak learning rate of SFT steps in rounds t >= 2 (default: lr / 4)")
parser.add_argument("--dpo-lr", type=float, default=None, help="peak learning rate of DPO steps (default: lr / 20)")
parser.add_argument("--epochs", type=float, default=1.0, help="epochs per self-improvement SFT/DPO step")
parser.add_argument("--m1-epochs", type=float, default=2.0, help="epochs of M1's SFT on the gold solutions")
parser.add_argument("--batch-size", type=int, default=16, help="sequences (SFT) or pairs (DPO) per micro-batch")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
parser.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of the steps")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
parser.add_argument("--sft-reduction", choices=["mean", "sum"], default="mean",
                    help="SFT loss: mean over tokens, or per-sequence sum averaged over sequences")
parser.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing of every block")
# ---- DPO
parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
parser.add_argument("--label-smoothing", type=float, default=0.0, help="DPO label smoothing (cDPO)")
parser.add_argument("--loss-type", choices=["sigmoid", "ipo", "hinge"], default="sigmoid", help="DPO loss family")
parser.add_argument("--nll-weight", type=float, default=0.0, help="weight of an NLL term on the chosen answers (RPO)")
parser.add_argument("--ref", choices=["prev", "m1"], default="prev", help="DPO reference model: M_{t-1} or M1")
# ---- system
parser.add_argument("--seed", type=int, default=0, help="seed of sampling, batching and everything else")
parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="weights' dtype (default: float32; on CUDA training uses bf16 autocast)")
parser.add_argument("--attn", choices=["ref", "sdpa", "triton"], default=None,
                    help="attention backend (default: triton on CUDA, sdpa elsewhere)")
parser.add_argument("--fused-loss", choices=["auto", "on", "off"], default="auto",
                    help="Triton fused linear log-prob loss: auto = on CUDA only")
parser.add_argument("--log-every", type=int, default=10, help="console line every N optimiser steps")
args = parser.parse_args()

from minisirev import selfimprove as si  # noqa: E402  (after argparse so --help is instant)
from minisirev.checkpoint import CheckpointError, ConfigError, load_model, save_model  # noqa: E402
from minisirev.report import format_table  # noqa: E402
from minisirev.tasks import DataError, get_task  # noqa: E402
from minisirev.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def fail(msg: str, code: int = 2):
    print(f"train.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


# -----------------------------------------------------------------------------
# resolve the run: device, directory, and a config that must match any earlier run in that directory
device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
attn = args.attn or ("triton" if device.type == "cuda" else "sdpa")
fused = args.fused_loss == "on" or (args.fused_loss == "auto" and device.type == "cuda")
run_dir = Path(args.out or f"runs/{args.task}-{args.method}")
config = {**vars(args), "out": str(run_dir), "attn": attn, "fused_loss": fused,
          "si_lr": args.si_lr or args.lr / 4, "dpo_lr": args.dpo_lr or args.lr / 20,
          "eval_temperature": args.eval_temperature or args.temperature}
NOT_COMPARED = {"iter", "force", "log_every", "device"}  # may change between a run and its resumption
try:
    task = get_task(args.task)
    tok = load_tokenizer(args.model)
    split = lambda name: (Path(args.data) / f"{name}.jsonl") if args.data else name  # noqa: E731
    train_recs = task.load(split(task.splits["train"]))[:args.n_train]
    test_recs = task.load(split(task.splits["test"]))[:args.n_test or None]
    ood_task = get_task(task.ood_task) if getattr(task, "ood_task", None) else task
    ood_split = split(task.splits["ood"]) if ood_task is task else task.splits.get("ood")  # MATH for GSM8K
    ood_recs = ood_task.load(ood_split)[:args.n_ood or None] if task.splits.get("ood") else []
    if not train_recs or not test_recs:
        fail(f"task {args.task}: no training or no test questions found")
    model_src = args.model  # loaded once, when the first unfinished stage needs it
except (DataError, CheckpointError, ConfigError, TokenizerError, ValueError) as e:
    fail(str(e))
# the run directory is touched only once the inputs are known good: a typo neither deletes nor leaves anything
if args.force and run_dir.exists():
    shutil.rmtree(run_dir)
if (run_dir / "config.json").exists():
    old = json.loads((run_dir / "config.json").read_text())
    diff = [k for k in config if k not in NOT_COMPARED and old.get(k) != config[k]]
    if diff:
        shown = ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} -> {config[k]!r}" for k in diff[:4])
        fail(f"{run_dir} holds a run with other settings ({shown}); use another --out, or --force to start over")
run_dir.mkdir(parents=True, exist_ok=True)
si.write_json(run_dir / "config.json", config)

train_args = si.TrainArgs(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          warmup=args.warmup, clip=args.clip, seed=args.seed, log_every=args.log_every,
                          autocast_bf16=device.type == "cuda" and dtype == torch.float32,
                          grad_checkpoint=args.grad_checkpoint)
sample_kw = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 max_new_tokens=args.max_new_tokens)
model, model_iter = None, None  # the model in memory and which M_t it is (0 = the base model)


def get_model(t: int):
    """M_t in memory, loading it from the run directory (or the base model) only when it is not already there."""
    global model, model_iter
    if model_iter != t:
        src = model_src if t == 0 else run_dir / f"iter_{t}" / "model"
        model = load_model(src, device=device, dtype=dtype, attn=attn)
        model_iter = t
    return model


print(f"run {run_dir} | {args.task} | {args.method} | T={args.iter} | device {device} | attn {attn}"
      f" | fused loss {'on' if fused else 'off'}")
t_start = time.perf_counter()
try:
    for t in range(1, args.iter + 1):
        it = run_dir / f"iter_{t}"
        it.mkdir(exist_ok=True)
        methods = si.step_methods(args.method, t, args.schedule)
        # -------------------------------------------------------------------------
        # train M_t from M_{t-1}
        if not (it / "model" / "config.json").exists():
            if t == 1:
                data = {"sft": [{"idx": i, "prompt": task.prompt(ex), "completion": task.reference(ex)}
                                for i, ex in enumerate(train_recs)]}
                stats = {"sft": {"examples": len(data["sft"]), "questions": len(train_recs)}}
            else:
                samples = si.generate_and_verify(get_model(t - 1), tok, task, train_recs, it / "samples.jsonl",
                                                 n=args.n_samples, seed=args.seed + t, desc=f"iter {t} sample",
                                                 **sample_kw)
                data, stats = {}, {}
                if "sft" in methods:
                    data["sft"], stats["sft"] = si.build_sft_data(samples, args.max_per_question)
                if "dpo" in methods:
                    data["dpo"], stats["dpo"] = si.build_dpo_pairs(samples, args.max_per_question, args.seed + t)
            si.write_jsonl(it / "train_data.jsonl", [{"type": m, **row} for m in methods for row in data[m]])
            print(f"iter {t}: training {'+'.join(methods)} on " +
                  ", ".join(f"{m}: {json.dumps(s)}" for m, s in stats.items()))
            policy = get_model(t - 1)
            ref = None
            if "dpo" in methods and data["dpo"]:  # reference log-probs once, before any training of this round
                ref_model = policy if args.ref == "prev" or t == 2 else load_model(
                    run_dir / "iter_1" / "model", device=device, dtype=dtype, attn=attn)
                ref = si.reference_logprobs(ref_model, tok, data["dpo"], args.batch_size, fused=fused)
                del ref_model  # the reference is freed: DPO holds one model in memory
            (it / "train_log.jsonl").unlink(missing_ok=True)
            for m in methods:
                if m == "sft" and data["sft"]:
                    epochs, lr = (args.m1_epochs, args.lr) if t == 1 else (args.epochs, config["si_lr"])
                    si.train_sft(policy, tok, data["sft"], dataclasses.replace(train_args, epochs=epochs, lr=lr),
                                 it / "train_log.jsonl", reduction=args.sft_reduction, fused=fused,
                                 desc=f"iter {t} sft")
                elif m == "dpo" and data["dpo"]:
                    si.train_dpo(policy, tok, data["dpo"], ref, dataclasses.replace(train_args, lr=config["dpo_lr"]),
                                 it / "train_log.jsonl", beta=args.beta, label_smoothing=args.label_smoothing,
                                 loss_type=args.loss_type, nll_weight=args.nll_weight, fused=fused,
                                 desc=f"iter {t} dpo")
                else:
                    print(f"iter {t}: no usable {m} data; M_{t} = M_{t - 1} for this step")
            save_model(policy, it / "model", tok)
            model_iter = t
        # -------------------------------------------------------------------------
        # M_t's samples on the training questions: the next round's data, and M1's coverage
        if t < args.iter or t == 1:
            nxt = run_dir / f"iter_{t + 1}"
            nxt.mkdir(exist_ok=True)
            if not (nxt / "samples.jsonl").exists():
                si.generate_and_verify(get_model(t), tok, task, train_recs, nxt / "samples.jsonl",
                                       n=args.n_samples, seed=args.seed + t + 1, desc=f"iter {t + 1} sample",
                                       **sample_kw)
        # -------------------------------------------------------------------------
        # evaluate M_t
        if not (it / "metrics.json").exists():
            si.evaluate(lambda: get_model(t), tok, task, ood_task, test_recs, ood_recs, it, run_dir, t=t,
                        step_method="+".join(methods), n_samples=args.eval_samples,
                        temperature=config["eval_temperature"], top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, seed=args.seed, semantic_questions=args.semantic_questions)
        m = json.loads((it / "metrics.json").read_text())
        print(f"iter {t} ({m['step_method']}): pass@1 {100 * m['pass@1']:.1f}%")
except si.TrainingDiverged as e:
    last = f"iter_{t - 1}/model" if t > 1 else args.model
    fail(f"{e}; stopping. The last good model is {last} (M_{t - 1}); lower --lr and rerun", code=1)
except (DataError, CheckpointError, ConfigError, TokenizerError) as e:
    fail(str(e))

# -----------------------------------------------------------------------------
# summary, report, and the console table
summary = si.write_summary(run_dir, task=args.task, method=args.method, iters=args.iter, config=config)
print(format_table(summary))
print(f"done in {time.perf_counter() - t_start:.0f} s; run directory: {run_dir} (report: {run_dir / 'report.md'})")
