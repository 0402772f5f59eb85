"""Train the embedded default's base model M0 (data/base_model/): the `tiny` preset on a seeded arith-style corpus.

    python data/make_base_model.py       # the shipped recipe: 2000 steps of 8 x 256 tokens, 1 thread

M0 plays the paper's pretrained model: it knows the arithmetic and the language of the problems, but it was not
taught the task's answer format. The corpus is generated, never downloaded:
  - word problems of levels 1-5 from the task's generator (seeds other than the shipped splits', every question
    of train, test and ood excluded), each written as the task's prompt followed by a solution. 90% of the
    solutions are prose (`prose` below: one paragraph, no calculator annotations, closing "The answer is N."),
    10% are in the task's own format (`<<expr=value>>` annotations, a final "#### N"), as a web corpus holds a
    few GSM8K-style texts among many other write-ups;
  - arithmetic facts ("12+9+4=25", "35-6=29", "4*8=32") of the sizes the problems need.
M0's greedy answer is therefore a prose solution, which arith's strict "#### N" verifier rejects, while some of
its samples take the task's format: pass@1 is low and pass@k rises with k. M1 (SFT on the gold solutions) has
to make the task's format M0's first choice, which it can do in a few dozen steps because M0 already holds it.
The tokenizer (byte-level BPE, one token per digit) is trained on the first stage's corpus.

Training runs in stages; each stage draws a fresh corpus from its own seed, starts a fresh AdamW with warmup and
cosine decay, and continues from the previous stage's weights. The shipped model is RECIPE below (one stage of
2000 steps); more stages can be added with `--stage` (or `--init` a finished checkpoint), and running stages as
separate invocations gives the same weights as one process. Corpus, initialisation and batches are all seeded,
and training uses one thread by default (`--threads`), so a rerun on the same machine reproduces the weights.
Measured on the project's 2-core CPU while five other jobs shared its two cores (load average 7-12): 30 min 25 s;
a second run under the same load (36 min 13 s) gave a bit-identical model.safetensors and tokenizer.json. Not
measured on an idle machine; the previous recipe's 3500 steps of the same size took 9 min 12 s there, so expect
5-8 min.
"""

import argparse
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minisirev.checkpoint import load_model, save_model  # noqa: E402
from minisirev.config import ModelConfig  # noqa: E402
from minisirev.model import Transformer  # noqa: E402
from minisirev.tasks.arith import Arith, make_problems, make_splits  # noqa: E402
from minisirev.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

RECIPE = [(1234, 2000, 4e-3)]  # (seed, steps, peak lr) per stage

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=str(ROOT / "data" / "base_model"), help="output checkpoint directory")
parser.add_argument("--init", default=None, help="continue this checkpoint (and its tokenizer) instead of a fresh one")
parser.add_argument("--stage", action="append", default=None, metavar="SEED,STEPS,LR",
                    help="a training stage (repeatable); default: the shipped recipe " +
                         " ".join(f"{s},{n},{lr:g}" for s, n, lr in RECIPE))
parser.add_argument("--problems", type=int, default=12000, help="word problems in each stage's corpus (levels 1-5)")
parser.add_argument("--gold-fraction", type=float, default=0.1,
                    help="fraction of the corpus's word problems solved in the task's own format (the rest in prose)")
parser.add_argument("--facts", type=int, default=10000, help="arithmetic fact lines in each stage's corpus")
parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed training sequence")
parser.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the shipped model was trained with 1: results depend on the count)")
args = parser.parse_args()
torch.set_num_threads(args.threads)
stages = [(int(s), int(n), float(lr)) for s, n, lr in (x.split(",") for x in args.stage)] if args.stage else RECIPE

task = Arith()
split_questions = {ex["question"] for recs in make_splits().values() for ex in recs}


def prose(answer: str) -> str:
    """A gold solution rewritten the way the corpus mostly writes solutions: one paragraph, no calculator
    annotations, and a closing sentence instead of the "#### N" line.

        "Ann has 7+5=<<7+5=12>>12 pens.\\n...\\n#### 25"  ->  "Ann has 7+5=12 pens. ... The answer is 25."
    """
    *steps, final = answer.split("\n")
    return " ".join(re.sub(r"<<[^>]*>>", "", line) for line in steps) + f" The answer is {final.removeprefix('#### ')}."


def fact(rng: random.Random) -> str:
    """One arithmetic fact of the kinds the problems need: a sum of 2-4 terms, a difference, or a product of a
    small factor and a number up to 300."""
    op = rng.choice("+-*")
    if op == "+":
        terms = [rng.randint(0, 300) for _ in range(rng.choice([2, 3, 4]))]
        return f"{'+'.join(map(str, terms))}={sum(terms)}"
    if op == "-":
        a = rng.randint(0, 999)
        b = rng.randint(0, a)
        return f"{a}-{b}={a - b}"
    a, b = rng.randint(2, 12), rng.randint(0, 300)
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return f"{a}*{b}={a * b}"


def corpus(seed: int) -> list[str]:
    """Word problems (none of them a shipped question) with their solutions, and arithmetic facts, shuffled."""
    rng = random.Random(seed)
    problems = make_problems(seed, args.problems, levels=(1, 2, 3, 4, 5), exclude=split_questions, prefix="corpus")
    docs = [task.prompt(ex) + (ex["answer"] if rng.random() < args.gold_fraction else prose(ex["answer"]))
            for ex in problems]
    docs += [fact(rng) for _ in range(args.facts)]
    rng.shuffle(docs)
    return docs


def train_stage(model, tok, seed: int, steps: int, peak_lr: float):
    """Packed next-token training on the stage's corpus: AdamW, warmup, cosine decay to a tenth."""
    docs = corpus(seed)
    stream = []
    for d in docs:
        stream += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
    data = torch.tensor(stream)
    print(f"stage seed {seed}: {len(docs)} documents, {len(data):,} tokens, {steps} steps, lr {peak_lr:g}")
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        warm = max(1, steps // 20)
        lr = peak_lr * min((step + 1) / warm, 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,), generator=gen)
        x = torch.stack([data[s:s + args.seq_len] for s in starts])  # B, T
        y = torch.stack([data[s + 1:s + 1 + args.seq_len] for s in starts])  # B, T
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            dt = time.perf_counter() - t0
            print(f"step {step + 1}/{steps} | loss {loss.item():.4f} | lr {lr:.2e} | "
                  f"{args.batch_size * args.seq_len * (step + 1) / dt:.0f} tok/s | {dt:.0f} s")
    return model.eval()


t_start = time.perf_counter()
if args.init:
    tok, model = load_tokenizer(args.init), load_model(args.init, attn="sdpa")
else:
    tok = train_tokenizer(corpus(stages[0][0]), vocab_size=ModelConfig.from_preset("tiny").vocab_size)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size), attn="sdpa")
    model.init_weights(seed=stages[0][0])
print(f"model: {model.num_params() / 1e6:.2f}M parameters, tokenizer: {tok.vocab_size} tokens")
for seed, steps, lr in stages:
    train_stage(model, tok, seed, steps, lr)
save_model(model, args.out, tok)
print(f"saved {args.out} in {time.perf_counter() - t_start:.0f} s")
