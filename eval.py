"""The critical evaluation: every metric of docs/method.md for each model of a run, summary.json, report.md, plots.

    python eval.py --run runs/arith-sft-dpo                  # M0 and every iteration of a run
    python eval.py --model runs/arith-sft-dpo/iter_1/model --task arith --out runs/eval-m1
    python eval.py --compare runs/sft runs/dpo runs/sft-dpo --out runs/compare   # methods side by side

Generations (greedy and sampled test answers, greedy OOD answers) are kept under iter_t/eval/ with the settings
that made them, and reused while the settings are the same; a changed setting (say --eval-samples 16)
regenerates what it changes and is recorded in the run's config.json. Settings not given on the command line come
from the run's config.json, else the defaults train.py uses.
"""

import argparse

from minisirev.stages import EvalSettings

E = EvalSettings()
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# ---- what to evaluate
parser.add_argument("--run", "--run-dir", dest="run",
                    help="a run directory written by train.py: evaluate M0 and every iteration (under torchrun write "
                         "--run-dir: it takes --run for its own --run-path)")
parser.add_argument("--model", help="one checkpoint (local directory or Hub id) to evaluate instead of a run")
parser.add_argument("--compare", nargs="+", metavar="RUN",
                    help="finished runs (e.g. SFT, DPO, SFT-DPO from one M1) to put side by side in one report")
parser.add_argument("--task", default=None, help="task of --model: arith, gsm8k, math, csqa, mbpp (default arith)")
parser.add_argument("--data", default=None, help="directory holding the task's split files (default data/TASK)")
parser.add_argument("--out", default=None,
                    help="with --model or --compare: where to write (default runs/eval-MODELNAME, runs/compare)")
parser.add_argument("--recompute", action="store_true", help="recompute metrics.json from the generations")
# ---- evaluation settings (default: the run's config.json, else train.py's defaults)
parser.add_argument("--n-test", type=int, default=None, help=f"test questions evaluated (default {E.n_test}; 0 = all)")
parser.add_argument("--n-ood", type=int, default=None, help=f"OOD questions evaluated (default {E.n_ood}; 0 = all)")
parser.add_argument("--eval-samples", type=int, default=None,
                    help=f"sampled completions per test question (default {E.samples})")
parser.add_argument("--eval-temperature", type=float, default=None,
                    help=f"temperature of those samples (default {E.temperature}; 0 = greedy)")
parser.add_argument("--top-p", type=float, default=None,
                    help=f"nucleus p of those samples, in (0, 1] (default {E.top_p})")
parser.add_argument("--top-k", type=int, default=None, help=f"top-k of those samples (default {E.top_k} = off)")
parser.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"longest completion, in tokens (default {E.max_new_tokens})")
parser.add_argument("--seed", type=int, default=None, help=f"sampling seed (default {E.seed})")
parser.add_argument("--semantic-questions", type=int, default=None,
                    help="questions the semantic diversity is averaged over (default 0 = all)")
parser.add_argument("--semantic-samples", type=int, default=None,
                    help=f"samples per question and group the semantic diversity uses (default {E.semantic_samples}; "
                         "0 = all)")
# ---- system
parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
parser.add_argument("--attn", choices=["ref", "sdpa", "triton"], default=None, help="attention backend")
args = parser.parse_args()

from minisirev import cli  # noqa: E402
from minisirev import distributed as dist  # noqa: E402
from minisirev.checkpoint import CheckpointError, ConfigError  # noqa: E402
from minisirev.report import format_table  # noqa: E402
from minisirev.run import Run, load_inputs, read_json, write_json  # noqa: E402
from minisirev.stages import Models, evaluate, write_summary  # noqa: E402
from minisirev.tasks import DataError, HarnessError  # noqa: E402
from minisirev.tokenizer import TokenizerError, load_tokenizer  # noqa: E402
from minisirev.training import step_methods  # noqa: E402

P = "eval.py"
if sum(x is not None for x in (args.run, args.model, args.compare)) != 1:
    cli.fail(P, "give exactly one of --run DIR, --model CHECKPOINT or --compare RUN [RUN ...]")
cli.check_flags(P, args, {"n_test": cli.INT_GE0, "n_ood": cli.INT_GE0, "eval_samples": cli.INT_GE1,
                          "eval_temperature": cli.NONNEG, "top_p": cli.PROB, "top_k": cli.INT_GE0,
                          "max_new_tokens": cli.INT_GE1, "semantic_questions": cli.INT_GE0,
                          "semantic_samples": cli.INT_GE0})

