"""Model configuration: one dataclass for Llama 2, Llama 3/3.1 and Mistral, presets, and the exact mapping to and
from a Hugging Face `config.json` (LlamaForCausalLM, MistralForCausalLM).

Mistral is Llama plus a sliding window, so there is one config and one model; `sliding_window` is the only switch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class ConfigError(ValueError):
    """A config.json this kit cannot load; the message is one line naming the file and field."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096  # C, hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    head_dim: int | None = None  # None: dim // n_heads
    ffn_dim: int | None = None  # None: Llama's rule, 2/3 * 4 * dim rounded up to a multiple of 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 4096
    sliding_window: int | None = None  # Mistral: query i sees keys j with i - window < j <= i
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2
    pad_id: int | None = None
    model_type: str = "llama"  # "llama" or "mistral": which Hugging Face class the checkpoint names
    torch_dtype: str = "float32"  # the dtype the weights are stored in

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            assert self.dim % self.n_heads == 0, f"dim {self.dim} is not a multiple of n_heads {self.n_heads}"
            self.head_dim = self.dim // self.n_heads
        if self.ffn_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.ffn_dim = 256 * ((hidden + 255) // 256)
        assert self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} % n_kv_heads {self.n_kv_heads} != 0"
        assert self.model_type in ("llama", "mistral"), f"unknown model_type {self.model_type!r}"
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        assert rope_type in SUPPORTED_ROPE_TYPES, f"unsupported rope_type {rope_type!r}"

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # ---- Hugging Face config.json ------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config dict. Unsupported architectures or rope types raise a one-line
        ConfigError naming `source` and the field."""

        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: field '{key}' missing")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type not in ("llama", "mistral"):
            raise ConfigError(f"{source}: field 'model_type' is {model_type!r}; supported: 'llama', 'mistral'")
        archs = hf.get("architectures") or [f"{model_type.capitalize()}ForCausalLM"]
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            supported = list(SUPPORTED_ARCHITECTURES)
            raise ConfigError(f"{source}: field 'architectures' is {archs!r}; supported: {supported}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is {hf['hidden_act']!r}; only 'silu' is supported")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key):
                raise ConfigError(f"{source}: field '{key}' is true; biases are not supported")
        # transformers >= 5 writes rope_parameters = {"rope_type", "rope_theta", ...}; older versions write
        # rope_theta plus rope_scaling. Accept both, like transformers does (rope_scaling wins when set).
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            field_name = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
            raise ConfigError(f"{source}: field '{field_name}.rope_type' is {rope_type!r}; "
                              f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = {"rope_type": "llama3"}
            for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rope:
                    raise ConfigError(f"{source}: field 'rope_scaling.{key}' missing for rope_type 'llama3'")
                rope_scaling[key] = rope[key]
        n_heads = need("num_attention_heads")
        dim = need("hidden_size")
        return cls(
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or dim // n_heads,
            ffn_dim=need("intermediate_size"),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_id=hf.get("bos_token_id"),
            eos_id=hf.get("eos_token_id"),
            pad_id=hf.get("pad_token_id"),
            model_type=model_type,
            torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )

    def to_hf(self) -> dict:
        """The config.json dict that transformers' LlamaForCausalLM / MistralForCausalLM load."""
        arch = "MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters.update(self.rope_scaling)
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            # both spellings, so transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) agree
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        return hf

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        return cls.from_hf(hf, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    # the embedded default's base model: a few MB, trained on the arith corpus by data/make_base_model.py
    "tiny": dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=512,
                 norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, bos_id=1, eos_id=2, pad_id=0),
    "llama2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                      max_seq_len=4096, norm_eps=1e-5, rope_theta=10000.0, bos_id=1, eos_id=2),
    "llama3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      max_seq_len=131072, norm_eps=1e-5, rope_theta=500000.0, bos_id=128000, eos_id=128001,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "mistral-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=32768, norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       model_type="mistral", bos_id=1, eos_id=2),
}
