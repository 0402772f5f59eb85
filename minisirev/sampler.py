"""Batched KV-cache sampler: N completions per prompt, ragged prompts, continuous slot refill.

The pieces are small pure functions (gpt-fast `generate.py`, nanochat `engine.py`) under a small slot scheduler
(nano-vllm's split of Sequence and Scheduler):
    nucleus           temperature, then top-k, then top-p: the kept tokens and their probabilities, in order
    logits_to_probs   the same as a dense [B, V] distribution
    sample            inverse-CDF draw from probs given uniforms (or a torch.Generator)
    stream_key, uniform_from_stream   the uniforms: a counter-based hash of (seed, key, sample index, step)
    prefill           right-padded ragged prompts -> their KV cache rows and next-token logits
    prefill_into      prefill, its keys copied into prompt slots of the PrefixCache
    decode_step       one token per slot against the PrefixCache (a prompt's keys once, each row's own keys)
    plain_decode_step decode_step, or on a CPU its fused twin kernels/decode_cpu.Decoder
    Slots             the scheduler's state: admit (refill free slots), run (decode), harvest (finished rows),
                      compact (the tail)
    generate          validates, sizes the cache, and runs admit / run / harvest until the queue is empty

How generate works. One PrefixCache (model.py) is allocated per call: P prompt slots of the longest prompt's length
and R row slots of max_new_tokens keys each, [L, P or R, KVH, length, D] in the model's dtype (P = min(prompts, R):
R rows never hold more than R distinct prompts). The work is the queue of (prompt, sample) pairs, prompt-major. When
slots are free, the next pairs take them: their new prompts are prefilled once (batched and right-padded, in chunks
of similar length) into free prompt slots, so a prompt is prefilled once however many of its n samples there are and
whenever they are admitted, and its keys are stored once. All rows then decode together, one token per step, each at
its own position: a row attends over its prompt slot's keys and its own (attention_shared, one softmax over both),
and the rows sharing a prompt read its keys once, as one block of queries (with n = 8..64 samples of an 80-token
prompt, a step reads the prompt's keys once instead of n times; explicit matmuls rather than a masked SDPA call,
which on a CPU was 1.4-3x slower at these sizes). On a CPU in fp32 with the sdpa backend the step is
kernels/decode_cpu's Decoder instead (plain_decode_step): the same layers with C between torch's matmuls, four calls
per layer instead of about 150 tensor operations, and the top-p draw in C (Sampling.draw_top_p); its prefill
(Decoder.prefill) runs a chunk's prompt tokens as one flat batch without padding, through the same packed matmuls
and a causal C attention, writing the prompt slots directly (on the 2-core CPU 3.3-4x faster than the model's
padded prefill for 32 prompts of 16-64 tokens on the 10M model of bench/). Every `sync_every`
steps the host reads the finished flags (the one host synchronisation; stopping needs it), harvests finished rows,
frees the prompt slot of a prompt whose last sample finished, and refills free row slots. A row that finishes
between two checks stays frozen (its position and token do not advance) until harvested, so at most sync_every - 1
steps of its slot are wasted; a larger sync_every wastes more slot-steps, a smaller one stalls the device more
often. Rows that can only end by length are known to the host, so no step is wasted at the end. When the queue is
empty and a quarter of the slots have idled (COMPACT_IDLE; waiting for half took 15% longer on a 2048-row evaluation
chunk), the busy rows move down to the first slots and the live prompts to the first prompt slots (copies of their
keys), so the tail of a run does not decode idle slots or read finished prompts.

Randomness. The uniform that draws token t of sample j of a prompt is a hash of (seed, key, j, t), key being the
prompt's index (or the caller's `keys`, e.g. a question id). A draw therefore depends on nothing but those four
numbers and the row's own probabilities: the samples of a prompt do not depend on which prompts share its batch,
on max_batch_rows, on slot refill order or on n (sample j of n=50 is sample j of n=1), and sample.py's resumed runs
reproduce an uninterrupted run; a distributed run that gives each worker some (key, sample) pairs reproduces a
single-process one. The probabilities themselves can move at rounding level with the batch shape (a matmul over B
rows may block differently), which changes a draw only when its uniform falls within rounding of a CDF boundary.
Same seed -> same samples on the same device; across devices, and between the C decode step and the model's own
layers (no C compiler, or MINISIREV_CPU_KERNELS=0), up to those rounding flips.

The decode step is torch.compiled by default on CUDA (compile=None): static shapes (every slot every step, every
prompt slot with min(n, R) member rows, the rows' own keys read rounded up to a multiple of 256, so at most
max_new_tokens / 256 graphs) in "reduce-overhead" mode, which captures it in a
CUDA graph (the cache is marked as a static address, as transformers' StaticCache does). If compiling fails, generate
warns and decodes with the plain step. The plain step is the default elsewhere: on the 2-core CPU the compile took
minutes (more than a default run's sampling) and static shapes make every step decode every slot over a rounded-up
cache; compile=True still asks for it (the tests check the two give the same tokens). Sampling stays eager in both.

Returned token ids exclude the prompt and the stop token (EOS or any stop id) that ended a row; a row without a stop
token has exactly max_new_tokens ids. Log-probs (return_logprobs=True) are those of the returned tokens under the
model's raw distribution (temperature 1, no top-k/top-p), log_softmax(logits)[token]: what a full re-score of the
sequence gives, and what SFT/DPO losses use.

Shapes: R slots (rows), V vocab, W kept-token width, A pairs admitted at once, P prompts in a prefill chunk, T their
padded length, plus model.py's alphabet (L layers, KVH kv heads, D head dim).
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minisirev.model import KVCache, PrefixCache, Sharing, Transformer

M32 = 0xFFFFFFFF
PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward (the Decoder's: real ones): bounds activations
PREFILL_PADDING = 1.25  # ... and at most this many times its prompts' own tokens (prefill of 32 x 18-62: 1.7x faster)
CPU_MEMORY_BUDGET = 4 * 2**30  # default bytes for cache + per-row work on a CPU (on CUDA: 80% of free memory)
COMPACT_IDLE = 1 / 4  # with the queue empty, the busy rows move down once this fraction of the decoded slots idles
COMPACT_CHUNK_BYTES = 16 * 2**20  # ... moved this many bytes of keys (and as many of values) at a time
SORT_KEYS_FROM = 256  # sort_desc sorts int64 keys from this many columns on
NUCLEUS_PREFILTER = 1 / 64  # top-p first looks among tokens of probability >= this (at most 64 of them)
NUCLEUS_WIDE = 64  # ... then, in rows where those fall short of p, among the row's 64 most probable tokens


# ---- logits -> kept tokens -> token ---------------------------------------------------------------------------

def _compact(values: torch.Tensor, keep: torch.Tensor, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, V], keep [B, V] bool -> (values [B, W], ids [B, W]): each row's kept entries in id order, padded
    with `fill` and id V, W the largest kept count. On CUDA, W = V and nothing moves (no host read of W)."""
    B, V = values.shape
    ids = torch.arange(V, device=values.device).expand(B, V)
    if values.device.type == "cuda":
        return values.masked_fill(~keep, fill), ids.masked_fill(~keep, V)
    W = int(keep.sum(-1).max())
    col = torch.where(keep, keep.cumsum(-1) - 1, W)  # B, V: a kept entry's column; the rest go to column W
    out_v = values.new_full((B, W + 1), fill).scatter_(1, col, values)
    out_i = ids.new_full((B, W + 1), V).scatter_(1, col, ids)
    return out_v[:, :W], out_i[:, :W]


