"""The whole Llama / Mistral model in one file: RMSNorm, RoPE (with Llama 3 scaling), grouped-query attention
(Mistral sliding window, KV cache with a position per row), SwiGLU MLP, blocks, Transformer.

Module and parameter names follow the Hugging Face checkpoint (`model.layers.0.self_attn.q_proj.weight` is
`layers.0.self_attn.q_proj.weight` here), so checkpoint.py maps names with one explicit rule.

Shape alphabet, used in every comment below:
    B batch, T query length, S key length, H query heads, KVH key/value heads, G = H // KVH query heads per KV head,
    D head dim, C model dim, F feed-forward dim, V vocab, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minisirev.config import ModelConfig

ATTN_BACKENDS = ("ref", "sdpa", "triton")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), normalised in fp32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ---- rotary position embedding --------------------------------------------------------------------------------

def rope_inv_freq(config: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), i < D/2 (Su et al. 2021), with Llama 3.1's frequency-dependent scaling:
    wavelengths above original_len / low_freq_factor are divided by `factor`, those below
    original_len / high_freq_factor kept, and the band between interpolated smoothly."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type") == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, D/2] in fp32: cos(p * inv_freq_i), sin(p * inv_freq_i) for positions p < length.
    The same products and the same cos/sin as transformers' rotary embedding, so a row of the table equals what
    it computes for that position."""
    freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * rope_inv_freq(config, device)
    return freqs.cos(), freqs.sin()


def rotation_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_tables' cos, sin [..., D/2] -> the full-width factors apply_rope takes: [cos, cos] and [-sin, sin]."""
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by angle pos * inv_freq_i (the rotate-half layout of HF), in fp32, cast back:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) = x * [cos, cos] + [x2, x1] * [-sin, sin], the second form in
    four ops (the same bits: a - b is a + (-b) in floating point).
    x [B, H, T, D]; cos, sin [B or 1, 1, T, D] (rotation_tables)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)


