"""The sampler against the model without a cache: greedy decoding equals step-by-step argmax of full forward passes,
sampled log-probs equal a full re-score (mistral-inference `tests/test_generate.py`), outputs do not depend on batch
composition or slot refill order; top-k / top-p keep exactly the intended sets (transformers' TopK/TopPLogitsWarper
semantics); seeded draws follow the intended distribution (sample.py's resume: tests/test_scripts.py)."""

import math
from pathlib import Path

import pytest
import torch

from minisirev.config import ModelConfig
from minisirev.model import Transformer
from minisirev.sampler import generate, logits_to_probs, nucleus, sample, stream_key, uniform_from_stream

ROOT = Path(__file__).resolve().parents[1]
# fp32 on CPU; cached decoding and the full forward do the same ops over different key lengths and batch shapes,
# so log-probs agree to rounding level (~1e-6 on O(1) values), as in test_model.py.
ATOL, RTOL = 1e-5, 1e-5

BASE = dict(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128, norm_eps=1e-6,
            bos_id=1, eos_id=2)
CONFIGS = {"llama-gqa": BASE, "mistral-window": dict(BASE, model_type="mistral", sliding_window=4)}
LENS = (5, 1, 9, 13, 3)  # ragged, and longer than the window


def uniforms(seed, key, sample_idx: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The uniforms generate draws token `step` of sample `sample_idx` of the prompt with `key` with."""
    streams = torch.tensor([stream_key(seed, key, j) for j in sample_idx.tolist()])
    return uniform_from_stream(streams, step)


def make_model(name="llama-gqa", attn="ref"):
    # std 0.1 rather than 0.02 so that the random model has peaked, well-separated logits (no near-ties in argmax)
    return Transformer(ModelConfig(**CONFIGS[name]), attn=attn).init_weights(std=0.1, seed=0).eval()


def make_prompts(vocab=61, lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these models are tiny: one thread is faster, and far faster on a loaded machine (no OpenMP spin-waits)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_model()


def greedy_reference(model, prompt, max_new, stop):
    """Argmax of a full forward pass (no cache) over prompt + generated, one token at a time."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([seq], device=model.output_weight.device))[0, -1].argmax())
            if t in stop:
                break
            out.append(t)
            seq.append(t)
    return out


def rescore(model, prompt, completion):
    """log p(completion_t | prompt, completion_<t) from one full forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + completion]))[0].float(), -1)  # T, V
    idx = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return logp[idx, torch.tensor(completion, dtype=torch.long)]


# ---- cached decoding against the model without a cache ---------------------------------------------------------

@pytest.mark.parametrize("attn", ["ref", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_full_forward_argmax(name, attn):
    model = make_model(name, attn)
    prompts = make_prompts()
    # the third greedy token of prompt 0 as an extra stop id, so that some rows stop early
    stop = {2, greedy_reference(model, prompts[0], 3, set())[2]}
    want = [greedy_reference(model, p, 12, stop) for p in prompts]
    got = generate(model, prompts, n=2, max_new_tokens=12, stop_ids=sorted(stop), max_batch_rows=3, sync_every=3)
    assert got == [[w, w] for w in want]
    assert any(len(w) < 12 for w in want) and any(len(w) == 12 for w in want)


@pytest.mark.parametrize("attn", ["ref", "sdpa"])  # the decode attention: attention_shared, kernels/decode_cpu.c
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 0.9)])
def test_output_independent_of_batch_composition(temperature, top_k, top_p, attn):
    """Slots 1, 2, 4 or all; prompts reversed (with their keys); host checks every 1, 3, 8 or 9 steps: same output."""
    model = make_model(attn=attn)
    prompts = make_prompts()
    kw = dict(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    want = generate(model, prompts, n=3, **kw)
    for rows, sync_every in ((1, 1), (2, 9), (4, 3), (None, 1)):
        assert generate(model, prompts, n=3, max_batch_rows=rows, sync_every=sync_every, **kw) == want
    keys = list(range(len(prompts)))[::-1]
    assert generate(model, prompts[::-1], n=3, keys=keys, max_batch_rows=4, **kw) == want[::-1]
    # sample j of a prompt is the same stream whatever n is
    assert [outs[:1] for outs in generate(model, prompts, n=1, **kw)] == [outs[:1] for outs in want]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 0.8)])
@pytest.mark.parametrize("attn", ["ref", "sdpa"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_equal_full_rescore(name, temperature, top_k, top_p, attn):
    model = make_model(name, attn)
    prompts = make_prompts()
    outs, lps = generate(model, prompts, n=2, max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_ids=(), max_batch_rows=4, return_logprobs=True)
    for p, completions, logprobs in zip(prompts, outs, lps):
        for c, lp in zip(completions, logprobs):
            assert len(c) == len(lp) == 10
            torch.testing.assert_close(torch.tensor(lp), rescore(model, p, c), atol=ATOL, rtol=RTOL)


def test_prefill_once_per_prompt(model):
    """n samples share one prefill, even when they are admitted into slots at different times."""
    prefilled = []
    hook = model.embed_tokens.register_forward_hook(
        lambda mod, inp, out: prefilled.append(inp[0].shape[0]) if inp[0].shape[1] > 1 else None)
    try:
        prompts = make_prompts(lens=(4, 7, 2, 9))
        generate(model, prompts, n=5, max_new_tokens=6, max_batch_rows=3, temperature=1.0)
    finally:
        hook.remove()
    assert sum(prefilled) == len(prompts)


def test_prompt_keys_stored_once(model, monkeypatch):
    """A prompt's keys live in one prompt slot for all its samples: the cache holds min(prompts, rows) prompt
    slots of the longest prompt and, per row, only max_new_tokens keys of its own."""
    from minisirev import sampler
    made = []
    init = sampler.PrefixCache.__init__
    monkeypatch.setattr(sampler.PrefixCache, "__init__",
                        lambda self, *a, **kw: made.append(a) or init(self, *a, **kw))
    prompts = make_prompts()
    generate(model, prompts, n=8, max_new_tokens=6, temperature=1.0)
    generate(model, prompts, n=8, max_new_tokens=6, temperature=1.0, max_batch_rows=3)
    # (config, prompt_slots, prompt_len, rows, max_new): 40 rows share 5 prompt slots; 3 rows need at most 3
    assert [a[1:] for a in made] == [(5, max(LENS), 40, 6), (3, max(LENS), 3, 6)]


# ---- stopping, seeds, n ---------------------------------------------------------------------------------------

def test_stop_ids_honoured_and_excluded(model):
    prompts = make_prompts()
    free = generate(model, prompts, max_new_tokens=12, stop_ids=())
    assert all(len(o[0]) == 12 for o in free)
    stop = free[2][0][4]  # a token row 2 emits at step 4
    got = generate(model, prompts, max_new_tokens=12, stop_ids=[stop])
    for f, g in zip(free, got):
        cut = f[0].index(stop) if stop in f[0] else 12
        assert g[0] == f[0][:cut] and stop not in g[0]
    assert len(got[2][0]) <= 4
    # default: the config's eos_id; a list-valued eos_id works too
    model.config.eos_id = [stop, 60]
    try:
        assert generate(model, prompts, max_new_tokens=12) == got
    finally:
        model.config.eos_id = 2


def test_same_seed_same_samples_and_n_independent(model):
    prompts = make_prompts()
    kw = dict(n=8, max_new_tokens=8, temperature=1.0, stop_ids=())
    a = generate(model, prompts, seed=5, **kw)
    assert generate(model, prompts, seed=5, **kw) == a
    b = generate(model, prompts, seed=6, **kw)
    assert a != b
    for outs in a:  # n samples of a prompt are n distinct draws (8 tokens over ~60 ids: collisions are ~impossible)
        assert len({tuple(o) for o in outs}) == 8


def test_zero_tokens_and_bad_arguments(model):
    assert generate(model, [[3, 4]], n=2, max_new_tokens=0) == [[[], []]]
    for bad in (dict(top_p=0.0), dict(top_k=-1), dict(temperature=-1.0), dict(n=0)):
        with pytest.raises(ValueError):
            generate(model, [[3, 4]], **bad)
    with pytest.raises(ValueError, match="prompt 1"):
        generate(model, [[3], []])
    with pytest.raises(ValueError, match="memory budget"):
        generate(model, [[3]], memory_budget_bytes=16)


# ---- logits -> probs on constructed distributions -------------------------------------------------------------

P5 = torch.tensor([0.0625, 0.5, 0.125, 0.25, 0.0625])  # exact in binary; sorted: ids 1, 3, 2, 0, 4


def kept(probs):
    return set(torch.nonzero(probs[0]).flatten().tolist())


@pytest.mark.parametrize("top_p, want", [
    (0.5, {1}),  # token 1 alone reaches 0.5 exactly
    (0.5 + 1e-6, {1, 3}),  # token 3 crosses p and is kept
    (0.75, {1, 3}),
    (0.8, {1, 3, 2}),
    (0.9375, {1, 3, 2, 0}),  # tie 0.0625/0.0625 at the boundary: the lower id comes first
    (0.95, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
    (1e-9, {1}),  # at least one token
])
def test_top_p_keeps_smallest_set_reaching_p(top_p, want):
    probs = logits_to_probs(P5.log()[None], 1.0, 0, top_p)
    assert kept(probs) == want
    expect = torch.zeros(5)
    expect[list(want)] = P5[list(want)] / P5[list(want)].sum()
    torch.testing.assert_close(probs[0], expect)


@pytest.mark.parametrize("top_k, want", [
    (1, {1}), (2, {1, 3}), (3, {1, 3, 2}),
    (4, {0, 1, 2, 3, 4}),  # the 4th largest value is tied with the 5th: both kept (transformers' rule)
    (5, {0, 1, 2, 3, 4}), (0, {0, 1, 2, 3, 4}), (99, {0, 1, 2, 3, 4}),
])
def test_top_k_keeps_k_largest(top_k, want):
    assert kept(logits_to_probs(P5.log()[None], 1.0, top_k, 1.0)) == want


def test_temperature_then_top_k_then_top_p():
    # top-k=3 renormalises to 4/7, 2/7, 1/7; then top-p 0.8 keeps two. Top-p first would keep three.
    probs = logits_to_probs(P5.log()[None], 1.0, 3, 0.8)
    torch.testing.assert_close(probs[0], torch.tensor([0, 2 / 3, 0, 1 / 3, 0]))
    # temperature T: probs proportional to p^(1/T)
    hot = logits_to_probs(P5.log()[None], 2.0)
    torch.testing.assert_close(hot[0], P5.sqrt() / P5.sqrt().sum())
    greedy = logits_to_probs(torch.tensor([[0.1, 3.0, 3.0, -1.0]]), 0.0)
    assert greedy.tolist() == [[0, 1, 0, 0]]


# ---- seeded draws follow the intended distribution ------------------------------------------------------------

def assert_frequencies(draws: torch.Tensor, probs: torch.Tensor):
    """Each token's count within 5 binomial standard deviations of N p (for N = 40000 a false alarm has
    probability ~1e-6 per token, and the seeds are fixed, so the test is deterministic); excluded tokens never."""
    N = draws.numel()
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    p = probs.double()
    assert torch.all(counts[p == 0] == 0)
    assert torch.all((counts - N * p).abs() <= 5 * (N * p * (1 - p)).sqrt() + 1e-9), (counts / N, p)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 4, 1.0), (1.3, 0, 0.7)])
def test_draws_match_intended_distribution(temperature, top_k, top_p):
    logits = torch.randn(1, 9, generator=torch.Generator().manual_seed(0)) * 1.5
    probs = logits_to_probs(logits, temperature, top_k, top_p)[0]
    N = 40000
    u = uniforms(11, 0, torch.arange(N), torch.zeros(N, dtype=torch.long))
    assert_frequencies(sample(probs.expand(N, -1), u=u), probs)
    g = torch.Generator().manual_seed(11)
    assert_frequencies(sample(probs.expand(N, -1), g), probs)
    g2 = torch.Generator().manual_seed(11)
    g3 = torch.Generator().manual_seed(11)
    assert torch.equal(sample(probs.expand(100, -1), g2), sample(probs.expand(100, -1), g3))


def test_generate_first_tokens_match_model_distribution(model):
    """End to end: n = 20000 one-token samples of one prompt follow softmax(logits / T) after top-k and top-p."""
    prompt = make_prompts()[3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[:, -1]
    probs = logits_to_probs(logits, 0.9, 30, 0.9)[0]
    outs = generate(model, [prompt], n=20000, max_new_tokens=1, temperature=0.9, top_k=30, top_p=0.9, stop_ids=())
    assert_frequencies(torch.tensor([o[0] for o in outs[0]]), probs)
    assert 0 < (probs > 0).sum() < 30  # top-p cut inside the top-k set


def test_uniforms_are_uniform_and_stream_local():
    u = uniforms(0, 7, torch.arange(50000), torch.arange(50000) % 13)
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    assert (counts - 2500).abs().max() < 5 * math.sqrt(2500)
    # a draw depends only on (seed, key, sample, step)
    assert torch.equal(uniforms(0, 7, torch.tensor([3]), torch.tensor([3])), u[3:4])
    assert not torch.equal(uniforms(1, 7, torch.arange(4), torch.zeros(4, dtype=torch.long)),
                           uniforms(0, 7, torch.arange(4), torch.zeros(4, dtype=torch.long)))


# ---- the top-p prefilter, slot compaction, the compiled step ---------------------------------------------------

def nucleus_reference(probs: list[float], top_p: float) -> list[tuple[int, float]]:
    """Rank the whole row by (-p, id), keep token i iff the fp64 mass strictly before it is < top_p."""
    kept, mass = [], 0.0
    for i in sorted(range(len(probs)), key=lambda i: (-probs[i], i)):
        if mass >= top_p:
            break
        kept.append((i, probs[i]))
        mass += probs[i]
    return kept


def kept_pairs(probs: torch.Tensor, ids: torch.Tensor) -> list[list[tuple[int, float]]]:
    return [[(int(i), float(p)) for p, i in zip(pr, ir) if p > 0] for pr, ir in zip(probs, ids)]


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.99])
def test_top_p_prefilter_keeps_the_same_set(top_p):
    """Peaked rows (settled by the prefilter), spread rows (settled by the second look at their NUCLEUS_WIDE most
    probable tokens), flat rows (ranked whole) and rows with tied logits: the kept tokens, their order and
    probabilities are those of ranking the whole vocabulary, and of a brute-force reference."""
    from minisirev.sampler import NUCLEUS_WIDE
    g = torch.Generator().manual_seed(0)
    V = 300
    scale = torch.tensor([8.0] * 20 + [3.0] * 20 + [1.0] * 20 + [0.05] * 8)[:, None]
    logits = torch.randn(len(scale), V, generator=g) * scale
    logits[::5, 1:40:3] = logits[::5, :1]  # ties with the largest logit of every 5th row (some straddle the cut)
    logits[1::7, 50:60] = logits[1::7].max(-1, keepdim=True).values - 0.3
    got = nucleus(logits, 1.0, 0, top_p)
    whole = nucleus(logits, 1.0, 0, top_p, prefilter=0.0)
    probs = torch.softmax(logits, -1)
    settled = ((probs * (probs >= 1 / 64)).double().sum(-1) >= top_p)
    second = ~settled & (torch.topk(probs, NUCLEUS_WIDE).values.double().sum(-1) >= top_p)
    assert settled.any() and second.any() and (~settled & ~second).any()  # the three paths ran
    assert kept_pairs(*got) == kept_pairs(*whole) == [nucleus_reference(p, top_p) for p in probs.tolist()]


@pytest.mark.parametrize("W", [40, 255, 256, 1000])
def test_sort_desc_is_the_stable_descending_sort(W):
    """sort_desc (int64 keys from W >= SORT_KEYS_FROM, torch's stable sort below) gives torch.sort(stable=True,
    descending=True)'s values and columns, with ties (the lower column first), zeros and tiny values."""
    from minisirev.sampler import SORT_KEYS_FROM, sort_desc
    assert 40 < SORT_KEYS_FROM <= 1000
    g = torch.Generator().manual_seed(W)
    probs = torch.softmax(torch.randn(16, W, generator=g) * 4, dim=-1)
    probs[:, ::3] = probs[:, 1:2]  # every third column ties with column 1
    probs[:4, 5::7] = 0.0
    probs[4:8, 2::5] = 1e-40  # subnormal
    values, cols = sort_desc(probs)
    want_v, want_c = torch.sort(probs, dim=-1, descending=True, stable=True)
    assert torch.equal(values, want_v) and torch.equal(cols, want_c)


