"""Train the embedded default's base model M0 (data/base_model/): the `tiny` preset on a seeded arith-style corpus.

    python data/make_base_model.py       # the shipped recipe: 2000 + 300 steps of 8 x 256 tokens, 1 thread

M0 plays the paper's pretrained model: it knows the arithmetic and the language of the problems, but it was not
taught the task's answer format. The corpus is generated, never downloaded:
  - word problems of levels 1-5 from the task's generator (seeds other than the shipped splits', every question
    of train, test and ood excluded), each written as the task's prompt followed by a solution. Most solutions
    are prose (`prose` below: one paragraph, no calculator annotations, closing "The answer is N."); a fraction
    (10% in stage 1, 20% in stage 2) is in the task's own format (`<<expr=value>>` annotations, a final "#### N"),
    as a web corpus holds some GSM8K-style texts among other write-ups;
  - arithmetic facts ("12+9+4=25", "35-6=29", "4*8=32") of the sizes the problems need.
M0's greedy answer is therefore a prose solution, which arith's strict "#### N" verifier rejects, while some of
its samples take the task's format: pass@1 is low and pass@k rises with k. M1 (SFT on the gold solutions) has
to make the task's format M0's first choice, which it can do in a few dozen steps because M0 already holds it.
The second stage is short and anneals on a corpus richer in the task's format (as LLM pretraining ends on
higher-quality data): after stage 1 alone, M0 never wrote "####" in 2,560 samples at temperature 0.75, top-p
0.95 (the format was outside the nucleus), so its pass@k was 0 at every k. The tokenizer (byte-level BPE, one
token per digit) is trained on the first stage's corpus.

Training runs in stages; each stage draws a fresh corpus from its own seed, starts a fresh AdamW with warmup and
cosine decay, and continues from the previous stage's weights. The shipped model is RECIPE below, made as two
invocations (`--stage 1234,2000,4e-3,0.1`, then `--init` its output with `--stage 1235,300,1e-3,0.2`); one process
running RECIPE differs only by a float32 save/load of the weights and the tokenizer between the stages, which
round-trips exactly. Corpus, initialisation and batches are all seeded, and training uses one thread by default
(`--threads`), so a rerun on the same machine reproduces the weights bit for bit. With train.py's M1 (SFT on the
gold solutions of the first 256 training questions, 2 epochs, lr 1e-3) the shipped M0 scores 0% greedy pass@1 on
the 200 test questions and M1 43%.
Measured on the project's 2-core CPU while five other agents' jobs shared its two cores (load average 7-14), with
the stages run as two invocations: stage 1 took 30 min 25 s (a second run: 36 min 13 s), stage 2 6 min 55 s (a
second run: 6 min 50 s), and both reruns gave a bit-identical model.safetensors and tokenizer.json. Not measured
on an idle machine; the previous recipe's 3500 steps of the same size took 9 min 12 s there, so expect 6-9 min.
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

# (seed, steps, peak lr, fraction of the problems in the task's format) per stage
RECIPE = [(1234, 2000, 4e-3, 0.1), (1235, 300, 1e-3, 0.2)]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=str(ROOT / "data" / "base_model"), help="output checkpoint directory")
parser.add_argument("--init", default=None, help="continue this checkpoint (and its tokenizer) instead of a fresh one")
parser.add_argument("--stage", action="append", default=None, metavar="SEED,STEPS,LR,GOLD",
                    help="a training stage (repeatable); default: the shipped recipe " +
                         " ".join(f"{s},{n},{lr:g},{g:g}" for s, n, lr, g in RECIPE))
parser.add_argument("--problems", type=int, default=12000, help="word problems in each stage's corpus (levels 1-5)")
parser.add_argument("--facts", type=int, default=10000, help="arithmetic fact lines in each stage's corpus")
parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
parser.add_argument("--seq-len", type=int, default=256, help="tokens per packed training sequence")
parser.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (the shipped model was trained with 1: results depend on the count)")
args = parser.parse_args()
torch.set_num_threads(args.threads)
stages = RECIPE
if args.stage:
    try:
        stages = [(int(s), int(n), float(lr), float(g)) for s, n, lr, g in (x.split(",") for x in args.stage)]
    except ValueError:
        parser.error("--stage takes SEED,STEPS,LR,GOLD, e.g. --stage 1234,2000,4e-3,0.1")

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


def corpus(seed: int, gold_fraction: float) -> list[str]:
    """Word problems (none of them a shipped question) with their solutions, `gold_fraction` of them in the task's
    format and the rest in prose, and arithmetic facts, shuffled."""
    rng = random.Random(seed)
    problems = make_problems(seed, args.problems, levels=(1, 2, 3, 4, 5), exclude=split_questions, prefix="corpus")
    docs = [task.prompt(ex) + (ex["answer"] if rng.random() < gold_fraction else prose(ex["answer"]))
            for ex in problems]
    docs += [fact(rng) for _ in range(args.facts)]
    rng.shuffle(docs)
    return docs


def train_stage(model, tok, seed: int, steps: int, peak_lr: float, gold_fraction: float):
    """Packed next-token training on the stage's corpus: AdamW, warmup, cosine decay to a tenth."""
    docs = corpus(seed, gold_fraction)
    stream = []
    for d in docs:
        stream += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
    data = torch.tensor(stream)
    print(f"stage seed {seed}: {len(docs)} documents ({gold_fraction:.0%} of the problems in the task's format), "
          f"{len(data):,} tokens, {steps} steps, lr {peak_lr:g}")
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
    tok = train_tokenizer(corpus(stages[0][0], stages[0][3]), vocab_size=ModelConfig.from_preset("tiny").vocab_size)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size), attn="sdpa")
    model.init_weights(seed=stages[0][0])
print(f"model: {model.num_params() / 1e6:.2f}M parameters, tokenizer: {tok.vocab_size} tokens")
for seed, steps, lr, gold in stages:
    train_stage(model, tok, seed, steps, lr, gold)
save_model(model, args.out, tok)
print(f"saved {args.out} in {time.perf_counter() - t_start:.0f} s")
