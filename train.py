"""The self-improvement loop of arXiv 2407.05013 (Algorithm 1; docs/method.md), end to end, resumable.

    python train.py --iter 3 --method sft-dpo          # the embedded default: tiny model + arith, any machine

M0 (the base model) is evaluated first, the t = 0 row. M1 = SFT of M0 on the gold solutions; then, for
t = 2..T: take M_{t-1}'s N verified samples per training question, train M_t from M_{t-1} on the correct ones
(SFT) or on correct/incorrect pairs (DPO), evaluate it. Everything lands in the run directory
(minisirev/run.py). Rerunning the same command after a kill continues from the last finished stage; --iter may
be raised to extend a finished run.
"""

import argparse
import dataclasses
import shutil
import time

from minisirev.stages import EvalSettings

E = EvalSettings()  # the evaluation defaults, shared with eval.py
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
parser.add_argument("--skip-base", action="store_true", help="do not evaluate M0 (no t = 0 row in the report)")
parser.add_argument("--m1-from", default=None, metavar="RUN",
                    help="start from another run's M1 (and M0's evaluation), made with the same M1 settings: the "
                         "way to compare methods on one M1 (then: eval.py --compare RUN RUN ...)")
# ---- data sizes
parser.add_argument("--n-train", type=int, default=256, help="training questions used (the first N of the split)")
parser.add_argument("--n-test", type=int, default=E.n_test, help="test questions evaluated (first N; 0 = all)")
parser.add_argument("--n-ood", type=int, default=E.n_ood, help="OOD questions evaluated (first N; 0 = all)")
# ---- sampling (self-improvement data)
parser.add_argument("--n-samples", type=int, default=8, help="N: completions sampled per training question")
parser.add_argument("--temperature", type=float, default=E.temperature, help="sampling temperature (paper: 0.75)")
parser.add_argument("--top-p", type=float, default=E.top_p, help="nucleus sampling p, in (0, 1] (paper: 0.95)")
parser.add_argument("--top-k", type=int, default=E.top_k, help="top-k sampling (0 = off)")
parser.add_argument("--max-new-tokens", type=int, default=E.max_new_tokens, help="longest completion, in tokens")
parser.add_argument("--max-per-question", type=int, default=4,
                    help="K: at most K distinct correct samples (SFT) or K pairs (DPO) per question")
# ---- evaluation
parser.add_argument("--eval-samples", type=int, default=E.samples,
                    help="samples per test question for pass@k (k up to this), diversity and the improvement set")
parser.add_argument("--eval-temperature", type=float, default=None,
                    help="temperature of those samples (default: --temperature; 0 = greedy)")
parser.add_argument("--semantic-questions", type=int, default=E.semantic_questions,
                    help="questions the semantic (MiniLM) diversity is averaged over, the first ones; 0 = all")
parser.add_argument("--semantic-samples", type=int, default=E.semantic_samples,
                    help="samples per question (and correct/incorrect group) the semantic diversity uses; 0 = all")
# ---- optimisation
parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of M1's SFT on gold solutions (AdamW)")
parser.add_argument("--si-lr", type=float, default=None,
                    help="peak learning rate of SFT steps in rounds t >= 2 (default: lr / 4)")
parser.add_argument("--dpo-lr", type=float, default=None, help="peak learning rate of DPO steps (default: lr / 20)")
parser.add_argument("--epochs", type=float, default=1.0, help="epochs per self-improvement SFT/DPO step")
parser.add_argument("--m1-epochs", type=float, default=2.0, help="epochs of M1's SFT on the gold solutions")
parser.add_argument("--batch-size", type=int, default=16, help="sequences (SFT) or pairs (DPO) per micro-batch")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
parser.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of the steps, in [0, 1)")
parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping threshold (> 0)")
parser.add_argument("--sft-reduction", choices=["mean", "sum"], default="mean",
                    help="SFT loss: mean over tokens, or per-sequence sum averaged over sequences")
parser.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing of every block")
# ---- DPO
parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (> 0)")
parser.add_argument("--label-smoothing", type=float, default=0.0, help="DPO label smoothing (cDPO), in [0, 0.5)")
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
# ---- scaling (torchrun; docs/distributed.md)
parser.add_argument("--plan", type=int, nargs="?", const=0, default=None, metavar="RANKS",
                    help="print what each of RANKS GPUs needs (default: this launch's world size) and exit")
parser.add_argument("--gpu-memory", type=float, default=None,
                    help="GiB per GPU the plan checks against (default: this GPU's, or 80 with none)")
parser.add_argument("--cpu-offload", action="store_true",
                    help="under torchrun: sharded fp32 weights, gradients and AdamW state in CPU memory")
args = parser.parse_args()

import torch  # noqa: E402  (after argparse so --help is instant)

