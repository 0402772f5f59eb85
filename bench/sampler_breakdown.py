"""Where a generate call's time goes, piece by piece, beside the matmul floor that bench/sampler.py compares with.

    python bench/sampler_breakdown.py                              # the shipped base model, 32 x 8 rows, 64 tokens
    python bench/sampler_breakdown.py --config 10m --max-new-tokens 128 --sampled

One generate call runs with a timer around each piece of the model and the sampler (wrapped in place; the code
itself is unchanged). Times are exclusive: a piece's own time, less that of the pieces it calls, so the rows add up
to the call's wall time (the last row, "rest", is what no timer covers: Python between the pieces). torch.profiler
is not used: on this CPU it charged SiLU 1.5 ms a call inside generate, against 0.15 ms by a timer.
The timers cost about a microsecond a call; the wall time without them is printed too.

The floor, as in bench/sampler.py: every linear layer of the model at the decode's row count, once per generated
token, plus once over the prompts' tokens (the prefill), timed two ways (F.linear on each weight; oneDNN's packed
GEMM on the Decoder's concatenated weights, decode_cpu.Linear) and taken as the faster. "in the run" beside it is the
time the same linear layers took inside generate: the gap between the two is cache pollution by everything else.
The fixed cost of a step is the same generate over one prompt and one sample: what a step costs whatever the rows.
The prefill alone is timed the two ways generate can run it (decode_cpu.Decoder.prefill's flat batch, the model's
padded forward) beside its linear layers alone.
"""

import argparse
import datetime
import functools
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sampler_models import BASE_MODEL, CONFIGS, linears_fn  # noqa: E402

import minisirev.model as model_py  # noqa: E402
import minisirev.sampler as sampler_py  # noqa: E402
from kernels import decode_cpu  # noqa: E402
from minisirev import cli  # noqa: E402
from minisirev.checkpoint import load_model  # noqa: E402
from minisirev.config import ModelConfig  # noqa: E402
from minisirev.model import Transformer  # noqa: E402
from minisirev.provenance import device_name  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--config", default="base", choices=["base", "10m"],
                    help="base = data/base_model's weights; 10m = a random ~10M-parameter Llama")
parser.add_argument("--prompts", type=int, default=32, help="prompts (18-62 tokens, random ids, seed 0)")
parser.add_argument("--n", type=int, default=8, help="samples per prompt: rows = prompts x n")
parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per row (no EOS), >= 2")
parser.add_argument("--sampled", action="store_true", help="temperature 1, top-p 0.95 (default: greedy)")
parser.add_argument("--repeats", type=int, default=3, help="untimed generate calls to take the median wall of")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
args = parser.parse_args()
if min(args.prompts, args.n, args.repeats, args.threads) < 1 or args.max_new_tokens < 2:
    parser.error("--prompts, --n, --repeats and --threads must be at least 1, --max-new-tokens at least 2 "
                 "(the first token is drawn from the prefill, the decode steps come after)")
torch.set_num_threads(args.threads)
tuned = cli.tune_allocator()  # as train.py, sample.py and eval.py do

if CONFIGS[args.config] is None:
    model = load_model(BASE_MODEL)
else:
    model = Transformer(ModelConfig(**CONFIGS[args.config])).init_weights(seed=0)
model = model.eval()
model.attn = Transformer.default_attn(torch.device("cpu"))
g = torch.Generator().manual_seed(0)
lens = torch.randint(18, 63, (args.prompts,), generator=g).tolist()
prompts = [[1] + torch.randint(3, model.config.vocab_size, (n - 1,), generator=g).tolist() for n in lens]
kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0 if args.sampled else 0.0, top_p=0.95,
          stop_ids=(), max_batch_rows=args.prompts * args.n)


def wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- the untimed call, the floor, the fixed cost of a step ----------------------------------------------------
sampler_py.generate(model, prompts, **kw)  # warm-up
plain = statistics.median(wall(lambda: sampler_py.generate(model, prompts, **kw)) for _ in range(args.repeats))
floors = {}  # way -> seconds
for packed, way in ((False, "F.linear"), (True, "oneDNN packed")):
    step, prefill = linears_fn(model, args.prompts * args.n, packed=packed), linears_fn(model, sum(lens), packed=packed)
    step(), prefill()
    floors[way] = statistics.median(wall(lambda: [prefill()] + [step() for _ in range(args.max_new_tokens)])
                                    for _ in range(args.repeats))
floor = min(floors.values())
one = dict(kw, n=1, max_new_tokens=64, max_batch_rows=1)
sampler_py.generate(model, prompts[:1], **one)
fixed = statistics.median(wall(lambda: sampler_py.generate(model, prompts[:1], **one)) for _ in range(5)) / 64
step1 = linears_fn(model, 1)
fixed_floor = statistics.median(wall(lambda: [step1() for _ in range(64)]) for _ in range(5)) / 64

# the prefill alone, the two ways generate can run it, alternating: the Decoder's flat batch (what it runs here) and
# the model's padded forward (sampler.prefill_into, one chunk), beside the prefill's linear layers alone
prefills = {}  # way -> seconds
if decode_cpu.usable(model):
    decoder, into = decode_cpu.Decoder(model), sampler_py.prefill_into
    caches = [model_py.PrefixCache(model.config, len(prompts), max(lens), 1, 1) for _ in range(2)]
    ways = {"Decoder.prefill": lambda: decoder.prefill(caches[0], prompts, list(range(len(prompts)))),
            "model (padded)": lambda: into(model, caches[1], prompts, list(range(len(prompts)))),
            "linear layers alone": linears_fn(model, sum(lens), packed=True)}
    times = {way: [] for way in ways}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first round warms up
            for way, fn in ways.items():
                times[way].append(wall(fn))
    prefills = {way: statistics.median(t[1:]) for way, t in times.items()}

# ---- the timed call -------------------------------------------------------------------------------------------
own = Counter()  # piece -> exclusive seconds
calls = Counter()
stack: list[float] = []  # child seconds of each open timer


def timer(piece: str, fn):
    @functools.wraps(fn)
    def timed(*a, **k):
        stack.append(0.0)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t
            own[piece] += dt - stack.pop()
            calls[piece] += 1
            if stack:
                stack[-1] += dt
    return timed


class TimedLibrary:
    """decode_cpu's library with timers on the C calls the Decoder makes itself (the attention goes through
    decode_cpu._attend, timed as a piece of its own)."""

    def __init__(self, lib):
        self.lib = lib
        self.rms_norm = timer("RMSNorm", lib.rms_norm)
        self.silu_mul = timer("SiLU * up", lib.silu_mul)

    def __getattr__(self, name):
        return getattr(self.lib, name)


def timed_decoder_init(init):
    @functools.wraps(init)
    def wrapped(self, model):
        init(self, model)
        self.lib = TimedLibrary(self.lib)
    return wrapped