def test_top_k_keeps_ties_and_renormalises():
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0, 2.0]])
    probs, ids = nucleus(logits, 1.0, 2, 1.0)  # the 2nd largest logit (2.0) is tied three ways: all kept
    assert sorted(int(i) for p, i in zip(probs[0], ids[0]) if p > 0) == [1, 2, 3, 5]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_stop_ids_may_name_none(model):
    prompts = make_prompts()
    want = generate(model, prompts, max_new_tokens=6, stop_ids=(5,))
    assert generate(model, prompts, max_new_tokens=6, stop_ids=(None, 5)) == want


@pytest.mark.parametrize("chunk_bytes", [None, 1])  # one gathered copy; one row at a time
def test_tail_compaction_keeps_outputs(model, monkeypatch, chunk_bytes):
    """Rows that stop early leave idle slots at the end of a run; the busy ones move down and decode on unchanged
    (their keys moved in one chunk, or chunk by chunk)."""
    from minisirev import sampler
    if chunk_bytes is not None:
        monkeypatch.setattr(sampler, "COMPACT_CHUNK_BYTES", chunk_bytes)
    moved = []
    compact = sampler.Slots.compact
    monkeypatch.setattr(sampler.Slots, "compact", lambda self: moved.append(compact(self)) or moved[-1])
    prompts = make_prompts(lens=(3, 8, 5, 2, 7, 4, 6, 9))
    free = generate(model, prompts, n=2, max_new_tokens=10, temperature=1.0, stop_ids=(), seed=2)
    # slots are filled prompt-major: stop the first 12 rows early with their 2nd tokens, never the last 4 rows
    flat = [o for outs in free for o in outs]
    stop = sorted({o[1] for o in flat[:12]} - {t for o in flat[12:] for t in o})
    want = generate(model, prompts, n=2, max_new_tokens=10, temperature=1.0, stop_ids=stop, seed=2, max_batch_rows=1)
    moved.clear()
    got = generate(model, prompts, n=2, max_new_tokens=10, temperature=1.0, stop_ids=stop, seed=2, sync_every=2)
    assert got == want and any(moved)
    assert any(len(o) < 10 for outs in got for o in outs) and any(len(o) == 10 for outs in got for o in outs)


