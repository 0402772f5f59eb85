"""kernels/decode_cpu.c against its PyTorch twins in model.py: the layer attention (RoPE, cache write,
attention_shared) on ragged prompts, idle rows, windows and GQA shapes; RMSNorm and SiLU * up; the whole Decoder step
against sampler.decode_step (its matmuls are tested in tests/test_packed_linear.py); a row's result independent of
the other rows; the build cache; the fallback when no compiler works (generate then gives the torch path's tokens). The
sampler's guarantees with the C step in the decode are in tests/test_sampler.py (its tests run with attn="sdpa",
which uses it, as well as "ref", which does not)."""

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from kernels import decode_cpu
from kernels.packed_linear import PACKED_MIN_ROWS
from minisirev.config import ModelConfig
from minisirev.model import (
    Positions,
    PrefixCache,
    RMSNorm,
    Sharing,
    Transformer,
    apply_rope,
    attention_shared,
    rope_tables,
)
from minisirev.sampler import decode_step, generate, prefill_into

needs_cc = pytest.mark.skipif(decode_cpu._compiler() is None, reason="no C compiler on this machine")


def case(G, D, KVH=2, rows=13, slots=4, prompt_max=11, own_max=9, S=7, window=None, seed=0, config=None):
    """A PrefixCache with random keys, `rows` decode rows spread over `slots` prompts of ragged lengths, the last
    row idle (prompt length 0, position 0); each row has generated between 0 and S - 1 tokens before this one.
    -> (qkv [rows, (G + 2) KVH D] for one token per row, the cache, the step's Positions, the model)."""
    g = torch.Generator().manual_seed(seed)
    cfg = config or ModelConfig(vocab_size=32, dim=KVH * G * D, n_layers=2, n_heads=KVH * G, n_kv_heads=KVH,
                                ffn_dim=32, max_seq_len=64, sliding_window=window,
                                model_type="mistral" if window else "llama")
    cache = PrefixCache(cfg, slots, prompt_max, rows, own_max)
    for t in (cache.prompts.k, cache.prompts.v, cache.rows.k, cache.rows.v):
        t.copy_(torch.randn(t.shape, generator=g))
    slot_len = torch.randint(1, prompt_max + 1, (slots,), generator=g)
    prompt = torch.randint(0, slots, (rows,), generator=g)
    prompt_len = slot_len[prompt]
    pos = prompt_len + torch.randint(0, S, (rows,), generator=g)
    prompt[-1], prompt_len[-1], pos[-1] = 0, 0, 0  # an idle slot
    members = [[b for b in range(rows) if prompt[b] == p] or [0] for p in range(slots)]
    m = max(map(len, members))
    member = torch.tensor([members[int(prompt[b])].index(b) if b in members[int(prompt[b])] else 0
                           for b in range(rows)])
    sharing = Sharing(prompt, prompt_len, torch.tensor([r + [r[0]] * (m - len(r)) for r in members]), member,
                      int(slot_len.max()))
    model = Transformer(cfg)
    at = model.shared_positions(pos, cache, S, sharing)
    qkv = torch.randn(rows, (G + 2) * KVH * D, generator=g)
    return qkv, cache, at, model


def reference_layer(qkv, cache, layer, model, at):
    """What the model's layers do with qkv in a decode step: RoPE, the cache write, attention_shared (on `cache`)."""
    cfg = model.config
    B, KVH, G, D = qkv.shape[0], cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    q, k, v = qkv.view(B, (G + 2) * KVH, 1, D).split([G * KVH, KVH, KVH], dim=1)
    q, k = apply_rope(q, at.cos, at.sin), apply_rope(k, at.cos, at.sin)
    cache.rows.write(layer, at.write_index, k, v)
    return attention_shared(q, cache, layer, at, 1.0 / D**0.5).reshape(B, -1)


def c_layer(qkv, cache, layer, model, at):
    cos, sin = rope_tables(model.config, cache.prompts.max_len + cache.rows.max_len)
    return decode_cpu.layer_attention(qkv, cache, layer, at.pos, at.sharing, at.kv_len, cos, sin,
                                      1.0 / model.config.head_dim**0.5, model.config.sliding_window)


@needs_cc
@pytest.mark.parametrize("G, D, KVH", [(1, 16, 2), (2, 16, 2), (2, 32, 2), (3, 64, 2), (4, 128, 1), (1, 8, 4)])
@pytest.mark.parametrize("window", [None, 3, 12])
def test_layer_attention_equals_the_model(G, D, KVH, window):
    """Outputs and the keys and values written (RoPE'd), against apply_rope + KVCache.write + attention_shared."""
    assert decode_cpu.library(G, D) is not None, decode_cpu.why(G, D)
    for seed in range(3):
        qkv, cache, at, model = case(G, D, KVH, window=window, seed=seed)
        for layer in (0, 1):
            mine = copy.deepcopy(cache)
            want = reference_layer(qkv, cache, layer, model, at)
            got = c_layer(qkv, mine, layer, model, at)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
            torch.testing.assert_close(mine.rows.k, cache.rows.k, atol=1e-6, rtol=1e-6)
            assert torch.equal(mine.rows.v, cache.rows.v) and torch.equal(mine.prompts.k, cache.prompts.k)


