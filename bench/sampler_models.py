"""What bench/sampler.py and bench/sampler_breakdown.py share: the benchmark models and the matmul floor's linear
layers, two ways. (The device's name comes from minisirev.provenance.device_name, as in a run's provenance.)"""

from pathlib import Path

import torch
import torch.nn.functional as F

from kernels import decode_cpu
from minisirev.config import ModelConfig
from minisirev.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = ROOT / "data" / "base_model"
CONFIGS = {
    # the shipped default model (its trained weights: realistic next-token distributions for top-p)
    "base": None,
    # a ~10M-parameter Llama with the default's tokenizer, random weights (init std 0.02: near-flat distributions)
    "10m": dict(vocab_size=398, dim=384, n_layers=6, n_heads=6, n_kv_heads=2, ffn_dim=1024, max_seq_len=512,
                tie_embeddings=True, bos_id=1, eos_id=2, pad_id=0),
    "tiny": dict(ModelConfig.from_preset("tiny").to_dict()),
    # a Llama-shaped ~1.2B model: big enough that batch-1 decode on a GPU is bound by memory bandwidth
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                     max_seq_len=4096, bos_id=1, eos_id=2),
}


def linears_fn(model: Transformer, tokens: int, device=None, dtype=torch.float32, packed: bool = False):
    """A function running every linear layer of `model` once on `tokens` rows of random input (one step of the
    matmul floor), every projection of every layer plus the output projection, either
      packed=False  F.linear on each nn.Linear's weight (torch's GEMM: MKL on a CPU, cuBLAS on a GPU), or
      packed=True   (CPU, fp32) decode_cpu.Linear on the weights as decode_cpu.Decoder holds them: q|k|v and gate|up
                    concatenated, packed for oneDNN's GEMM (torch.mm where oneDNN is not had or rows < 32)."""
    if not packed:
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.output_weight]
        xs = {w.shape[1]: torch.randn(tokens, w.shape[1], device=device, dtype=dtype) for w in weights}

        def run():
            with torch.no_grad():
                for w in weights:
                    F.linear(xs[w.shape[1]], w)
        return run

    layers, out = decode_cpu.layer_weights(model)
    linears = [m for layer in layers for m in layer if isinstance(m, decode_cpu.Linear)] + [out]
    xs = {m.t.shape[0]: torch.randn(tokens, m.t.shape[0]) for m in linears}  # Linear.t: K, N

    def run_packed():
        with torch.no_grad():
            for m in linears:
                m(xs[m.t.shape[0]])
    return run_packed
