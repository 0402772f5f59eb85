"""Load and save Hugging Face-format checkpoints: config.json + safetensors (one file, or shards with an index).

The only name rule between the two layouts: every tensor is `"model." + our name`, except `lm_head.weight`
(module names in model.py follow the checkpoint). Models are built on the meta device and loaded with
`assign=True`, so a large model never exists twice in memory. Saving is atomic: everything is written into a
temporary directory beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minisirev.config import ConfigError, ModelConfig
from minisirev.model import Transformer

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; RoPE is recomputed here


class CheckpointError(ValueError):
    """A checkpoint this kit cannot load or write; the message is one line naming the file and tensor."""


def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


# ---- finding the files ----------------------------------------------------------------------------------------

def resolve(src: str | Path, patterns: list[str] | None = None) -> Path:
    """A local directory, or a Hub repo id fetched with huggingface-hub (only json, safetensors, tokenizer files).
    With no network the error says how to pass a local directory instead."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory (pass the checkpoint directory)")
        return path
    looks_like_repo_id = str(src).count("/") == 1 and not str(src).startswith((".", "/", "~"))
    if not looks_like_repo_id:
        raise CheckpointError(f"{path}: directory not found")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    try:
        return Path(snapshot_download(repo_id=str(src), allow_patterns=patterns or HUB_PATTERNS))
    except HFValidationError:
        raise CheckpointError(f"{src}: not a local directory and not a valid Hub repo id") from None
    except Exception as e:  # the hub raises many types: offline, gated, missing repo, HTTP errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{src}: no local directory of that name, and the Hub download failed ({type(e).__name__}: {reason}); "
            f"with no network, download the model elsewhere and pass its local directory"
        ) from None


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        hint = " (only PyTorch .bin weights found; convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: weight file missing (named by the index)")
    return files


# ---- loading --------------------------------------------------------------------------------------------------

def tensor_index(path: Path, files: list[Path], config: ModelConfig, expected: dict) -> dict[str, tuple]:
    """Where each of our tensors is stored: our name -> (file, checkpoint name, safetensors dtype string), from
    the files' headers only (no tensor data is read). Checked against `expected` (our name -> shape): no unknown
    tensor, every shape as config.json implies, none missing; a one-line CheckpointError otherwise."""
    index = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for hf_name in sf.keys():
                    name = from_hf_name(hf_name)
                    if hf_name.endswith(IGNORED_KEYS) or (name == "lm_head.weight" and config.tie_embeddings):
                        continue
                    if name not in expected:
                        raise CheckpointError(f"{f}: unexpected tensor '{hf_name}' for this config")
                    sl = sf.get_slice(hf_name)
                    if tuple(sl.get_shape()) != tuple(expected[name]):
                        raise CheckpointError(f"{f}: tensor '{hf_name}' has shape {tuple(sl.get_shape())}, "
                                              f"config.json implies {tuple(expected[name])}")
                    index[name] = (f, hf_name, sl.get_dtype())
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
    missing = [to_hf_name(n) for n in expected if n not in index]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: tensor '{missing[0]}' missing{more} ({', '.join(missing[1:3])})")
    return index


def load_model(src: str | Path, *, device="cpu", dtype: torch.dtype | None = None, attn: str | None = None
               ) -> Transformer:
    """Load a Llama / Mistral checkpoint into a Transformer on `device`.

    dtype None keeps the stored dtype. attn None picks Transformer.default_attn(device). Every problem with the
    source (missing directory or file, truncated safetensors, wrong or missing tensors, unknown model_type) is a
    one-line CheckpointError or ConfigError; nothing in the source is modified."""
    path = resolve(src)
    config = ModelConfig.load(path / "config.json")
    files = weight_files(path)
    with torch.device("meta"):
        model = Transformer(config, attn=attn or Transformer.default_attn(device))
    index = tensor_index(path, files, config, {name: p.shape for name, p in model.state_dict().items()})
    state = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for name, (g, hf_name, _) in index.items():
                    if g == f:
                        t = sf.get_tensor(hf_name)
                        state[name] = t.to(device=device, dtype=dtype or t.dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, truncated or corrupt ({e})") from None
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


# ---- saving ---------------------------------------------------------------------------------------------------

def save_model(model: Transformer, out_dir: str | Path, tokenizer=None, *, max_shard_bytes: int = 5 * 2**30,
               state: dict[str, torch.Tensor] | None = None):
    """Write `out_dir` as a Hugging Face checkpoint that `AutoModelForCausalLM.from_pretrained` loads with
    identical logits: config.json, generation_config.json, model.safetensors (or shards of at most
    max_shard_bytes plus model.safetensors.index.json), and the tokenizer's files when one is given.
    `state` replaces model.state_dict() (a sharded model's state gathered by distributed.save_full).

    Atomic: written into `.NAME.tmp-PID` beside the target, fsynced, then renamed; an existing target is moved
    aside first and removed last, so a crash never leaves a half checkpoint under the target's name."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = model.config
        dtypes = {p.dtype for p in model.parameters()}
        stored = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else config.torch_dtype
        hf_config = {**config.to_hf(), "torch_dtype": stored}
        _write_json(tmp / "config.json", hf_config)
        gen = {"bos_token_id": config.bos_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id}
        _write_json(tmp / "generation_config.json", gen)

        state = model.state_dict() if state is None else state
        state = {to_hf_name(n): t.detach().to("cpu").contiguous() for n, t in state.items()}
        _save_shards(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())

        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(out_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int):
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["CheckpointError", "ConfigError", "load_model", "resolve", "save_model"]