@needs_cc
def test_long_rows_and_many_threads():
    """Scores longer than a stack frame would hold, and more threads than rows."""
    qkv, cache, at, model = case(2, 64, rows=3, prompt_max=300, own_max=700, S=700)
    mine = copy.deepcopy(cache)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        got = c_layer(qkv, mine, 1, model, at)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, reference_layer(qkv, cache, 1, model, at), atol=2e-6, rtol=2e-5)


@needs_cc
def test_a_row_does_not_depend_on_the_other_rows():
    """Bit for bit: each (row, KV head) is one task with a fixed order of operations."""
    qkv, cache, at, model = case(2, 32, rows=12)
    full = c_layer(qkv, copy.deepcopy(cache), 0, model, at)
    sh = at.sharing
    for B in (1, 5):  # the first B rows alone, the rest of the cache unchanged
        sub = Sharing(sh.prompt[:B], sh.prompt_len[:B], sh.members, sh.member[:B], sh.prompt_keys)
        at_b = Positions(at.cos, at.sin, pos=at.pos[:B], kv_len=at.kv_len, sharing=sub)
        assert torch.equal(c_layer(qkv[:B].contiguous(), copy.deepcopy(cache), 0, model, at_b), full[:B])


@needs_cc
def test_rms_norm_and_silu_mul_equal_the_model():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    norm.weight.data = torch.randn(48, generator=g)
    x = torch.randn(300, 48, generator=g) * 3
    x[0] = 0.0  # an all-zero row: eps keeps it finite
    torch.testing.assert_close(decode_cpu.rms_norm(x, norm.weight.detach(), 1e-5), norm(x).detach(),
                               atol=1e-6, rtol=1e-5)
    h = torch.cat([torch.randn(300, 40, generator=g) * 8, torch.randn(300, 40, generator=g)], dim=1)
    h[0, :4] = torch.tensor([-200.0, -90.0, 90.0, 0.0])  # where e^x under- and overflows, and 0
    gate, up = h.chunk(2, dim=1)
    torch.testing.assert_close(decode_cpu.silu_mul(h), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


@needs_cc
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("rows", [9, PACKED_MIN_ROWS + 8])  # torch.mm's matmuls, oneDNN's
def test_decoder_equals_the_models_decode_step(window, rows):
    """The whole step: Decoder's logits and cache writes against sampler.decode_step through the model's layers
    (attn "ref": the torch path), on every layer of a 3-layer model with GQA and tied or untied output."""
    for tie in (True, False):
        cfg = ModelConfig(vocab_size=50, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                          sliding_window=window, model_type="mistral" if window else "llama", tie_embeddings=tie)
        model = Transformer(cfg, attn="sdpa").init_weights(std=0.2, seed=1).eval()
        _, cache, at, _ = case(2, 16, 2, rows=rows, slots=3, window=window, seed=2, config=cfg)
        tokens = torch.randint(0, 50, (rows,), generator=torch.Generator().manual_seed(3))
        mine = copy.deepcopy(cache)
        with torch.no_grad():
            model.attn = "ref"
            want = decode_step(model, cache, tokens, at.pos, at.kv_len, at.sharing)
            model.attn = "sdpa"
            got = decode_cpu.Decoder(model)(model, mine, tokens, at.pos, at.kv_len, at.sharing)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.rows.k, cache.rows.k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.rows.v, cache.rows.v, atol=1e-5, rtol=1e-4)