from minisirev import cli, plan  # noqa: E402
from minisirev import distributed as dist  # noqa: E402
from minisirev import training as tr  # noqa: E402
from minisirev.checkpoint import CheckpointError, ConfigError, load_model  # noqa: E402
from minisirev.report import format_table  # noqa: E402
from minisirev.run import Run, load_inputs, read_rows, write_json, write_jsonl  # noqa: E402
from minisirev.stages import Models, Sampling, evaluate, generate_and_verify, write_provenance, write_summary  # noqa: E402
from minisirev.tasks import DataError, HarnessError  # noqa: E402
from minisirev.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

P = "train.py"
cli.check_flags(P, args, {
    "iter": cli.INT_GE1, "n_train": cli.INT_GE1, "n_test": cli.INT_GE0, "n_ood": cli.INT_GE0,
    "n_samples": cli.INT_GE1, "temperature": cli.NONNEG, "top_p": cli.PROB, "top_k": cli.INT_GE0,
    "max_new_tokens": cli.INT_GE1, "max_per_question": cli.INT_GE1, "eval_samples": cli.INT_GE1,
    "eval_temperature": cli.NONNEG, "semantic_questions": cli.INT_GE0, "semantic_samples": cli.INT_GE0,
    "lr": cli.POSITIVE, "si_lr": cli.POSITIVE,
    "dpo_lr": cli.POSITIVE, "epochs": cli.POSITIVE, "m1_epochs": cli.POSITIVE, "batch_size": cli.INT_GE1,
    "grad_accum": cli.INT_GE1, "warmup": cli.FRACTION, "clip": cli.POSITIVE, "beta": cli.POSITIVE,
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"), "nll_weight": cli.NONNEG,
    "log_every": cli.INT_GE1, "plan": cli.INT_GE0, "gpu_memory": cli.POSITIVE})
if args.n_samples < 2 and args.method != "sft":
    cli.fail(P, f"--n-samples {args.n_samples}: DPO needs pairs, so at least 2 samples per question")

# -----------------------------------------------------------------------------
# resolve the run: device, inputs, directory, and a config that must match any earlier run in that directory
cli.tune_allocator()  # glibc: reuse freed memory rather than fault in fresh pages (minisirev/cli.py)
device = dist.setup(P, cli.resolve_device(P, args.device))  # under torchrun: this rank's device
sharded = dist.active()  # training under FSDP2 (sampling and evaluation: a replica per rank)
dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
attn = cli.default_attn(device, args.attn)
fused = args.fused_loss == "on" or (args.fused_loss == "auto" and device.type == "cuda")
run = Run(args.out or f"runs/{args.task}-{args.method}")
config = {**vars(args), "out": str(run.root), "attn": attn, "fused_loss": fused,
          "si_lr": args.si_lr if args.si_lr is not None else args.lr / 4,
          "dpo_lr": args.dpo_lr if args.dpo_lr is not None else args.lr / 20,
          "eval_temperature": args.eval_temperature if args.eval_temperature is not None else args.temperature,
          "world_size": dist.world()}
try:
    inputs = load_inputs(args.task, args.data, n_train=args.n_train, n_test=args.n_test, n_ood=args.n_ood)
    tok = load_tokenizer(args.model)
except (DataError, CheckpointError, ConfigError, TokenizerError, ValueError) as e:
    cli.fail(P, str(e))
plan.check(P, args, inputs, tok, device, dist.world())  # --plan prints and exits; a run that cannot fit stops here


# the run directory is touched only once the inputs are known good: a typo neither deletes nor leaves anything
def open_run():  # on rank 0 only, under torchrun
    if args.force and run.root.exists():
        shutil.rmtree(run.root)
    if (why := run.config_conflict(config)) is not None:
        cli.fail(P, why)
    if args.m1_from and (why := Run(args.m1_from).m1_conflict(config)) is not None:
        cli.fail(P, f"--m1-from {why}")
    plan.note_world_change(run.stored_config(), config)
    run.root.mkdir(parents=True, exist_ok=True)
    write_json(run.config, config)
    if args.m1_from:
        run.adopt_m1(Run(args.m1_from))


dist.on_main(open_run)
dist.check_shared(run.config, P)

train_args = tr.TrainArgs(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          warmup=args.warmup, clip=args.clip, seed=args.seed, log_every=args.log_every,
                          autocast_bf16=device.type == "cuda" and dtype == torch.float32 and not sharded,
                          grad_checkpoint=args.grad_checkpoint, fused=fused, sft_reduction=args.sft_reduction)
dpo = tr.DPOArgs(beta=args.beta, label_smoothing=args.label_smoothing, loss_type=args.loss_type,
                 nll_weight=args.nll_weight)
evals = EvalSettings(n_test=args.n_test, n_ood=args.n_ood, samples=args.eval_samples,
                     temperature=config["eval_temperature"], top_p=args.top_p, top_k=args.top_k,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, semantic_questions=args.semantic_questions,
                     semantic_samples=args.semantic_samples)
