"""Model-level truth from outside: logits parity with transformers on tiny random configs (both directions of
checkpoint exchange), and KV-cache consistency (incremental decoding equals a full forward pass)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minisirev.checkpoint import load_model, save_model  # noqa: E402
from minisirev.config import ModelConfig  # noqa: E402
from minisirev.model import Transformer  # noqa: E402

# fp32 on CPU: both implementations do the same float32 ops in a slightly different order (GQA as a reshape here,
# repeat_kv there; RoPE applied in fp32 both), so agreement is at rounding level, ~1e-6 absolute on O(1) logits.
ATOL, RTOL = 1e-5, 1e-5

BASE = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, ffn_dim=96, max_seq_len=128, norm_eps=1e-6)
CONFIGS = {
    "llama-gqa-untied": dict(BASE, n_kv_heads=2),
    "llama-mha-tied": dict(BASE, n_kv_heads=4, tie_embeddings=True),
    "llama3-rope-scaling": dict(BASE, n_kv_heads=1, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "mistral-window": dict(BASE, n_kv_heads=2, model_type="mistral", sliding_window=5),
}


def hf_model(cfg: ModelConfig):
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    # transformers initialises norms to ones; randomise them so a wrong norm mapping cannot hide
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def cfg(request):
    return ModelConfig(**CONFIGS[request.param])


def tokens(vocab, B=2, T=23, seed=1):  # T longer than the window and than llama3's original length
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_transformers_checkpoint_loads_here(cfg, tmp_path):
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", attn="ref")
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        want = hf(x).logits
        for attn in ("ref", "sdpa"):
            ours.attn = attn
            torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=RTOL)


def test_our_checkpoint_loads_in_transformers(cfg, tmp_path):
    ours = Transformer(cfg).init_weights(seed=0)
    with torch.no_grad():
        for block in ours.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
    save_model(ours, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(hf).__name__ == ("MistralForCausalLM" if cfg.model_type == "mistral" else "LlamaForCausalLM")
    x = tokens(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("attn", ["ref", "sdpa"])
def test_kv_cache_matches_full_forward(cfg, attn):
    model = Transformer(cfg, attn=attn).init_weights(seed=0)
    x = tokens(cfg.vocab_size, B=3, T=20)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3, 32)
        pos = torch.zeros(3, dtype=torch.long)
        steps = [model(x[:, :7], pos=pos, cache=cache, kv_len=7)]  # prefill a chunk, then chunks of 1 and 3
        t = 7
        for size in (1, 3, 1, 1, 3, 1, 1, 1, 1):
            steps.append(model(x[:, t:t + size], pos=torch.full((3,), t), cache=cache, kv_len=t + size))
            t += size
        torch.testing.assert_close(torch.cat(steps, 1), full[:, :t], atol=ATOL, rtol=RTOL)


def test_ragged_rows_do_not_depend_on_batch_mates(cfg):
    """Each row has its own position: a row decoded next to others (at other positions, with pad junk in the
    cache) gives the logits it gives alone."""
    model = Transformer(cfg).init_weights(seed=0)
    lens = [5, 11, 8]
    seqs = [tokens(cfg.vocab_size, B=1, T=14, seed=10 + i)[0] for i in range(3)]
    with torch.no_grad():
        alone = [model(s[None])[0] for s in seqs]
        cache = model.new_cache(3, 16)
        batch = torch.stack([torch.cat([s[:n], torch.zeros(14 - n, dtype=torch.long)]) for s, n in zip(seqs, lens)])
        prefill = model(batch, pos=torch.zeros(3, dtype=torch.long), cache=cache)
        for b, n in enumerate(lens):
            torch.testing.assert_close(prefill[b, :n], alone[b][:n], atol=ATOL, rtol=RTOL)
        pos = torch.tensor(lens)
        for _ in range(3):  # decode the true continuations, each row at its own position
            nxt = torch.stack([s[p] for s, p in zip(seqs, pos.tolist())])[:, None]
            out = model(nxt, pos=pos, cache=cache, kv_len=int(pos.max()) + 1)
            for b, p in enumerate(pos.tolist()):
                torch.testing.assert_close(out[b, 0], alone[b][p], atol=ATOL, rtol=RTOL)
            pos = pos + 1


def test_unknown_backend_is_one_line_error():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        Transformer(ModelConfig(**BASE), attn="flash")


def test_rope_table_rows_are_the_direct_formula(cfg):
    """The cached cos/sin table (grown past its first 256 rows on demand) holds cos/sin(p * inv_freq) exactly."""
    from minisirev.model import rope_inv_freq
    model = Transformer(cfg)
    positions = torch.tensor([[0, 5, 255, 256, 300, 1000]])
    cos, sin = model.rope(positions, 1001)
    freqs = positions.float()[..., None] * rope_inv_freq(cfg)  # 1, T, D/2
    assert torch.equal(cos[:, 0], freqs.cos()) and torch.equal(sin[:, 0], freqs.sin())
    assert model._rope_table[0].shape[0] == 1024


def test_rope_is_the_rotate_half_formula_bit_for_bit(cfg):
    """apply_rope's four-op form x * [cos, cos] + [x2, x1] * [-sin, sin] gives exactly the textbook
    (x1 cos - x2 sin, x2 cos + x1 sin), on the model's own tables, in fp32 and (cast back) bf16."""
    from minisirev.model import apply_rope
    model = Transformer(cfg)
    positions = torch.arange(300)[None].repeat(2, 1)
    cos, sin = model.rope(positions, 300)  # B, 1, T, D/2
    cos_full, sin_full = model.rope(positions, 300, full=True)  # B, 1, T, D
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, cfg.n_heads, 300, cfg.head_dim).to(dtype)
        x1, x2 = x.float().chunk(2, dim=-1)
        want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
        assert torch.equal(apply_rope(x, cos_full, sin_full), want)