def assert_no_fallback(recwarn):
    """No silent fallback: generate warned of no failed compiled step (the first such warning shown if it did)."""
    failed = [str(w.message) for w in recwarn if "compiled decode step failed" in str(w.message)]
    assert not failed, failed[0][:2000]


def test_compiled_step_equals_plain(model, recwarn):
    """The compiled decode step (static shapes: every slot every step, kv_len rounded up to 256) gives the plain
    step's tokens; log-probs agree to rounding (inductor fuses the same fp32 ops in another order)."""
    prompts = make_prompts()
    for kw in (dict(), dict(temperature=1.0, top_p=0.9)):
        kw = dict(n=2, max_new_tokens=8, max_batch_rows=4, return_logprobs=True, **kw)
        plain, lp_plain = generate(model, prompts, **kw)
        comp, lp_comp = generate(model, prompts, compile=True, **kw)
        assert comp == plain
        for a, b in zip(lp_plain, lp_comp):
            for x, y in zip(a, b):
                torch.testing.assert_close(torch.tensor(y), torch.tensor(x), atol=ATOL, rtol=RTOL)
    assert_no_fallback(recwarn)


@pytest.mark.parametrize("compiled", [False, True], ids=["plain", "compiled"])
def test_rope_table_exists_before_the_first_decode_step(compiled, monkeypatch):
    """On CUDA the compiled step runs as CUDA graphs, and a tensor first made inside one is that graph's output,
    overwritten by its next replay: the first GPU run failed so ("accessing tensor output of CUDAGraphs that has
    been overwritten"), with the RoPE table built lazily inside the first step. generate now builds it before any
    step, large enough for every position, and no step replaces it: a spy step checks that on the CPU."""
    import minisirev.sampler as S
    model = make_model()
    model.__dict__.pop("_rope_table", None)
    tables = []

    def spy(model, cache, tokens, pos, kv_len, sharing):
        table = getattr(model, "_rope_table", None)
        assert table is not None and table[0].shape[0] >= cache.prompts.max_len + cache.rows.max_len
        tables.append(table)
        out = S.decode_step(model, cache, tokens, pos, kv_len, sharing)
        assert model._rope_table is table
        return out
    monkeypatch.setattr(S, "compiled_decode_step" if compiled else "plain_decode_step", lambda *_: spy)
    generate(model, make_prompts(), n=2, max_new_tokens=9, compile=compiled)
    assert tables and all(t is tables[0] for t in tables)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: bench/gpu_suite.sh runs it on one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_step_equals_plain_on_cuda(dtype, recwarn):
    """On CUDA the compiled step is the default: torch.compile in "reduce-overhead" mode, one CUDA graph per
    kv_len bucket, over the Triton attention. Its tokens equal the plain step's (greedy, and sampled with the same
    seed), its log-probs agree to rounding, and it never falls back silently. Also greedy equals the full forward's
    argmax on the GPU."""
    model = make_model(attn="triton").to("cuda", dtype)
    prompts = make_prompts()
    for kw in (dict(), dict(temperature=1.0, top_p=0.9)):
        kw = dict(n=2, max_new_tokens=12, max_batch_rows=4, return_logprobs=True, seed=3, **kw)
        plain, lp_plain = generate(model, prompts, compile=False, **kw)
        comp, lp_comp = generate(model, prompts, **kw)  # compile=None: compiled on CUDA
        assert comp == plain
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
        for a, b in zip(lp_plain, lp_comp):
            for x, y in zip(a, b):
                torch.testing.assert_close(torch.tensor(y), torch.tensor(x), **tol)
    assert_no_fallback(recwarn)
    if dtype == torch.float32:
        greedy, _ = generate(model, prompts[:3], max_new_tokens=8, stop_ids=(), return_logprobs=True)
        for prompt, outs in zip(prompts[:3], greedy):
            assert outs[0] == greedy_reference(model, prompt, 8, ())


def test_slot_count_is_the_largest_that_fits():
    """slot_count against brute force: the most rows r with r * row + min(r, prompts) * prompt <= budget."""
    from minisirev.sampler import slot_count
    for budget in range(0, 200, 7):
        for row, prompt, n_prompts in ((3, 5, 4), (10, 1, 2), (1, 40, 3), (7, 7, 100)):
            want = max(r for r in range(budget + 1) if r * row + min(r, n_prompts) * prompt <= budget)
            assert slot_count(budget, row, prompt, n_prompts) == want
