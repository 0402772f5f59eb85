"""Batched KV-cache sampler: N completions per prompt, ragged prompts, continuous slot refill.

The pieces are small functions (gpt-fast `generate.py`, nanochat `engine.py`):
    logits_to_probs   temperature, then top-k, then top-p (the order of transformers' logits warpers)
    sample            inverse-CDF draw from probs given uniforms (or a torch.Generator)
    counter_uniform   the uniforms generate uses: a counter-based hash of (seed, key, sample index, step)
    prefill           right-padded ragged prompts -> their KV cache rows and next-token logits
    decode_step       one token per slot against the preallocated cache
    generate          the slot scheduler that ties them together

How generate works. A KV cache of `rows` slots, [L, rows, KVH, S_max, D] in the model's dtype, is allocated once per
call (S_max = longest prompt + max_new_tokens). The work is the queue of (prompt, sample) pairs, prompt-major. When
slots are free, the next pairs take them: their prompts are prefilled once (in a small side cache, batched and
right-padded) and the prompt's cache rows are copied into each of its samples' slots (fan-out), so a prompt is
prefilled once however many of its n samples there are and whenever they are admitted. All slots then decode
together, one token per step, each at its own position. Every `sync_every` steps the host reads the finished flags
(the one host synchronisation; stopping needs it), harvests finished rows and refills their slots. A row that
finishes between two checks stays frozen (its position and token do not advance) until harvested, so at most
sync_every - 1 steps of its slot are wasted; a larger sync_every wastes more slot-steps, a smaller one stalls the
device more often. Rows that can only end by length are known to the host, so no step is wasted at the end.

Randomness. The uniform that draws token t of sample j of a prompt is a hash of (seed, key, j, t), key being the
prompt's index (or the caller's `keys`, e.g. a question id). A draw therefore depends on nothing but those four
numbers and the row's own probabilities: the samples of a prompt do not depend on which prompts share its batch,
on max_batch_rows, on slot refill order or on n (sample j of n=50 is sample j of n=1), and sample.py's resumed runs
reproduce an uninterrupted run. The probabilities themselves can move at rounding level with the batch shape (a
matmul over B rows may block differently), which changes a draw only when its uniform falls within rounding of a
CDF boundary. Same seed -> same samples on the same device; across devices, up to those rounding flips.

The decode step can be torch.compiled (compile=True): static shapes (every slot every step, kv_len rounded up to a
multiple of 256, so at most S_max / 256 graphs), and on CUDA "reduce-overhead" mode, which captures it in a CUDA
graph (the cache is marked as a static address, as transformers' StaticCache does). The plain path is the default
and runs everywhere; sampling itself stays eager in both.

Returned token ids exclude the prompt and the stop token (EOS or any stop id) that ended a row; a row without a stop
token has exactly max_new_tokens ids. Log-probs (return_logprobs=True) are those of the returned tokens under the
model's raw distribution (temperature 1, no top-k/top-p), log_softmax(logits)[token]: what a full re-score of the
sequence gives, and what SFT/DPO losses use.

Shapes: R slots (rows), V vocab, A pairs admitted at once, P prompts in a prefill chunk, T their padded length,
plus model.py's alphabet (L layers, KVH kv heads, S_max cache length, D head dim).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from minisirev.model import KVCache, Transformer

M32 = 0xFFFFFFFF
PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward: bounds the side cache and activations
CPU_MEMORY_BUDGET = 4 * 2**30  # default bytes for cache + per-row work on a CPU (on CUDA: 80% of free memory)


# ---- logits -> probs -> token ---------------------------------------------------------------------------------

def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
                    ) -> torch.Tensor:
    """logits [B, V] -> probs [B, V] in fp32, in transformers' order: temperature, top-k, top-p.

    temperature 0: one-hot on the argmax (greedy; the first index among equal maxima).
    top_k > 0: keep tokens whose logit is >= the k-th largest. Tokens tied with the k-th value are all kept
        (transformers' TopKLogitsWarper rule), so ties never make the kept set depend on torch.topk's order.
    top_p < 1: keep the smallest set of most probable tokens (after top-k) whose total probability reaches p: token
        i in descending order is kept iff the mass strictly before it is < p, so the token that crosses p is kept
        and at least one token always is. Among equal probabilities the lower token id comes first (stable sort).
        top_p = 1 keeps every token. The kept probabilities are renormalised."""
    logits = logits.float()
    V = logits.shape[-1]
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), V).float()
    logits = logits / temperature
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # B, 1
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # B, V
        mass_before = F.pad(sorted_p.double().cumsum(-1)[..., :-1], (1, 0))  # B, V: exclusive cumulative sum
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None, *, u: torch.Tensor | None = None
           ) -> torch.Tensor:
    """probs [B, V] (need not sum to 1) -> token ids [B]: the first token whose cumulative probability exceeds u,
    u ~ U[0, 1) per row (inverse-CDF sampling; the CDF in fp64, normalised so its last entry is exactly 1, hence a
    zero-probability token is never drawn). u comes from `generator` (torch.rand) unless given; generate passes
    counter_uniform's values so that draws are independent of batch composition."""
    if u is None:
        u = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)  # B, V
    cdf = cdf / cdf[..., -1:]
    return torch.searchsorted(cdf, u.double()[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)


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
    """stream [B] (stream_key values, int64), step [B] int64 -> u [B] in [0, 1), fp64 with 53 random bits."""
    x = _mix32(stream ^ _mix32(step & M32))
    hi, lo = _mix32(x ^ 0x68E31DA4), _mix32(x ^ 0xB5297A4D)
    return ((hi << 21) | (lo >> 11)).double() * 2.0**-53


def counter_uniform(seed: int, key: int, sample_idx: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The uniform generate uses for token `step` of sample `sample_idx` of the prompt with `key` (tensors [B])."""
    streams = torch.tensor([stream_key(seed, key, int(j)) for j in sample_idx.tolist()], device=step.device)
    return uniform_from_stream(streams, step)


# ---- prefill and decode ---------------------------------------------------------------------------------------

def prefill(model: Transformer, prompts: list[list[int]]) -> tuple[KVCache, torch.Tensor]:
    """Ragged prompts -> (a cache with row p holding prompt p at positions 0 .. len_p - 1, logits [P, V] of the
    token after each prompt). Prompts are right-padded and run from position 0; each row's logits are read at its
    own last token, and the pad keys beyond len_p are overwritten by decode before any query can see them. Only
    the P last hidden states go through the output projection (never [P, T, V])."""
    device = model.embed_tokens.weight.device
    P, T = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(P, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    tokens = tokens.to(device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    cache = model.new_cache(P, T)
    h = model.hidden(tokens, pos=torch.zeros(P, dtype=torch.long, device=device), cache=cache, kv_len=T)  # P, T, C
    last = h[torch.arange(P, device=device), lens - 1]  # P, C
    return cache, F.linear(last, model.output_weight)  # P, V


def decode_step(model: Transformer, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int
                ) -> torch.Tensor:
    """tokens [B] at positions pos [B] -> next-token logits [B, V]; writes their keys into cache rows 0 .. B-1."""
    return model(tokens[:, None], pos=pos, cache=cache, kv_len=kv_len)[:, 0]


def row_bytes(model: Transformer, cache_len: int, max_new_tokens: int) -> int:
    """Estimated memory per slot: its K and V cache rows plus the per-step work on its logits (fp32 logits and
    probs, fp64 CDF, int64 sort indices: ~32 bytes per vocabulary entry) and its output buffers."""
    cfg = model.config
    itemsize = model.embed_tokens.weight.element_size()
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cache_len * cfg.head_dim * itemsize
    return kv + 32 * cfg.vocab_size + 12 * (max_new_tokens + 1)


def prefill_bytes(model: Transformer) -> int:
    """Estimated peak memory of one prefill chunk of PREFILL_TOKENS tokens: its side cache plus activations
    (a few [tokens, max(C, F)] tensors alive at once)."""
    cfg = model.config
    itemsize = model.embed_tokens.weight.element_size()
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize
    return PREFILL_TOKENS * (kv_per_token + 6 * max(cfg.dim, cfg.ffn_dim) * itemsize)


def default_memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    return CPU_MEMORY_BUDGET


# ---- the scheduler --------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, stop_ids: Sequence[int] | None = None,
             seed: int = 0, keys: Sequence[int] | None = None, max_batch_rows: int | None = None,
             memory_budget_bytes: int | None = None, sync_every: int = 8, return_logprobs: bool = False,
             progress: Callable[[int], None] | None = None, compile: bool = False):
    """Sample n completions of each prompt -> per prompt, n lists of new token ids (see the module docstring).

    stop_ids: tokens that end a row (excluded from the output); None means the model config's eos_id, () none.
    keys: one integer per prompt naming its random stream (default: its index in `prompts`).
    max_batch_rows / memory_budget_bytes: the number of slots is the smallest of the pair count, max_batch_rows and
        (budget - prefill_bytes) // row_bytes (budget default: 80% of free CUDA memory, or 4 GiB on a CPU).
    sync_every: decode steps between host checks for finished rows.
    return_logprobs: also return, aligned with the ids, the raw-model log-probs of each returned token.
    progress: called at every check with the number of tokens generated since the previous call.
    compile: torch.compile the decode step with static shapes (all slots every step, kv_len rounded up to a
        multiple of 256); on CUDA in "reduce-overhead" mode (CUDA graphs, cache marked as a static address)."""
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
        stop_ids = [] if cfg.eos_id is None else [cfg.eos_id] if isinstance(cfg.eos_id, int) else list(cfg.eos_id)
    stop_set = set(int(s) for s in stop_ids)
    result = [[[] for _ in range(n)] for _ in prompts]
    logprobs = [[[] for _ in range(n)] for _ in prompts]
    if not prompts or max_new_tokens == 0:
        return (result, logprobs) if return_logprobs else result

    device = model.embed_tokens.weight.device
    lens = [len(p) for p in prompts]
    S_max = max(lens) + max_new_tokens
    budget = memory_budget_bytes or default_memory_budget(device)
    per_row, reserve = row_bytes(model, S_max, max_new_tokens), prefill_bytes(model)
    rows = min(len(prompts) * n, (budget - reserve) // per_row, max_batch_rows or math.inf)
    if rows < 1:
        raise ValueError(f"memory budget of {budget} bytes holds no row ({per_row} bytes) beside the prefill "
                         f"reserve ({reserve} bytes)")
    rows = int(rows)
    if compile:
        S_max = -(-S_max // 256) * 256  # room for kv_len rounded up to a multiple of 256
    cache = model.new_cache(rows, S_max)
    step_fn = decode_step
    if compile:
        if device.type == "cuda":
            torch._dynamo.mark_static_address(cache.k)
            torch._dynamo.mark_static_address(cache.v)
        step_fn = torch.compile(decode_step, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)

    # per-slot state on the device: R slots; out_* have a trash column max_new_tokens for frozen rows' writes
    cur = torch.zeros(rows, dtype=torch.long, device=device)  # the token to feed next
    pos = torch.zeros(rows, dtype=torch.long, device=device)  # its position
    n_gen = torch.zeros(rows, dtype=torch.long, device=device)  # tokens generated so far (cur included)
    done = torch.ones(rows, dtype=torch.bool, device=device)
    stream = torch.zeros(rows, dtype=torch.long, device=device)
    out_tok = torch.zeros(rows, max_new_tokens + 1, dtype=torch.long, device=device)  # R, max_new + 1
    out_lp = torch.zeros(rows, max_new_tokens + 1, dtype=torch.float32, device=device) if return_logprobs else None
    stop_t = torch.tensor(sorted(stop_set), dtype=torch.long, device=device)

    def pick(logits, streams, steps):
        """logits [B, V] -> (token [B], raw log-prob [B] or None)."""
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            tok = sample(logits_to_probs(logits, temperature, top_k, top_p), u=uniform_from_stream(streams, steps))
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0] if return_logprobs else None
        return tok, lp

    def finished(tok, steps_after):
        return torch.isin(tok, stop_t) | (steps_after >= max_new_tokens)

    # host-side bookkeeping (no device reads): who is in each slot, and n_gen as of the last check
    pending = [(p, j) for p in range(len(prompts)) for j in range(n)]
    pending.reverse()  # pop() takes the next pair
    occupant: list[tuple[int, int] | None] = [None] * rows
    host_ngen = [0] * rows
    to_admit = [n] * len(prompts)  # samples of each prompt not yet admitted
    prefilled: dict[int, tuple[int, int]] = {}  # prompt -> (chunk id, row in chunk)
    chunks: dict[int, list] = {}  # chunk id -> [side cache, logits [P, V], prompts in it still to admit]
    chunk_ids = itertools.count()
    tokens_reported = 0
    harvested_tokens = 0

    def admit():
        free = [s for s in range(rows) if occupant[s] is None]
        batch = []
        while free and pending:
            batch.append((*pending.pop(), free.pop(0)))
        if not batch:
            return
        need = sorted({p for p, _, _ in batch if p not in prefilled}, key=lambda p: lens[p])
        while need:  # prefill the new prompts in chunks of similar length (need is sorted by length)
            take = [need.pop(0)]
            while need and (len(take) + 1) * lens[need[0]] <= PREFILL_TOKENS:
                take.append(need.pop(0))
            cid = next(chunk_ids)
            side, logits = prefill(model, [prompts[p] for p in take])
            chunks[cid] = [side, logits, len(take)]
            for row, p in enumerate(take):
                prefilled[p] = (cid, row)
        by_chunk: dict[int, list] = {}
        for p, j, s in batch:
            by_chunk.setdefault(prefilled[p][0], []).append((p, j, s))
        for cid, items in by_chunk.items():
            side, chunk_logits = chunks[cid][0], chunks[cid][1]
            src = torch.tensor([prefilled[p][1] for p, _, _ in items], device=device)
            dst = torch.tensor([s for _, _, s in items], device=device)
            T = side.k.shape[3]
            cache.k[:, dst, :, :T] = side.k[:, src]  # fan-out: L, A, KVH, T, D
            cache.v[:, dst, :, :T] = side.v[:, src]
            streams = torch.tensor([stream_key(seed, keys[p], j) for p, j, _ in items], device=device)
            zeros = torch.zeros(len(items), dtype=torch.long, device=device)
            tok, lp = pick(chunk_logits[src], streams, zeros)
            cur[dst], n_gen[dst], stream[dst] = tok, 1, streams
            pos[dst] = torch.tensor([lens[p] for p, _, _ in items], device=device)
            done[dst] = finished(tok, zeros + 1)
            out_tok[dst, 0] = tok
            if return_logprobs:
                out_lp[dst, 0] = lp
            for p, j, s in items:
                occupant[s], host_ngen[s] = (p, j), 1
                to_admit[p] -= 1
                if to_admit[p] == 0:  # all its samples hold the prompt's rows now: free the side cache rows
                    del prefilled[p]
                    chunks[cid][2] -= 1
                    if chunks[cid][2] == 0:
                        del chunks[cid]

    def step(B, kv_len):
        if compile and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        logits = step_fn(model, cache, cur[:B], pos[:B], kv_len)  # B, V
        tok, lp = pick(logits, stream[:B], n_gen[:B])
        active = ~done[:B]
        col = torch.where(active, n_gen[:B], max_new_tokens)[:, None]  # B, 1: frozen rows write the trash column
        out_tok[:B].scatter_(1, col, tok[:, None])
        if return_logprobs:
            out_lp[:B].scatter_(1, col, lp[:, None])
        n_gen[:B] += active
        pos[:B] += active
        cur[:B] = torch.where(active, tok, cur[:B])
        done[:B] |= active & finished(tok, n_gen[:B])

    while True:
        admit()
        busy = [s for s in range(rows) if occupant[s] is not None]
        if not busy:
            break
        n_steps = min(sync_every, max(max_new_tokens - host_ngen[s] for s in busy))
        B = rows if compile else busy[-1] + 1
        # kv_len bounds every busy row's position + 1 without reading the device: row s feeds its token at
        # lens + n_gen - 1 <= lens + min(host_ngen + k, max_new) - 1 at step k of this window
        reach = max(lens[occupant[s][0]] + host_ngen[s] for s in busy)
        cap = max(lens[occupant[s][0]] for s in busy) + max_new_tokens
        for k in range(n_steps):
            kv_len = min(reach + k, cap)
            if compile:
                kv_len = min(-(-kv_len // 256) * 256, S_max)
            step(B, kv_len)
        # the check: one read of the flags and counts, then the finished rows' outputs
        done_host, ngen_host = torch.stack([done.long(), n_gen]).cpu().tolist()  # 2, R
        fin = [s for s in busy if done_host[s]]
        for s in busy:
            host_ngen[s] = ngen_host[s]
        if fin:
            fin_t = torch.tensor(fin, device=device)
            toks = out_tok[fin_t].cpu().tolist()
            lps = out_lp[fin_t].cpu().tolist() if return_logprobs else None
            for i, s in enumerate(fin):
                p, j = occupant[s]
                m = host_ngen[s]
                harvested_tokens += m
                if toks[i][m - 1] in stop_set:
                    m -= 1
                result[p][j] = toks[i][:m]
                if return_logprobs:
                    logprobs[p][j] = lps[i][:m]
                occupant[s] = None
            pos[fin_t], cur[fin_t] = 0, 0  # idle slots sit at position 0, inside any kv_len
        if progress is not None:
            total = harvested_tokens + sum(host_ngen[s] for s in range(rows) if occupant[s] is not None)
            progress(total - tokens_reported)
            tokens_reported = total
    return (result, logprobs) if return_logprobs else result