def test_positions_need_a_cache():
    model = Transformer(ModelConfig(**BASE))
    with pytest.raises(ValueError, match="pos without a cache"):
        model(torch.zeros(1, 3, dtype=torch.long), pos=torch.tensor([4]))
    from minisirev.model import PrefixCache
    cache = PrefixCache(model.config, prompt_slots=1, prompt_len=4, rows=1, max_new=4)
    with pytest.raises(ValueError, match="one token per row, not 3"):
        model(torch.zeros(1, 3, dtype=torch.long), pos=torch.tensor([4]), cache=cache)
    with pytest.raises(ValueError, match="needs a Sharing"):
        model(torch.zeros(1, 1, dtype=torch.long), pos=torch.tensor([4]), cache=cache)


def test_prefix_cache_matches_full_forward(cfg):
    """The sampler's decode path: rows that share a prompt slot (its keys stored once, slots in shuffled order, junk
    past each prompt and in the rows' unused keys) each decode their own continuation and get the logits of a full
    forward pass over prompt + continuation; an idle row beside them (no prompt keys) changes nothing."""
    from minisirev.model import PrefixCache, Sharing
    model = Transformer(cfg).init_weights(seed=0)
    lens = [5, 11, 8]  # prompt i sits in prompt slot slot_of[i]
    slot_of = [2, 0, 1]
    prompts = [tokens(cfg.vocab_size, B=1, T=n, seed=20 + i)[0] for i, n in enumerate(lens)]
    row_prompt = [0, 1, 0, 2, 1, 0]  # rows 0 .. 5 decode; row 6 is idle
    conts = [tokens(cfg.vocab_size, B=1, T=4, seed=40 + r)[0] for r in range(len(row_prompt))]
    R, steps = len(row_prompt) + 1, 4
    with torch.no_grad():
        cache = PrefixCache(cfg, prompt_slots=3, prompt_len=12, rows=R, max_new=6)
        for kv in (cache.prompts.k, cache.prompts.v, cache.rows.k, cache.rows.v):
            kv.normal_()  # junk: stale keys must stay unseen
        for i, p in enumerate(prompts):
            side = model.new_cache(1, len(p))
            model(p[None], cache=side)
            cache.prompts.k[:, slot_of[i], :, :len(p)] = side.k[:, 0]
            cache.prompts.v[:, slot_of[i], :, :len(p)] = side.v[:, 0]
        groups = {slot: [r for r, p in enumerate(row_prompt) if slot_of[p] == slot] for slot in range(3)}
        m = max(map(len, groups.values()))
        members = torch.tensor([g + [g[0]] * (m - len(g)) for g in groups.values()])
        member = torch.tensor([groups[slot_of[p]].index(r) for r, p in enumerate(row_prompt)] + [0])
        prompt_len = torch.tensor([lens[p] for p in row_prompt] + [0])
        sharing = Sharing(torch.tensor([slot_of[p] for p in row_prompt] + [0]), prompt_len, members, member, 12)
        full = [model(torch.cat([prompts[p], c])[None])[0] for p, c in zip(row_prompt, conts)]
        for i in range(steps):
            tok = torch.tensor([int(c[i]) for c in conts] + [0])
            pos = torch.cat([prompt_len[:-1] + i, torch.zeros(1, dtype=torch.long)])
            out = model(tok[:, None], pos=pos, cache=cache, kv_len=i + 1, sharing=sharing)[:, 0]
            for r, p in enumerate(row_prompt):
                torch.testing.assert_close(out[r], full[r][lens[p] + i], atol=ATOL, rtol=RTOL)
            assert out[-1].isfinite().all()