@needs_cc
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("lens", [[7, 1, 12, 3], [20, 9, 14, 30]])  # 23 tokens: torch.mm's matmuls; 73: oneDNN's
def test_decoder_prefill_equals_the_models_prefill(window, lens):
    """Decoder.prefill (one flat batch of the prompts' tokens, the C causal attention) against sampler.prefill_into
    (the model's padded prefill, attn "ref"): the logits after each prompt, and each prompt's keys and values in its
    prompt slot (slots given out of order); a slot not named keeps what it held."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 50, (n,), generator=g).tolist() for n in lens]
    slots = [4, 0, 2, 1]
    for tie in (True, False):
        cfg = ModelConfig(vocab_size=50, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                          sliding_window=window, model_type="mistral" if window else "llama", tie_embeddings=tie)
        model = Transformer(cfg, attn="ref").init_weights(std=0.2, seed=1).eval()
        cache = PrefixCache(cfg, 5, max(lens), 3, 4)
        for t in (cache.prompts.k, cache.prompts.v):
            t.copy_(torch.randn(t.shape, generator=g))
        mine = copy.deepcopy(cache)
        with torch.no_grad():
            want = prefill_into(model, cache, prompts, slots)
            model.attn = "sdpa"
            got = decode_cpu.Decoder(model).prefill(mine, prompts, slots)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for slot, n in zip(slots, lens):
            torch.testing.assert_close(mine.prompts.k[:, slot, :, :n], cache.prompts.k[:, slot, :, :n], atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(mine.prompts.v[:, slot, :, :n], cache.prompts.v[:, slot, :, :n], atol=1e-5,
                                       rtol=1e-4)
        assert torch.equal(mine.prompts.k[:, 3], cache.prompts.k[:, 3])


@needs_cc
def test_decoder_reads_only_cache_entries_it_wrote(monkeypatch):
    """generate gives the Decoder an unzeroed cache (needs_zeroed_cache False). With every torch.empty filled with
    NaN (-1 for integers) instead, a run with stop tokens, slot refills, prompt slots reused by other prompts and
    tail compaction gives the tokens and log-probs of a run on a zeroed cache: one NaN read anywhere would spread
    through the softmax into the logits."""
    cfg = ModelConfig(vocab_size=61, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128,
                      bos_id=1, eos_id=2)
    model = Transformer(cfg, attn="sdpa").init_weights(std=0.1, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 61, (n,), generator=g).tolist() for n in (3, 8, 5, 2, 7, 4, 6, 9)]
    kw = dict(n=3, max_new_tokens=12, temperature=1.0, top_p=0.9, stop_ids=[5, 9, 17], seed=3, max_batch_rows=7,
              sync_every=2, return_logprobs=True)
    monkeypatch.setattr(decode_cpu.Decoder, "needs_zeroed_cache", True)
    want = generate(model, prompts, **kw)
    monkeypatch.setattr(decode_cpu.Decoder, "needs_zeroed_cache", False)
    empty = torch.empty

    def garbage(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float("nan") if t.is_floating_point() else -1)
    monkeypatch.setattr(torch, "empty", garbage)
    got = generate(model, prompts, **kw)
    monkeypatch.setattr(torch, "empty", empty)
    assert got == want
    lengths = [len(o) for outs in got[0] for o in outs]
    assert min(lengths) < 12 and max(lengths) == 12  # rows stopped early and others ran to the end


@needs_cc
def test_build_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISIREV_CACHE", str(tmp_path))
    lib = decode_cpu._build(2, 16)
    assert lib.parent == tmp_path / "kernels" and lib.exists()
    stamp = lib.stat().st_mtime_ns
    assert decode_cpu._build(2, 16) == lib and lib.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no temporary file left


def test_without_a_compiler_generate_falls_back(tmp_path, monkeypatch):
    """No compiler: library() is None with the reason, one warning, and generate gives the matmul path's tokens."""
    model = Transformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=64), attn="sdpa").init_weights(std=0.1, seed=0).eval()
    prompts = [[3, 5, 7], [9, 4], [11, 12, 13, 14]]
    from minisirev.sampler import generate
    ref = Transformer(model.config, attn="ref")
    ref.load_state_dict(model.state_dict())
    want = generate(ref.eval(), prompts, n=2, max_new_tokens=6, stop_ids=())
    monkeypatch.setenv("MINISIREV_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))
    fresh = importlib.reload(decode_cpu)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = generate(model, prompts, n=2, max_new_tokens=6, stop_ids=())
        assert fresh.library(2, 8) is None and "no C compiler" in fresh.why(2, 8)
        assert [str(w.message) for w in caught if "C decode step" in str(w.message)] == [
            "minisirev: the C decode step is unavailable (no C compiler found ($CC, cc, gcc, clang)); "
            "decoding with the model's torch layers (slower)"]
        assert got == want
    finally:
        monkeypatch.undo()
        importlib.reload(decode_cpu)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("MINISIREV_CPU_KERNELS", "0")
    fresh = importlib.reload(decode_cpu)
    try:
        assert fresh.library(2, 16) is None and "MINISIREV_CPU_KERNELS=0" in fresh.why(2, 16)
    finally:
        monkeypatch.undo()
        importlib.reload(decode_cpu)


@needs_cc
@pytest.mark.parametrize("V, spread", [(402, 3.0), (402, 0.3), (50, 8.0), (1000, 1.0), (7, 1.0)])
def test_sample_top_p_equals_nucleus_then_sample(V, spread):
    """The C draw against sampler.nucleus + sample on the same uniforms: peaked and near-flat rows (nuclei of one
    token to most of the vocabulary, so every threshold of the C search is used), ties (the lower id first), and
    the raw log-probs against log_softmax."""
    from minisirev.sampler import nucleus, sample
    g = torch.Generator().manual_seed(V)
    for temperature, top_p in ((1.0, 0.95), (0.75, 0.95), (1.3, 0.5), (0.5, 0.999)):
        logits = torch.randn(400, V, generator=g) * spread
        logits[:40, : V // 2] = 1.0  # rows with many equal probabilities
        u = torch.rand(400, generator=g, dtype=torch.float64)
        probs, ids = nucleus(logits, temperature, 0, top_p)
        want = ids.gather(-1, sample(probs, u=u)[:, None])[:, 0]
        got, lp = decode_cpu.sample_top_p(logits, temperature, top_p, u, logprobs=True)
        assert torch.equal(got, want)
        torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, got[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-5)
        assert decode_cpu.sample_top_p(logits, temperature, top_p, u, logprobs=False)[1] is None
