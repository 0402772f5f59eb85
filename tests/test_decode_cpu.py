"""kernels/decode_cpu.c against its PyTorch twin model.attention_shared: values on ragged prompts, idle rows, windows
and GQA shapes; a row's result independent of the other rows; the build cache; the fallback when no compiler works
(generate then gives the matmul path's tokens). The sampler's guarantees with the kernel in the decode are in
tests/test_sampler.py (its tests run with attn="sdpa", which uses it, as well as "ref", which does not)."""

import importlib
import warnings

import pytest
import torch

from kernels import decode_cpu
from minisirev.config import ModelConfig
from minisirev.model import Positions, PrefixCache, Sharing, Transformer, attention_shared

needs_cc = pytest.mark.skipif(decode_cpu._compiler() is None, reason="no C compiler on this machine")


def case(G, D, KVH=2, rows=13, slots=4, prompt_max=11, own_max=9, S=7, window=None, seed=0):
    """A PrefixCache with random keys, `rows` decode rows spread over `slots` prompts of ragged lengths, the last
    row idle (prompt length 0, position 0); each row has generated between 0 and S - 1 tokens before this one."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(vocab_size=32, dim=KVH * G * D, n_layers=2, n_heads=KVH * G, n_kv_heads=KVH, ffn_dim=32,
                      max_seq_len=64, sliding_window=window, model_type="mistral" if window else "llama")
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
    q = torch.randn(rows, KVH * G, 1, D, generator=g)
    return q, cache, at, model.layers[0].self_attn.scale


@needs_cc
@pytest.mark.parametrize("G, D, KVH", [(1, 16, 2), (2, 16, 2), (2, 32, 2), (3, 64, 2), (4, 128, 1), (1, 8, 4)])
@pytest.mark.parametrize("window", [None, 3, 12])
def test_kernel_equals_attention_shared(G, D, KVH, window):
    assert decode_cpu.library(G, D) is not None, decode_cpu.why(G, D)
    for seed in range(3):
        q, cache, at, scale = case(G, D, KVH, window=window, seed=seed)
        for layer in (0, 1):
            want = attention_shared(q, cache, layer, at, scale)
            got = decode_cpu.decode_attention(q, cache, layer, at, scale, window)
            torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@needs_cc
def test_long_rows_and_many_threads():
    """Scores longer than a stack frame would hold, and more threads than rows."""
    q, cache, at, scale = case(2, 64, rows=3, prompt_max=300, own_max=700, S=700)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        got = decode_cpu.decode_attention(q, cache, 1, at, scale, None)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, attention_shared(q, cache, 1, at, scale), atol=2e-6, rtol=2e-5)


@needs_cc
def test_a_row_does_not_depend_on_the_other_rows():
    """Bit for bit: each (row, KV head) is one task with a fixed order of operations."""
    q, cache, at, scale = case(2, 32, rows=12)
    full = decode_cpu.decode_attention(q, cache, 0, at, scale, None)
    sh = at.sharing
    for B in (1, 5):  # the first B rows alone, the rest of the cache unchanged
        sub = Sharing(sh.prompt[:B], sh.prompt_len[:B], sh.members, sh.member[:B], sh.prompt_keys)
        at_b = Positions(at.cos, at.sin, pos=at.pos[:B], kv_len=at.kv_len, sharing=sub)
        assert torch.equal(decode_cpu.decode_attention(q[:B], cache, 0, at_b, scale, None), full[:B])


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
        assert [str(w.message) for w in caught if "C decode attention" in str(w.message)] == [
            "minisirev: the C decode attention is unavailable (no C compiler found ($CC, cc, gcc, clang)); "
            "decoding with torch matmuls (slower)"]
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