# ---- KV cache -------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values, [L, B, KVH, S_max, D] each, in the model's dtype.

    Row b of the cache holds the sequence of batch row b, key index = absolute position. Each forward call writes
    the new keys of row b at positions pos[b] .. pos[b] + T - 1, so rows advance independently (ragged batches).
    A stale entry left by an earlier occupant of a row sits at a position after the row's current one, and the
    causal mask never lets a query see a key after its own position, so rows can be reused without clearing.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32,
                 zeroed: bool = True):
        """zeroed=False leaves the memory as allocated (for a reader that only reads what was written: the CPU
        decode step; untouched pages then cost nothing)."""
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        new = torch.zeros if zeroed else torch.empty
        self.k = new(shape, device=device, dtype=dtype)
        self.v = new(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def write_index(self, pos: torch.Tensor, T: int) -> torch.Tensor:
        """[B * KVH * T]: where keys [B, KVH, T, D] go in one layer's cache viewed as [B_cache * KVH * S_max, D]
        (row b, head h, position pos[b] + t). The same for every layer, so a forward call computes it once."""
        KVH = self.k.shape[2]
        B = pos.shape[0]
        row_head = torch.arange(B * KVH, device=pos.device).view(B, KVH, 1) * self.max_len  # B, KVH, 1
        return (row_head + (pos[:, None, None] + torch.arange(T, device=pos.device))).flatten()  # B*KVH*T

    def write(self, layer: int, index: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor):
        """k, v [B, KVH, T, D] go to the positions `index` (write_index) names; index None: positions 0 .. T-1
        of rows 0 .. B-1 (a prefill from position 0, a plain slice copy)."""
        B, KVH, T, D = k.shape
        if index is None:
            self.k[layer, :B, :, :T] = k
            self.v[layer, :B, :, :T] = v
        else:  # one contiguous D-vector per (row, head, position): a row copy, not an elementwise scatter
            self.k[layer].view(-1, D).index_copy_(0, index, k.reshape(-1, D))
            self.v[layer].view(-1, D).index_copy_(0, index, v.reshape(-1, D))


class PrefixCache:
    """The sampler's cache for many samples of each prompt: a prompt's keys are stored, and read, once for all of
    its samples; each row stores only the keys of the tokens it generates.

        prompts  KVCache [L, P, KVH, Tp, D]: prompt slot p holds one prompt's keys, position j at index j
        rows     KVCache [L, R, KVH, M, D]: row r's generated keys, the token at position len_p + i at index i

    Which rows share which prompt slot is the scheduler's business, passed to each decode call as a Sharing.
    Decoding n samples of a T-token prompt thus reads its T keys once per step instead of n times, and holds them
    once instead of n times."""

    def __init__(self, config: ModelConfig, prompt_slots: int, prompt_len: int, rows: int, max_new: int, *,
                 device=None, dtype=torch.float32, zeroed: bool = True):
        self.prompts = KVCache(config, prompt_slots, prompt_len, device=device, dtype=dtype, zeroed=zeroed)
        self.rows = KVCache(config, rows, max_new, device=device, dtype=dtype, zeroed=zeroed)


@dataclass
class Sharing:
    """Which decode rows share which prompt slot of a PrefixCache (fixed between two scheduler checks).

    prompt [B] long: row b's prompt slot; prompt_len [B] long: that prompt's length (0 for an idle row).
    members [P, m] long: the rows of prompt slots 0 .. P-1, m columns, padded with any row (their results are
        never read); member [B] long: row b's column in its slot's members (0 for an idle row).
    prompt_keys: the prompt keys read, 0 .. prompt_keys - 1 (at least the longest prompt of slots 0 .. P-1).
    Derived once per Sharing: stacked [P * m] (members flattened: the rows in slot-major order) and unstack [B]
    (row b's place in that order), the two index_select lists attention_shared moves rows by."""
    prompt: torch.Tensor
    prompt_len: torch.Tensor
    members: torch.Tensor
    member: torch.Tensor
    prompt_keys: int

    def __post_init__(self):
        self.stacked = self.members.flatten()
        self.unstack = self.prompt * self.members.shape[1] + self.member


# ---- attention ------------------------------------------------------------------------------------------------
# The masks here are stated in absolute positions (query at position i, key index j = position j), the convention
# of this KV cache. kernels/attention.py states its twin in per-row key counts instead (kv_lens, queries aligned to
# the last kv_lens keys); the two agree when kv_lens = pos + T.

def attention_mask(q_pos: torch.Tensor, S: int, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S] from absolute query positions q_pos [B, T]: the query at position i sees key j iff
    j <= i and (no window or i - j < window). The window counts the query's own token, as transformers' Mistral
    does (`kv_idx > q_idx - sliding_window`)."""
    j = torch.arange(S, device=q_pos.device)
    i = q_pos[:, None, :, None]  # B, 1, T, 1
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    return allowed


def attention_ref(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The teaching path: softmax(q k^T * scale + mask) v with scores in fp32.
    q [B, H, T, D], k and v [B, KVH, S, D], mask [B or 1, 1, T, S] bool (attention_mask's, absolute positions).
    GQA by viewing the G query heads of each KV head as extra rows, so K and V are never repeated in memory."""
    B, H, T, D = q.shape
    KVH, S = k.shape[1], k.shape[2]
    G = H // KVH
    qg = q.reshape(B, KVH, G * T, D)  # B, KVH, G*T, D
    scores = (qg.float() @ k.float().transpose(-1, -2)) * scale  # B, KVH, G*T, S
    scores = scores.view(B, KVH, G, T, S).masked_fill(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key (padding) gives 0, not NaN
    out = probs.view(B, KVH, G * T, S) @ v.float()  # B, KVH, G*T, D
    return out.view(B, H, T, D).to(q.dtype)


def attention_shared(q, cache: PrefixCache, layer: int, at: Positions, scale: float) -> torch.Tensor:
    """Decode attention over a PrefixCache: q [B, H, 1, D] -> [B, H, 1, D], in the cache's dtype.

    Row b attends over its prompt's keys (prompt slot at.sharing.prompt[b]) and its own generated keys, one softmax
    over both: the same sum as attention over the row's whole sequence, in another order. Prompt keys are read
    once per slot: the queries of a slot's m rows (G per row and KV head) are stacked into one [m * G, D] block
    against the slot's keys, and the scores go back to the rows. at.bias [B, 1, 1, Tp + S] holds 0 for a key the
    row sees and -inf for the rest (padding, a longer prompt's tail, the window)."""
    sh = at.sharing
    B, H, _, D = q.shape
    P, m = sh.members.shape
    KVH = cache.rows.k.shape[2]
    G, Tp, S = H // KVH, sh.prompt_keys, at.kv_len
    pk, pv = cache.prompts.k[layer, :P, :, :Tp], cache.prompts.v[layer, :P, :, :Tp]  # P, KVH, Tp, D
    rk, rv = cache.rows.k[layer, :B, :, :S], cache.rows.v[layer, :B, :, :S]  # B, KVH, S, D
    qr = q.view(B, KVH, G, D)

    def stack(x):  # [B, KVH, G, E] -> [P, KVH, m * G, E]: each slot's rows side by side
        return x.index_select(0, sh.stacked).view(P, m, KVH, G, -1).transpose(1, 2).reshape(P, KVH, m * G, -1)

    def unstack(x):  # [P, KVH, m * G, E] -> [B, KVH, G, E]: back to the rows
        return x.view(P, KVH, m, G, -1).transpose(1, 2).reshape(P * m, KVH, G, -1).index_select(0, sh.unstack)

    sp = unstack(stack(qr) @ pk.transpose(-1, -2))  # B, KVH, G, Tp
    scores = torch.add(at.bias, torch.cat([sp, qr @ rk.transpose(-1, -2)], dim=-1).float(), alpha=scale)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)  # B, KVH, G, Tp + S
    yp = unstack(stack(probs[..., :Tp]) @ pv)  # B, KVH, G, D
    return (yp + probs[..., Tp:] @ rv).view(B, H, 1, D)


@dataclass
class Positions:
    """What every layer of one forward call shares, computed once per call (not once per layer).

    cos, sin [B or 1, 1, T, D]: the RoPE factors of the call's tokens (rotation_tables).
    pos [B] or None: the position of each row's first token; None means every row starts at 0.
    mask [B or 1, 1, T, S] bool or None: attention_mask for the sdpa / ref backends (None: plain causal).
    write_index [B * KVH * T] or None: KVCache.write_index (None: rows start at 0, a slice write).
    kv_len: the cache keys read, 0 .. kv_len - 1."""
    cos: torch.Tensor
    sin: torch.Tensor
    pos: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    write_index: torch.Tensor | None = None
    kv_len: int = 0
    sharing: Sharing | None = None  # with a PrefixCache: the rows' prompt slots
    bias: torch.Tensor | None = None  # with a PrefixCache: [B, 1, 1, Tp + S], 0 where a row sees a key, else -inf


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.sliding_window
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, at: Positions, *, backend: str, cache: KVCache | PrefixCache | None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # B, H, T, D
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # B, KVH, T, D
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # B, KVH, T, D
        q, k = apply_rope(q, at.cos, at.sin), apply_rope(k, at.cos, at.sin)

        if isinstance(cache, PrefixCache):  # sampler decode: the row's own keys after its shared prompt's
            cache.rows.write(self.layer_idx, at.write_index, k, v)
            y = attention_shared(q, cache, self.layer_idx, at, self.scale)
        elif at.pos is None:  # no cache, or a prefill from position 0: the T tokens see each other only
            if cache is not None:
                cache.write(self.layer_idx, None, k, v)
            y = self._attend_full(q, k, v, backend, at.mask)
        else:
            cache.write(self.layer_idx, at.write_index, k, v)
            S = at.kv_len
            k, v = cache.k[self.layer_idx, :B, :, :S], cache.v[self.layer_idx, :B, :, :S]  # B, KVH, S, D
            y = self._attend_cache(q, k, v, at, backend)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # B, T, H*D
        return self.o_proj(y)

    def _attend_full(self, q, k, v, backend, mask):
        """Self-attention over the T tokens of this call (training, scoring, prefill): causal (+ window)."""
        gqa = self.n_heads != self.n_kv_heads
        if backend == "triton":
            from kernels.attention import flash_attention
            return flash_attention(q, k, v, causal=True, window=self.window, sm_scale=self.scale)
        if backend == "sdpa" and mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
        if mask is None:
            T = q.shape[2]
            mask = attention_mask(torch.arange(T, device=q.device)[None], T, None)
        return attention_ref(q, k, v, mask, self.scale)

    def _attend_cache(self, q, k, v, at: Positions, backend):
        """Queries at positions pos[b] + t against the cache row's keys 0 .. S-1 (key index = position)."""
        T = q.shape[2]
        if backend == "triton":
            from kernels.attention import flash_attention, flash_decode
            kv_lens = at.pos + T
            if T <= 16:
                return flash_decode(q, k, v, kv_lens, window=self.window, sm_scale=self.scale)
            return flash_attention(q, k, v, causal=True, window=self.window, sm_scale=self.scale, kv_lens=kv_lens)
        if backend == "sdpa" and T == 1:  # decode: the G query heads of a KV head as G query rows, K read once
            B, KVH = q.shape[0], self.n_kv_heads
            y = F.scaled_dot_product_attention(q.view(B, KVH, -1, self.head_dim), k, v, attn_mask=at.mask,
                                               scale=self.scale)  # B, KVH, G, D
            return y.view(q.shape)
        if backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=at.mask, scale=self.scale,
                                                  enable_gqa=self.n_heads != self.n_kv_heads)
        return attention_ref(q, k, v, at.mask, self.scale)