# -----------------------------------------------------------------------------
# --compare: one report over finished runs, nothing evaluated
if args.compare:
    from minisirev.report import render_compare

    runs = [Run(r) for r in args.compare]
    for r in runs:
        if not r.summary.exists():
            cli.fail(P, f"{r.root}: no summary.json (run train.py or eval.py --run on it first)")
    out = render_compare([read_json(r.summary) for r in runs], args.out or "runs/compare")
    print(f"wrote {out}")
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# the run to evaluate: a train.py run, or a pseudo-run holding one checkpoint as its t = 0 row
if args.run:
    run = Run(args.run)
    config = run.stored_config()
    if config is None:
        cli.fail(P, f"{run.root}: not a run directory (no config.json)")
    ts = ([] if config.get("skip_base") else [0]) + run.trained_iters()
    if 1 not in ts:
        cli.fail(P, f"{run.root}: no finished iteration (iter_1/model is missing)")
    src = {t: config["model"] if t == 0 else run.model(t) for t in ts}
else:
    run = Run(args.out or f"runs/eval-{args.model.rstrip('/').split('/')[-1]}")
    config = {**(run.stored_config() or {}), "task": args.task or "arith", "method": "none", "model": args.model}
    ts, src = [0], {0: args.model}


def pick(flag: str, key: str, default):
    v = getattr(args, flag)
    return v if v is not None else config.get(key, default)


settings = EvalSettings(n_test=pick("n_test", "n_test", E.n_test), n_ood=pick("n_ood", "n_ood", E.n_ood),
                        samples=pick("eval_samples", "eval_samples", E.samples),
                        temperature=pick("eval_temperature", "eval_temperature", E.temperature),
                        top_p=pick("top_p", "top_p", E.top_p), top_k=pick("top_k", "top_k", E.top_k),
                        max_new_tokens=pick("max_new_tokens", "max_new_tokens", E.max_new_tokens),
                        seed=pick("seed", "seed", E.seed),
                        semantic_questions=pick("semantic_questions", "semantic_questions", E.semantic_questions),
                        semantic_samples=pick("semantic_samples", "semantic_samples", E.semantic_samples))
cli.tune_allocator()  # glibc: reuse freed memory rather than fault in fresh pages (minisirev/cli.py)
device = dist.setup(P, cli.resolve_device(P, args.device))  # torchrun: each rank evaluates a share
attn = cli.default_attn(device, args.attn)
try:
    inputs = load_inputs(config["task"], args.data or config.get("data"), n_train=None, n_test=settings.n_test,
                         n_ood=settings.n_ood)
    tok = load_tokenizer(src[ts[-1]])
except (DataError, CheckpointError, ConfigError, TokenizerError, ValueError) as e:
    cli.fail(P, str(e))
run.root.mkdir(parents=True, exist_ok=True)
# the settings this evaluation used become the run's: a later train.py resume then sees them
config.update({"n_test": settings.n_test, "n_ood": settings.n_ood, "eval_samples": settings.samples,
               "eval_temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k,
               "max_new_tokens": settings.max_new_tokens, "seed": settings.seed,
               "semantic_questions": settings.semantic_questions, "semantic_samples": settings.semantic_samples})
dist.on_main(write_json, run.config, config)

# -----------------------------------------------------------------------------
# evaluate every model whose generations or metrics are missing or made with other settings
model = Models(lambda t: src[t], device=device, attn=attn)
try:
    for t in ts:
        step = "base" if t == 0 else "+".join(step_methods(config.get("method", "sft"), t,
                                                           config.get("schedule", "alternate")))
        if args.recompute:
            dist.on_main(run.metrics(t).unlink, missing_ok=True)  # rank 0's file; the others wait
        m = evaluate(run, t, lambda: model(t), tok, inputs, settings, step)
        print(f"iter {t} ({step}): pass@1 {100 * m['pass@1']:.1f}%")
except HarnessError as e:
    cli.fail(P, f"the verifier could not run: {e}", code=1)
except (DataError, CheckpointError, ConfigError, TokenizerError) as e:
    cli.fail(P, str(e))

summary = dist.on_main(write_summary, run, config)
print(format_table(summary))
print(f"wrote {run.summary}, {run.root / 'report.md'} and {run.root / 'plots'}/")
dist.shutdown()