model = Models(lambda t: args.model if t == 0 else run.model(t), device=device, dtype=dtype, attn=attn)


def train_model(t: int):
    """M_t to train: the model in memory in one process; under torchrun this rank's FSDP2 shards, read from disk
    (bf16 compute with fp32 master weights on CUDA)."""
    if not sharded:
        return model(t)
    model.held.clear()
    return dist.load_sharded(model.source(t), device=device, dtype=dtype, attn=attn,
                             bf16=device.type == "cuda" and dtype == torch.float32, cpu_offload=args.cpu_offload)


def self_samples(t: int) -> list[dict]:
    """M_t's N verified samples per training question (seed + t + 1): M1's coverage and round t + 1's data."""
    s = Sampling(args.n_samples, args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed + t + 1)
    return generate_and_verify(model(t), tok, inputs.task, inputs.train, run.samples(t), s,
                               desc=f"iter {t} sample", log=run.log)


print(f"run {run.root} | {args.task} | {args.method} | T={args.iter} | device {device} | attn {attn}"
      f" | fused loss {'on' if fused else 'off'}")
t_start = time.perf_counter()
try:
    if not args.skip_base:
        m = evaluate(run, 0, lambda: model(0), tok, inputs, evals, "base")
        dist.on_main(write_provenance, run, 0, config, device)
        print(f"iter 0 (base): pass@1 {100 * m['pass@1']:.1f}%")
    for t in range(1, args.iter + 1):
        methods = tr.step_methods(args.method, t, args.schedule)
        if not run.has_model(t):  # ---- train M_t from M_{t-1}
            if t == 1:
                data = {"sft": tr.gold_sft_data(inputs.task, inputs.train)}
                stats = {"sft": {"examples": len(data["sft"]), "questions": len(inputs.train)}}
            else:
                samples = read_rows(run.samples(t - 1)) if run.samples(t - 1).exists() else self_samples(t - 1)
                data, stats = tr.round_data(samples, methods, args.max_per_question, args.seed + t)
            dist.on_main(write_jsonl, run.train_data(t), [{"type": m, **row} for m in methods for row in data[m]])
            print(f"iter {t}: training {'+'.join(methods)} on {stats}")
            policy = train_model(t - 1)
            ref = None
            if data.get("dpo"):  # the reference's log-probs once, before any step of this round changes the policy
                ref_model = policy if args.ref == "prev" or t == 2 else train_model(1) if sharded else load_model(
                    run.model(1), device=device, dtype=dtype, attn=attn)
                ref = tr.reference_logprobs(ref_model, tok, data["dpo"], train_args)
                del ref_model  # DPO holds one model in memory
            dist.on_main(run.train_log(t).unlink, missing_ok=True)  # rank 0's file; the others wait
            for m in methods:
                if not data[m]:
                    print(f"iter {t}: no usable {m} data; M_{t} = M_{t - 1} for this step")
                elif m == "sft":
                    epochs, lr = (args.m1_epochs, args.lr) if t == 1 else (args.epochs, config["si_lr"])
                    tr.train_sft(policy, tok, data["sft"], dataclasses.replace(train_args, epochs=epochs, lr=lr),
                                 run.train_log(t), desc=f"iter {t} sft")
                else:
                    tr.train_dpo(policy, tok, data["dpo"], ref, dataclasses.replace(train_args, lr=config["dpo_lr"]),
                                 run.train_log(t), dpo, desc=f"iter {t} dpo")
            dist.save_full(policy, run.model(t), tok)  # one process: save_model; torchrun: gathered on rank 0
            if sharded:  # under torchrun M_t is sampled from a full replica per rank, read back from disk
                model.held.clear()
            else:
                model.put(t, policy)
            del policy
        if t == 1 or t < args.iter:  # ---- M_t's samples: M1's coverage, the next round's data
            self_samples(t)
        m = evaluate(run, t, lambda: model(t), tok, inputs, evals, "+".join(methods))  # ---- evaluate M_t
        dist.on_main(write_provenance, run, t, config, device)
        print(f"iter {t} ({m['step_method']}): pass@1 {100 * m['pass@1']:.1f}%")
except tr.TrainingDiverged as e:
    last = f"{run.model(t - 1)}" if t > 1 else args.model
    cli.fail(P, f"{e}; stopping. The last good model is {last} (M_{t - 1}); lower --lr and rerun", code=1)
except HarnessError as e:
    cli.fail(P, f"the verifier could not run: {e}", code=1)
except (DataError, CheckpointError, ConfigError, TokenizerError) as e:
    cli.fail(P, str(e))

# -----------------------------------------------------------------------------
# summary, report, and the console table
summary = dist.on_main(write_summary, run, config)
print(format_table(summary))
print(f"done in {time.perf_counter() - t_start:.0f} s; run directory: {run.root} (report: {run.root / 'report.md'})")
dist.shutdown()