# ---- feed-forward, block, model -------------------------------------------------------------------------------

class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, at: Positions, **attn_kwargs):
        x = x + self.self_attn(self.input_layernorm(x), at, **attn_kwargs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, V].

    `attn` picks the attention backend: "ref" (explicit math, the teaching path), "sdpa" (torch), "triton"
    (kernels/attention.py; CUDA, or the Triton interpreter). `Transformer.default_attn(device)` gives "triton" on
    CUDA and "sdpa" elsewhere.
    """

    def __init__(self, config: ModelConfig, attn: str = "ref"):
        super().__init__()
        self.config = config
        self.attn = attn
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.checkpoint_blocks = False  # activation checkpointing, switched on by the training loop

    @property
    def attn(self) -> str:
        return self._attn

    @attn.setter
    def attn(self, backend: str):
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(ATTN_BACKENDS)}")
        self._attn = backend

    @staticmethod
    def default_attn(device) -> str:
        return "triton" if torch.device(device).type == "cuda" else "sdpa"

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, C]: the output projection (the embedding when tied). The fused loss kernel takes it directly."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, std: float = 0.02, seed: int | None = None):
        """Normal(0, std) for every matrix, ones for the norms (transformers' LlamaPreTrainedModel rule)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def rope_table(self, max_pos: int, device) -> tuple[torch.Tensor, ...]:
        """(cos, sin, cos_full, sin_full) for positions < max_pos at least: built once per device and grown to the
        next power of two when a longer sequence comes (not a buffer: it stays fp32 and out of the state dict).
        The sampler builds it before a compiled decode step runs, so that no CUDA graph owns it."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" names the current device, as tensors do
            device = torch.device("cuda", torch.cuda.current_device())
        table = getattr(self, "_rope_table", None)
        if table is None or table[0].device != device or table[0].shape[0] < max_pos:
            cos, sin = rope_tables(self.config, max(256, 1 << (max_pos - 1).bit_length()), device)
            self._rope_table = table = (cos, sin, *rotation_tables(cos, sin))
        return table

    def rope(self, positions: torch.Tensor, max_pos: int, full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (all < max_pos) -> cos, sin [B, 1, T, D/2] from rope_table; full=True: apply_rope's
        full-width factors [B, 1, T, D] (rotation_tables)."""
        table = self.rope_table(max_pos, positions.device)
        cos, sin = table[2:] if full else table[:2]
        return cos[positions][:, None], sin[positions][:, None]

    def positions(self, B: int, T: int, device, pos: torch.Tensor | None, cache: KVCache | PrefixCache | None,
                  kv_len: int | None, sharing: Sharing | None = None) -> Positions:
        """The per-call attention inputs (see Positions) for tokens [B, T] starting at pos (see hidden)."""
        window = self.config.sliding_window
        if pos is None:  # every row from position 0: causal over the call's own tokens (+ window)
            cos, sin = self.rope(torch.arange(T, device=device)[None], T, full=True)
            needs_mask = window is not None or self.attn == "ref"
            mask = attention_mask(torch.arange(T, device=device)[None], T, window) if needs_mask else None
            return Positions(cos, sin, mask=mask if self.attn != "triton" else None)
        if cache is None:
            raise ValueError("pos without a cache: positions only mean something against a KV cache")
        if isinstance(cache, PrefixCache):
            if T != 1:
                raise ValueError(f"a PrefixCache decodes one token per row, not {T}: prefill into a KVCache")
            return self.shared_positions(pos, cache, kv_len, sharing)
        S = kv_len or cache.max_len
        q_pos = pos[:, None] + torch.arange(T, device=device)  # B, T
        cos, sin = self.rope(q_pos, cache.max_len, full=True)
        mask = attention_mask(q_pos, S, window) if self.attn != "triton" else None  # B, 1, T, S
        return Positions(cos, sin, pos=pos, mask=mask, write_index=cache.write_index(pos, T), kv_len=S)

    def shared_positions(self, pos: torch.Tensor, cache: PrefixCache, kv_len: int | None, sharing: Sharing | None
                         ) -> Positions:
        """Positions of one decode token per row against a PrefixCache: row b's token at position pos[b] goes to
        row index i = pos[b] - prompt_len[b] and sees its prompt's keys j < prompt_len[b] and its own keys
        0 .. i (and, with a window, only those less than `window` positions back)."""
        if sharing is None:
            raise ValueError("a PrefixCache needs a Sharing: which rows share which prompt slot")
        S, Tp = kv_len or cache.rows.max_len, sharing.prompt_keys
        cos, sin = self.rope(pos[:, None], cache.prompts.max_len + cache.rows.max_len, full=True)
        start = sharing.prompt_len[:, None]  # B, 1: the position of a row's key 0
        key_pos = torch.cat([torch.arange(Tp, device=pos.device).expand(len(pos), Tp),
                             start + torch.arange(S, device=pos.device)], dim=1)  # B, Tp + S
        seen = key_pos <= pos[:, None]
        seen[:, :Tp] &= key_pos[:, :Tp] < start  # a shorter prompt's slot has stale keys past its end
        if self.config.sliding_window is not None:
            seen &= key_pos > pos[:, None] - self.config.sliding_window
        bias = torch.zeros(seen.shape, device=pos.device).masked_fill_(~seen, float("-inf"))[:, None, None]
        return Positions(cos, sin, pos=pos, write_index=cache.rows.write_index(pos - sharing.prompt_len, 1),
                         kv_len=S, sharing=sharing, bias=bias)

    def hidden(self, tokens, *, pos=None, cache: KVCache | PrefixCache | None = None, kv_len: int | None = None,
               sharing: Sharing | None = None):
        """tokens [B, T] -> final normed hidden states [B, T, C].

        pos: LongTensor [B], the absolute position of tokens[:, 0] in each row, with a cache: the new keys are
        written there and each row attends to its own keys 0 .. pos[b] + t; kv_len (a host int, at most the cache
        length) bounds the keys read so a short cache row does not cost S_max. pos None: every row starts at
        position 0 (training, scoring, a right-padded prefill into cache rows 0 .. B-1). With a PrefixCache (the
        sampler's decode, T = 1), `sharing` says which rows share which prompt's keys and kv_len bounds the rows'
        own keys read."""
        B, T = tokens.shape
        at = self.positions(B, T, tokens.device, pos, cache, kv_len, sharing)
        x = self.embed_tokens(tokens)  # B, T, C
        attn_kwargs = dict(backend=self.attn, cache=cache)
        for block in self.layers:
            if self.checkpoint_blocks and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(block, x, at, use_reentrant=False, **attn_kwargs)
            else:
                x = block(x, at, **attn_kwargs)
        return self.norm(x)

    def forward(self, tokens, *, pos=None, cache: KVCache | PrefixCache | None = None, kv_len: int | None = None,
                sharing: Sharing | None = None):
        """tokens [B, T] -> logits [B, T, V] (in fp32 when the model is fp32, else the model's dtype)."""
        return F.linear(self.hidden(tokens, pos=pos, cache=cache, kv_len=kv_len, sharing=sharing),
                        self.output_weight)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len, device=w.device, dtype=w.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