PIECES = [  # (owner, attribute, piece); the model's pieces run in the prefill (and in the decode without the C step)
    (torch.nn.Linear, "forward", "linear layers"),
    (decode_cpu.Linear, "__call__", "linear layers"),  # the Decoder's matmuls (the output projection among them)
    (decode_cpu.Decoder, "__call__", "decode step glue (Python, embedding)"),
    (decode_cpu, "_attend", "decode attention (C: RoPE, cache write, prompt + own keys)"),
    (decode_cpu.Decoder, "prefill", "prefill glue (Python, embedding)"),
    (decode_cpu, "_attend_prefill", "prefill attention (C: RoPE, cache write, causal)"),
    (model_py.Transformer, "forward", "output projection"),
    (model_py.Transformer, "hidden", "embedding"),
    (model_py.Transformer, "positions", "positions (RoPE factors, decode bias)"),
    (model_py.Block, "forward", "residual adds"),
    (model_py.RMSNorm, "forward", "RMSNorm"),
    (model_py.Attention, "forward", "attention glue (views, reshapes)"),
    (model_py, "apply_rope", "RoPE"),
    (model_py.KVCache, "write", "cache writes"),
    (model_py, "attention_shared", "decode attention (torch: prompt + own keys)"),
    (model_py.Attention, "_attend_full", "prefill attention (SDPA)"),
    (model_py.MLP, "forward", "SiLU * up"),
    (sampler_py.Sampling, "pick", "sampling (argmax / top-p, draw)"),
    (sampler_py, "prefill", "prefill glue"),
    (sampler_py, "prefill_into", "prefill glue"),
    *[(sampler_py.Slots, name, "scheduler (admit, run, step, harvest, compact)")
      for name in ("admit", "run", "step", "harvest", "compact", "sharing")],
    (sampler_py, "generate", "rest (Python between the pieces)"),
]
originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in PIECES]
originals.append((decode_cpu.Decoder, "__init__", decode_cpu.Decoder.__init__))
for owner, attr, piece in PIECES:
    setattr(owner, attr, timer(piece, getattr(owner, attr)))
decode_cpu.Decoder.__init__ = timed_decoder_init(decode_cpu.Decoder.__init__)
try:
    sampler_py.generate(model, prompts, **kw)  # warm-up of the wrapped code
    own.clear()
    calls.clear()
    total = wall(lambda: sampler_py.generate(model, prompts, **kw))
finally:
    for owner, attr, fn in originals:
        setattr(owner, attr, fn)

# ---- the table ------------------------------------------------------------------------------------------------
R, M = args.prompts * args.n, args.max_new_tokens
steps = M - 1  # the first token of every row is drawn from its prompt's logits
cpu = device_name(torch.device("cpu"))
print(f"# Where generate's time goes: `{args.config}` ({model.num_params() / 1e6:.2f}M parameters), "
      f"{args.prompts} prompts x {args.n} = {R} rows, {M} new tokens, {'sampled' if args.sampled else 'greedy'}\n")
print(f"`python bench/sampler_breakdown.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + f" on {cpu}, "
      f"{args.threads} threads{', glibc malloc tuned (minisirev.cli.tune_allocator)' if tuned else ''}, "
      f"torch {torch.__version__}, "
      f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
print(f"decode step: {decode_cpu.path_for(model)}")
print(f"generate: {plain:.3f} s without timers, {total:.3f} s with them ({R * M / plain:,.0f} tokens/s)")
print(f"floor (linear layers alone, same rows): {floor:.3f} s = {floor / plain:.0%} of generate "
      f"({', '.join(f'{way} {s:.3f} s' for way, s in floors.items())})\n")
print("| piece | calls | seconds | share | ms per decode step |")
print("|---|---|---|---|---|")
for piece, s in sorted(own.items(), key=lambda kv: -kv[1]):
    print(f"| {piece} | {calls[piece]:,} | {s:.3f} | {s / total:.0%} | {s / steps * 1e3:.2f} |")
print(f"| **total** | | {total:.3f} | 100% | {total / steps * 1e3:.2f} |")
print(f"\nlinear layers in the run {own['linear layers'] + own['output projection']:.3f} s "
      f"(the output projection row included) against {floor:.3f} s alone")
print(f"fixed cost of a step (1 prompt, 1 sample, 64 tokens): {fixed * 1e3:.2f} ms; its floor at 1 row "
      f"{fixed_floor * 1e3:.2f} ms; this run's floor step {(floor / M) * 1e3:.2f} ms")
if prefills:
    print(f"prefill of the {args.prompts} prompts ({sum(lens):,} tokens), median of {args.repeats} alternating rounds: "
          + ", ".join(f"{way} {t * 1e3:.1f} ms" for way, t in prefills.items()))