def sort_desc(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [B, W] fp32 >= 0 -> (values, columns) in descending order, the lower column first among equal values:
    torch.sort(stable=True, descending=True)'s result, from one sort of distinct int64 keys instead (on a CPU 25%
    faster at W = 400; below SORT_KEYS_FROM columns the plain stable sort is cheaper than building the keys). A
    non-negative float's bits, read as an int, order like the float, so the key bits * 2^32 + (W - 1 - column)
    orders by value, then by column, with no two keys equal."""
    W = probs.shape[-1]
    if W < SORT_KEYS_FROM:
        return torch.sort(probs, dim=-1, descending=True, stable=True)
    col = torch.arange(W - 1, -1, -1, device=probs.device)
    keys = torch.sort((probs.view(torch.int32).long() << 32) | col, dim=-1, descending=True).values
    return (keys >> 32).int().view(torch.float32), (W - 1) - (keys & M32)


def _rank_and_cut(probs: torch.Tensor, ids: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """probs, ids [B, W] (ids ascending in each row) -> the same in descending probability (stable: the lower id
    first among equal ones), the probability of every token past the top-p cut set to 0."""
    probs, order = sort_desc(probs)  # B, W
    mass_before = F.pad(probs.double().cumsum(-1)[:, :-1], (1, 0))  # B, W: exclusive cumulative sum
    return probs.masked_fill(mass_before >= top_p, 0.0), ids.gather(-1, order)


def nucleus(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, *,
            prefilter: float = NUCLEUS_PREFILTER) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (probs [B, W], ids [B, W]): the tokens kept by temperature, then top-k, then top-p (the
    order of transformers' logits warpers) with their probabilities, in nucleus order (descending probability, the
    lower id first among equal ones; id order when top-p is off), padded with probability 0 and id V. W <= V.

    x = logits / temperature, probs = softmax(x) (over the top-k set when top-k is on).
    top_k > 0: keep tokens whose logit is >= the k-th largest. Tokens tied with the k-th value are all kept
        (transformers' TopKLogitsWarper rule), so ties never make the kept set depend on torch.topk's order.
    top_p < 1: keep the smallest set of most probable tokens whose total probability reaches p: token i in nucleus
        order is kept iff the mass strictly before it (an fp64 sum) is < p, so the token that crosses p is kept and
        at least one token always is. top_p = 1 keeps every token.

    The top-p prefilter (without top-k, on a CPU): only the tokens of probability >= prefilter are ranked. They are
    all the tokens above a value, so their order is the start of the full order, and their fp64 sums are exact
    (fp32 values >= 2^-29 summed below 2). When their total reaches p, the next token has mass before it >= p and
    is dropped, so the kept set and probabilities are exactly those of ranking the whole vocabulary (prefilter=0);
    a row whose candidates fall short gets a second look at its NUCLEUS_WIDE most probable tokens (every token down
    to the NUCLEUS_WIDE-th largest value and no lower than 2^-29, so the same argument holds), when that many
    tokens of its largest probability could reach p; rows still short are ranked whole. This replaces a sort of V
    by one of about 1 / prefilter, or NUCLEUS_WIDE, for every row whose nucleus is that small."""
    x = logits.float() / temperature
    B, V = x.shape
    if 0 < top_k < V:
        keep = x >= torch.topk(x, top_k, dim=-1).values[:, -1:]  # B, V
        xs, ids = _compact(x, keep, float("-inf"))
        probs = torch.softmax(xs, dim=-1)
        return _rank_and_cut(probs, ids, top_p) if top_p < 1 else (probs, ids)
    probs = torch.softmax(x, dim=-1)  # B, V
    ids = torch.arange(V, device=x.device).expand(B, V)
    if top_p >= 1:
        return probs, ids
    if prefilter <= 0 or x.device.type == "cuda":
        return _rank_and_cut(probs, ids, top_p)
    keep = probs >= prefilter
    mass = (probs * keep).double().sum(-1)  # B: the candidates' mass (an exact sum, see above)
    wide = ((mass < top_p) & (probs.max(-1).values * NUCLEUS_WIDE >= top_p)).nonzero()[:, 0]
    if len(wide):  # rows the prefilter missed whose NUCLEUS_WIDE most probable tokens may reach p: look at those
        pw = probs[wide]
        least = torch.topk(pw, min(NUCLEUS_WIDE, V), dim=-1).values[:, -1:].clamp(min=2.0**-29)  # W', 1
        keep[wide] = kw = pw >= least  # all tokens down to that value, ties included: the start of the order
        mass[wide] = (pw * kw).double().sum(-1)
    covered = mass >= top_p  # B: the candidates reach p
    if bool(covered.all()):
        return _rank_and_cut(*_compact(probs, keep, 0.0), top_p)
    if not bool(covered.any()):
        return _rank_and_cut(probs, ids, top_p)
    out_p, out_i = probs.new_zeros(B, V), ids.new_full((B, V), V)
    rows, rest = covered.nonzero()[:, 0], (~covered).nonzero()[:, 0]
    p_r, i_r = _rank_and_cut(*_compact(probs[rows], keep[rows], 0.0), top_p)
    out_p[rows, :p_r.shape[1]], out_i[rows, :p_r.shape[1]] = p_r, i_r
    out_p[rest], out_i[rest] = _rank_and_cut(probs[rest], ids[rest], top_p)
    return out_p, out_i


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                    ) -> torch.Tensor:
    """logits [B, V] -> probs [B, V] in fp32: nucleus's kept tokens as a dense, renormalised distribution.
    temperature 0: one-hot on the argmax (greedy; the first index among equal maxima)."""
    V = logits.shape[-1]
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), V).float()
    probs, ids = nucleus(logits, temperature, top_k, top_p)
    dense = probs.new_zeros(probs.shape[0], V + 1).scatter_(1, ids, probs)[:, :V]  # column V: the padding
    return dense / dense.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, *, u: torch.Tensor | None = None
           ) -> torch.Tensor:
    """probs [B, W] (need not sum to 1) -> column indices [B]: the first column whose cumulative probability
    exceeds u, u ~ U[0, 1) per row (inverse-CDF sampling; the CDF in fp64, normalised so its last entry is exactly
    1, hence a zero-probability column is never drawn). u comes from `generator` (torch.rand) unless given; generate
    passes uniform_from_stream's values so that draws are independent of batch composition. For dense probs the
    column is the token id; for nucleus's output it indexes its ids."""
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)  # B, W
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.double()[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


@dataclass
class Sampling:
    """The settings of one generate call that every step applies."""
    temperature: float
    top_k: int
    top_p: float
    max_new_tokens: int
    stop_ids: torch.Tensor  # [n_stop] long, on the model's device
    return_logprobs: bool
    # top-p without top-k in one call (logits, temperature, top_p, u, logprobs) -> (token, log-prob or None), the
    # same draws as nucleus + sample: kernels/decode_cpu.sample_top_p where generate decodes with its Decoder
    draw_top_p: Callable | None = None

    def uniforms(self, streams: torch.Tensor, steps: torch.Tensor) -> torch.Tensor | None:
        """The uniforms rows drawing from `streams` [B] at `steps` [B] or [K, B] use (None when greedy)."""
        return None if self.temperature == 0 else uniform_from_stream(streams, steps)

    def pick(self, logits: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [B, V], the rows' uniforms u [B] (uniforms()) -> (token [B], raw log-prob [B] or None)."""
        if self.temperature == 0:
            tok = logits.argmax(-1)
        elif self.draw_top_p is not None and self.top_k == 0 and self.top_p < 1:
            return self.draw_top_p(logits, self.temperature, self.top_p, u, self.return_logprobs)
        else:
            if 0 < self.top_k < logits.shape[-1] or self.top_p < 1:
                probs, ids = nucleus(logits, self.temperature, self.top_k, self.top_p)  # B, W
                tok = ids.gather(-1, sample(probs, u=u)[:, None])[:, 0]
            else:
                tok = sample(torch.softmax(logits.float() / self.temperature, dim=-1), u=u)
        lp = None
        if self.return_logprobs:  # log_softmax(logits)[tok] without a [B, V] log_softmax
            lf = logits.float()
            lp = lf.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(lf, dim=-1)
        return tok, lp

    def finished(self, tok: torch.Tensor, n_gen: torch.Tensor) -> torch.Tensor:
        """[B] bool: the row just emitted a stop id, or has its max_new_tokens tokens (n_gen counts tok)."""
        return torch.isin(tok, self.stop_ids) | (n_gen >= self.max_new_tokens)


# ---- counter-based uniforms -----------------------------------------------------------------------------------

def _mul32(x, c: int):
    """(x * c) mod 2^32 for 0 <= x < 2^32, without int64 overflow: c split into 16-bit halves.
    Works on Python ints and int64 tensors alike."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _mix32(x):
    """A 32-bit integer hash, 'lowbias32' (C. Wellons, hash-prospector): xorshift-multiply, two rounds."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, key: int, sample_idx: int) -> int:
    """The 32-bit state of one (prompt, sample) stream: a hash chain over seed (64 bits), key (64 bits), index."""
    h = _mix32((seed >> 32) & M32)
    h = _mix32(h ^ (seed & M32))
    h = _mix32(h ^ ((key >> 32) & M32))
    h = _mix32(h ^ (key & M32))
    return _mix32(h ^ (sample_idx & M32))


def uniform_from_stream(stream: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """stream [B] (stream_key values, int64), step [B] int64 -> u [B] in [0, 1), fp64 with 53 random bits: the
    uniform that draws token `step` of each row's stream."""
    x = _mix32(stream ^ _mix32(step & M32))
    hi, lo = _mix32(x ^ 0x68E31DA4), _mix32(x ^ 0xB5297A4D)
    return ((hi << 21) | (lo >> 11)).double() * 2.0**-53


# ---- prefill and decode ---------------------------------------------------------------------------------------

def prefill(model: Transformer, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    """Ragged prompts -> (a cache with row p holding prompt p at positions 0 .. len_p - 1, logits [P, V] of the
    token after each prompt). Prompts are right-padded and run from position 0 (plain causal attention, slice
    writes); each row's logits are read at its own last token, and the pad keys beyond len_p are never seen (the
    decode bias hides a prompt slot's keys past its prompt). Only the P last hidden states go through the output
    projection."""
    device = model.embed_tokens.weight.device
    P, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(P, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    cache = model.new_cache(P, T)
    h = model.hidden(tokens.to(device), cache=cache)  # P, T, C
    last = h[torch.arange(P, device=device), lens - 1]  # P, C
    return cache, F.linear(last, model.output_weight)  # P, V


def prefill_into(model: Transformer, cache: PrefixCache, prompts: list[list[int]], slots: list[int]
                 ) -> torch.Tensor:
    """prefill, its keys copied to prompt slots `slots` of the PrefixCache -> the logits [P, V] after each prompt.
    (kernels/decode_cpu's Decoder.prefill does the same in one pass, writing the slots directly.)"""
    side, logits = prefill(model, prompts)
    idx, T = torch.tensor(slots, device=logits.device), side.k.shape[3]
    cache.prompts.k[:, idx, :, :T] = side.k  # L, P, KVH, T, D: each prompt's keys once
    cache.prompts.v[:, idx, :, :T] = side.v
    return logits


def decode_step(model: Transformer, cache: PrefixCache, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int,
                sharing: Sharing) -> torch.Tensor:
    """tokens [B] at positions pos [B] -> next-token logits [B, V]; writes their keys into cache rows 0 .. B-1,
    which attend over their prompt slots' keys (sharing) and their own keys 0 .. kv_len - 1."""
    return model(tokens[:, None], pos=pos, cache=cache, kv_len=kv_len, sharing=sharing)[:, 0]


def plain_decode_step(model: Transformer) -> Callable:
    """The uncompiled decode step for `model`: on a CPU in fp32 with the sdpa backend kernels/decode_cpu's Decoder
    (decode_step's logits up to float rounding: torch's matmuls with four C calls per layer between them, built
    once per generate call), elsewhere decode_step itself (and with attn "ref", the teaching path)."""
    from kernels import decode_cpu
    return decode_cpu.Decoder(model) if decode_cpu.usable(model) else decode_step


_COMPILED: dict[str, Callable] = {}  # one compiled decode_step per mode, so its graphs outlive a generate call


def compiled_decode_step(device: torch.device) -> Callable:
    """decode_step under torch.compile with static shapes; on CUDA in "reduce-overhead" mode (CUDA graphs)."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        _COMPILED[mode] = torch.compile(decode_step, dynamic=False, mode=None if mode == "default" else mode)
    return _COMPILED[mode]


def kv_bytes(model: Transformer, positions: int) -> int:
    """Bytes of K and V for `positions` cache positions of one sequence, all layers."""
    cfg = model.config
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size() * positions


def row_bytes(model: Transformer, max_new_tokens: int) -> int:
    """Estimated memory per slot: its own K and V rows plus the per-step work on its logits (fp32 logits and
    probs, fp64 CDF, int64 sort indices: ~32 bytes per vocabulary entry) and its output buffers."""
    return kv_bytes(model, max_new_tokens) + 32 * model.config.vocab_size + 12 * (max_new_tokens + 1)


def prefill_bytes(model: Transformer) -> int:
    """Estimated peak memory of one prefill chunk of PREFILL_TOKENS tokens: its side cache plus activations
    (a few [tokens, max(C, F)] tensors alive at once)."""
    cfg = model.config
    itemsize = model.embed_tokens.weight.element_size()
    return kv_bytes(model, PREFILL_TOKENS) + PREFILL_TOKENS * 6 * max(cfg.dim, cfg.ffn_dim) * itemsize


def slot_count(budget: int, per_row: int, per_prompt: int, n_prompts: int) -> int:
    """The most slots r with r * per_row + min(r, n_prompts) * per_prompt <= budget (r rows hold at most r
    distinct prompts)."""
    r = budget // (per_row + per_prompt)
    if r < n_prompts:
        return max(r, 0)
    return max((budget - n_prompts * per_prompt) // per_row, 0)


def default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    return CPU_MEMORY_BUDGET


# ---- the slot scheduler ---------------------------------------------------------------------------------------

@dataclass
class Slots:
    """The scheduler: R decode slots and P prompt slots over one PrefixCache, the queue of (prompt, sample) pairs
    waiting for a slot, and the prompts held in a prompt slot. admit fills free slots, run decodes every slot a
    few steps, harvest takes out the finished rows, compact moves busy rows (and live prompts) to the first slots.

    Device state, one entry per slot: cur (the token to feed next), pos (its position), n_gen (tokens generated so
    far, cur included), done (finished, or idle), stream (the occupant's stream_key), prompt / prompt_len (its
    prompt slot and that prompt's length; 0 and 0 when idle), out_tok / out_lp (its tokens and raw log-probs, with
    a trash column max_new_tokens where frozen rows write). Host state, read from the device only at a check:
    occupant (the (prompt, sample) pair in each slot, None when free), host_ngen (n_gen as of the last check),
    slot_of (prompt -> its prompt slot), first (prompt -> the logits after it, until all its samples have drawn
    their first token) and unfinished (prompt -> samples not yet harvested: the prompt slot is freed at 0)."""
    model: Transformer
    prompts: list[list[int]]
    keys: list[int]
    n: int
    seed: int
    sampling: Sampling
    rows: int
    prompt_slots: int
    rows_len: int  # own keys per row: max_new_tokens, or rounded up to 256 when static
    step_fn: Callable = decode_step
    static: bool = False  # compiled step: every slot every step, fixed Sharing shapes, kv_len rounded up to 256

    def __post_init__(self):
        R, M, dev = self.rows, self.sampling.max_new_tokens, self.model.embed_tokens.weight.device
        self.device = dev
        w = self.model.embed_tokens.weight
        self.cache = PrefixCache(self.model.config, self.prompt_slots, max(map(len, self.prompts)), R, self.rows_len,
                                 device=dev, dtype=w.dtype, zeroed=getattr(self.step_fn, "needs_zeroed_cache", True))
        zeros = [torch.zeros(R, dtype=torch.long, device=dev) for _ in range(6)]
        self.cur, self.pos, self.n_gen, self.stream, self.prompt, self.prompt_len = zeros
        self.done = torch.ones(R, dtype=torch.bool, device=dev)
        self.out_tok = torch.zeros(R, M + 1, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(R, M + 1, device=dev) if self.sampling.return_logprobs else None
        self.occupant: list[tuple[int, int] | None] = [None] * R
        self.host_ngen = [0] * R
        self.queue = [(p, j) for p in range(len(self.prompts)) for j in range(self.n)][::-1]  # pop() = next pair
        self.to_admit = [self.n] * len(self.prompts)  # samples of each prompt not yet in a slot
        self.unfinished = [self.n] * len(self.prompts)
        self.slot_of: dict[int, int] = {}
        self.free_prompt_slots = list(range(self.prompt_slots))  # a heap: heappop gives the lowest free slot
        self.first: dict[int, torch.Tensor] = {}

    @property
    def busy(self) -> list[int]:
        return [s for s in range(self.rows) if self.occupant[s] is not None]

    def admit(self):
        """Give free slots to the next pairs of the queue: prefill their new prompts (chunks of similar length)
        into free prompt slots, draw each slot's first token from its prompt's logits."""
        batch = [(*self.queue.pop(), s) for s in range(self.rows) if self.occupant[s] is None and self.queue]
        if not batch:
            return
        need = sorted({p for p, _, _ in batch if p not in self.slot_of}, key=lambda p: len(self.prompts[p]))
        padded = getattr(self.step_fn, "prefill", None) is None  # the Decoder's prefill runs unpadded tokens
        while need:  # need is sorted by length, so a chunk holds prompts of similar length
            take = [need.pop(0)]
            real = len(self.prompts[take[0]])  # the chunk's prompt tokens
            while need:
                nxt = len(self.prompts[need[0]])  # the chunk's longest prompt if it joins: padded tokens (k + 1) nxt
                tokens = (len(take) + 1) * nxt if padded else real + nxt
                if tokens > PREFILL_TOKENS or (padded and tokens > PREFILL_PADDING * (real + nxt)):
                    break
                take.append(need.pop(0))
                real += nxt
            slots = [heapq.heappop(self.free_prompt_slots) for _ in take]
            chunk = [self.prompts[p] for p in take]
            logits = prefill_into(self.model, self.cache, chunk, slots) if padded else \
                self.step_fn.prefill(self.cache, chunk, slots)
            for p, slot, row in zip(take, slots, logits):
                self.slot_of[p], self.first[p] = slot, row
        dst = torch.tensor([s for _, _, s in batch], device=self.device)
        logits = torch.stack([self.first[p] for p, _, _ in batch])  # A, V
        streams = torch.tensor([stream_key(self.seed, self.keys[p], j) for p, j, _ in batch], device=self.device)
        ones = torch.ones(len(batch), dtype=torch.long, device=self.device)
        tok, lp = self.sampling.pick(logits, self.sampling.uniforms(streams, ones - 1))
        lens = torch.tensor([len(self.prompts[p]) for p, _, _ in batch], device=self.device)
        self.cur[dst], self.n_gen[dst], self.stream[dst], self.out_tok[dst, 0] = tok, 1, streams, tok
        self.pos[dst], self.prompt_len[dst] = lens, lens
        self.prompt[dst] = torch.tensor([self.slot_of[p] for p, _, _ in batch], device=self.device)
        self.done[dst] = self.sampling.finished(tok, ones)
        if lp is not None:
            self.out_lp[dst, 0] = lp
        for p, j, s in batch:
            self.occupant[s], self.host_ngen[s] = (p, j), 1
            self.to_admit[p] -= 1
            if self.to_admit[p] == 0:  # every sample has drawn its first token
                del self.first[p]

    def sharing(self, B: int) -> Sharing:
        """Which of slots 0 .. B-1 share which prompt slot, for the steps until the next check. Static: the
        shapes of every call's Sharing are the same ([prompt_slots, min(n, rows)] members, all prompt keys)."""
        groups: dict[int, list[int]] = {}
        for s in range(B):
            if self.occupant[s] is not None:
                groups.setdefault(self.slot_of[self.occupant[s][0]], []).append(s)
        P = self.prompt_slots if self.static else max(groups) + 1
        m = min(self.n, self.rows) if self.static else max(map(len, groups.values()))
        members = [[0] * m for _ in range(P)]
        member = [0] * B
        for slot, rows in groups.items():
            members[slot] = rows + [rows[0]] * (m - len(rows))
            for i, s in enumerate(rows):
                member[s] = i
        keys = self.cache.prompts.max_len if self.static else max(
            len(self.prompts[self.occupant[s][0]]) for rows in groups.values() for s in rows)
        return Sharing(self.prompt[:B], self.prompt_len[:B], torch.tensor(members, device=self.device),
                       torch.tensor(member, device=self.device), keys)

    def step(self, B: int, kv_len: int, sharing: Sharing, u: torch.Tensor | None):
        """Decode one token in slots 0 .. B-1, reading their own keys 0 .. kv_len-1, drawing with uniforms u [B].
        Frozen (done) rows keep their position and token and write their draw to the trash column."""
        logits = self.step_fn(self.model, self.cache, self.cur[:B], self.pos[:B], kv_len, sharing)  # B, V
        n_gen = self.n_gen[:B]
        tok, lp = self.sampling.pick(logits, u)
        active = ~self.done[:B]
        col = torch.where(active, n_gen, self.sampling.max_new_tokens)[:, None]  # B, 1
        self.out_tok[:B].scatter_(1, col, tok[:, None])
        if lp is not None:
            self.out_lp[:B].scatter_(1, col, lp[:, None])
        n_gen += active
        self.pos[:B] += active
        self.cur[:B] = torch.where(active, tok, self.cur[:B])
        self.done[:B] |= active & self.sampling.finished(tok, n_gen)

    def run(self, max_steps: int):
        """Up to max_steps decode steps over the busy slots, without reading the device. kv_len bounds the own
        keys every busy row reads: row s feeds its token at index n_gen - 1 <= min(host_ngen + k, max_new) - 1 at
        step k of this window. The window's uniforms are hashed at once: a row still active at step k draws its
        token n_gen + k (n_gen as the window starts); a frozen row's draw is thrown away."""
        busy = self.busy
        max_new = self.sampling.max_new_tokens
        n_steps = min(max_steps, max(max_new - self.host_ngen[s] for s in busy))
        reach = max(self.host_ngen[s] for s in busy)
        B = self.rows if self.static else busy[-1] + 1
        sharing = self.sharing(B)
        steps = self.n_gen[:B] + torch.arange(n_steps, device=self.device)[:, None]  # n_steps, B
        U = self.sampling.uniforms(self.stream[:B], steps)
        for k in range(n_steps):
            kv_len = min(reach + k, max_new)
            if self.static:
                kv_len = min(-(-kv_len // 256) * 256, self.rows_len)
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
            self.step(B, kv_len, sharing, None if U is None else U[k])

    def harvest(self) -> list[tuple[int, int, list[int], list[float] | None, int]]:
        """The check: one read of the flags and counts, then the finished rows' outputs. -> per finished row
        (prompt, sample, tokens without the stop id, log-probs or None, tokens generated); their slots become free
        (idle: position 0, no prompt keys), and so does the prompt slot of a prompt whose last sample this was."""
        busy = self.busy
        done_host, ngen_host = torch.stack([self.done.long(), self.n_gen]).cpu().tolist()  # 2, R
        for s in busy:
            self.host_ngen[s] = ngen_host[s]
        fin = [s for s in busy if done_host[s]]
        if not fin:
            return []
        fin_t = torch.tensor(fin, device=self.device)
        toks = self.out_tok[fin_t].cpu().tolist()
        lps = self.out_lp[fin_t].cpu().tolist() if self.out_lp is not None else None
        stop = set(self.sampling.stop_ids.tolist())
        out = []
        for i, s in enumerate(fin):
            m = self.host_ngen[s]
            keep = m - 1 if toks[i][m - 1] in stop else m
            p = self.occupant[s][0]
            out.append((*self.occupant[s], toks[i][:keep], lps[i][:keep] if lps is not None else None, m))
            self.occupant[s] = None
            self.unfinished[p] -= 1
            if self.unfinished[p] == 0:
                heapq.heappush(self.free_prompt_slots, self.slot_of.pop(p))
        for t in (self.pos, self.cur, self.prompt, self.prompt_len):
            t[fin_t] = 0
        return out

    def compact(self) -> int:
        """With the queue empty and a COMPACT_IDLE fraction of the decoded slots idle, move the busy rows to slots
        0 .. n-1 (their own keys up to the longest, and their state) and the live prompts to prompt slots 0 .. k-1,
        so later steps decode n rows and read k prompts' keys. -> the number of slots decoded before (0 when
        nothing moved)."""
        busy = self.busy
        if self.queue or self.static or not busy or len(busy) > (1 - COMPACT_IDLE) * (busy[-1] + 1):
            return 0
        src = torch.tensor(busy, device=self.device)
        dst = torch.arange(len(busy), device=self.device)
        S = max(self.host_ngen[s] for s in busy)
        rows = self.cache.rows
        row_bytes = rows.k[:, 0, :, :S].numel() * rows.k.element_size()
        step = max(1, COMPACT_CHUNK_BYTES // row_bytes)
        for i in range(0, len(busy), step):  # chunk by chunk in slot order: dst[i] = i <= src[i], so a chunk's
            s_i, d_i = src[i:i + step], dst[i:i + step]  # writes land below every later chunk's rows (the right
            rows.k[:, d_i, :, :S] = rows.k[:, s_i, :, :S]  # side is gathered before the write), and the gathered
            rows.v[:, d_i, :, :S] = rows.v[:, s_i, :, :S]  # copy stays small (one of the whole cache is GBs)
        for t in (self.cur, self.pos, self.n_gen, self.done, self.stream, self.prompt, self.prompt_len,
                  self.out_tok, self.out_lp):
            if t is not None:
                t[dst] = t[src]
        self.done[len(busy):] = True
        for t in (self.pos, self.cur, self.prompt, self.prompt_len):
            t[len(busy):] = 0
        self.occupant = [self.occupant[s] for s in busy] + [None] * (self.rows - len(busy))
        self.host_ngen = [self.host_ngen[s] for s in busy] + [0] * (self.rows - len(busy))
        live = sorted(self.slot_of.items(), key=lambda kv: kv[1])  # (prompt, slot), by slot
        old = torch.tensor([slot for _, slot in live], device=self.device)
        new = torch.arange(len(live), device=self.device)
        prompts = self.cache.prompts
        prompts.k[:, new] = prompts.k[:, old]
        prompts.v[:, new] = prompts.v[:, old]
        remap = torch.zeros(self.prompt_slots, dtype=torch.long, device=self.device)
        remap[old] = new
        self.prompt[:len(busy)] = remap[self.prompt[:len(busy)]]
        self.slot_of = {p: i for i, (p, _) in enumerate(live)}
        self.free_prompt_slots = list(range(len(live), self.prompt_slots))
        return busy[-1] + 1


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int | None] | None = None,
             seed: int = 0, keys: Sequence[int] | None = None, max_batch_rows: int | None = None,
             memory_budget_bytes: int | None = None, sync_every: int = 8, return_logprobs: bool = False,
             progress: Callable[[int], None] | None = None, compile: bool | None = None):
    """Sample n completions of each prompt -> per prompt, n lists of new token ids (see the module docstring).

    stop_ids: tokens that end a row (excluded from the output), any number of them; None entries are ignored (a
        tokenizer without EOS has eos_id None). stop_ids=None means the model config's eos_id (an int or a list),
        () means no stop token.
    keys: one integer per prompt naming its random stream (default: its index in `prompts`).
    max_batch_rows / memory_budget_bytes: the number of slots is the smallest of the pair count, max_batch_rows and
        (budget - prefill_bytes) // row_bytes (budget default: 80% of free CUDA memory, or 4 GiB on a CPU).
    sync_every: decode steps between host checks for finished rows.
    return_logprobs: also return, aligned with the ids, the raw-model log-probs of each returned token.
    progress: called at every check with the number of tokens generated since the previous call.
    compile: torch.compile the decode step with static shapes (all slots every step, kv_len rounded up to a
        multiple of 256); on CUDA in "reduce-overhead" mode (CUDA graphs, cache marked as a static address).
        None (default): compiled on CUDA, plain elsewhere."""
    if n < 1 or max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or sync_every < 1:
        raise ValueError(f"bad sampling arguments: n={n}, max_new_tokens={max_new_tokens}, "
                         f"temperature={temperature}, top_p={top_p}, top_k={top_k}, sync_every={sync_every}")
    cfg = model.config
    for i, p in enumerate(prompts):
        if not p or min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} is empty or has token ids outside [0, {cfg.vocab_size})")
    keys = list(range(len(prompts))) if keys is None else [int(k) for k in keys]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} keys for {len(prompts)} prompts")
    if stop_ids is None:
        stop_ids = [cfg.eos_id] if isinstance(cfg.eos_id, int) else list(cfg.eos_id or [])
    stop = sorted({int(s) for s in stop_ids if s is not None})
    result = [[[] for _ in range(n)] for _ in prompts]
    logprobs = [[[] for _ in range(n)] for _ in prompts]
    if not prompts or max_new_tokens == 0:
        return (result, logprobs) if return_logprobs else result

    device = model.embed_tokens.weight.device
    budget = memory_budget_bytes or default_memory_budget(device)
    compile = device.type == "cuda" if compile is None else compile
    rows_len = -(-max_new_tokens // 256) * 256 if compile else max_new_tokens
    per_row, per_prompt = row_bytes(model, rows_len), kv_bytes(model, max(len(p) for p in prompts))
    reserve = prefill_bytes(model)
    rows = min(len(prompts) * n, slot_count(budget - reserve, per_row, per_prompt, len(prompts)),
               max_batch_rows or math.inf)
    if rows < 1:
        raise ValueError(f"memory budget of {budget} bytes holds no row ({per_row} bytes and a prompt's "
                         f"{per_prompt}) beside the prefill reserve ({reserve} bytes)")
    from kernels import decode_cpu
    sampling = Sampling(temperature, top_k, top_p, max_new_tokens, torch.tensor(stop, dtype=torch.long, device=device),
                        return_logprobs, draw_top_p=decode_cpu.sample_top_p if decode_cpu.usable(model) else None)
    slots = Slots(model, prompts, keys, n, seed, sampling, int(rows), min(len(prompts), int(rows)), rows_len,
                  step_fn=compiled_decode_step(device) if compile else plain_decode_step(model),
                  static=compile)
    if compile and device.type == "cuda":
        for t in (slots.cache.prompts.k, slots.cache.prompts.v, slots.cache.rows.k, slots.cache.rows.v):
            torch._dynamo.mark_static_address(t)
    # the RoPE table, built here rather than inside the first compiled step (a tensor made inside a CUDA graph is
    # that graph's output, overwritten by its next replay: the first GPU run failed so)
    model.rope_table(slots.cache.prompts.max_len + slots.cache.rows.max_len, device)

    reported = harvested = 0
    while True:
        slots.admit()
        if not slots.busy:
            break
        try:
            slots.run(sync_every)
        except Exception as e:  # the compiled step failed to build: the plain one computes the same
            if not slots.static:
                raise
            warnings.warn(f"generate: the compiled decode step failed ({type(e).__name__}: {e}); "
                          "decoding with the plain step", stacklevel=2)
            slots.step_fn, slots.static = plain_decode_step(model), False  # the steps so far stand; harvest reads them
            model.__dict__.pop("_rope_table", None)  # in case the failed graph owned it
        for p, j, toks, lps, m in slots.harvest():
            result[p][j] = toks
            if return_logprobs:
                logprobs[p][j] = lps
            harvested += m
        slots.compact()
        if progress is not None:
            total = harvested + sum(slots.host_ngen[s] for s in slots.busy)
            progress(total - reported)
            reported = total
    return (result, logprobs) if return_logprobs else result
