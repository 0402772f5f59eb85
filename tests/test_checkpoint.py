"""Checkpoint round trips (exact), sharding, atomic saves, and one-line errors for bad input that leave the
source untouched."""

import dataclasses
import hashlib
import json

import pytest
import torch

from minisirev.checkpoint import CheckpointError, load_model, save_model
from minisirev.config import ConfigError, ModelConfig
from minisirev.model import Transformer

CFG = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64)


def small_model(**kw):
    return Transformer(ModelConfig(**{**CFG, **kw})).init_weights(seed=3)


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, tie, dtype):
    model = small_model(tie_embeddings=tie).to(dtype)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", attn=model.attn)
    assert loaded.config == dataclasses.replace(model.config, torch_dtype=str(dtype).removeprefix("torch."))
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b), n1
    x = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_sharded_checkpoint_loads(tmp_path):
    model = small_model()
    save_model(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    loaded = load_model(tmp_path / "ckpt", dtype=torch.float32)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_save_is_atomic_and_replaces(tmp_path):
    save_model(small_model(), tmp_path / "ckpt")
    save_model(small_model(dim=64, n_heads=4), tmp_path / "ckpt")  # overwrite with another shape
    assert load_model(tmp_path / "ckpt").config.dim == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old directory left behind


def test_failed_save_leaves_old_checkpoint(tmp_path, monkeypatch):
    save_model(small_model(), tmp_path / "ckpt")
    before = digest(tmp_path / "ckpt")
    import minisirev.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        save_model(small_model(dim=64), tmp_path / "ckpt")
    assert digest(tmp_path / "ckpt") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.fixture
def ckpt(tmp_path):
    return save_model(small_model(), tmp_path / "ckpt")


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "nope")
    assert "directory not found" in one_line(e)


def test_missing_weight_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert "no model.safetensors" in one_line(e)


def test_missing_shard(tmp_path):
    d = save_model(small_model(), tmp_path / "ckpt", max_shard_bytes=20_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    assert shard.name in one_line(e) and "missing" in one_line(e)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = digest(ckpt)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert "model.safetensors" in one_line(e)
    assert digest(ckpt) == before


def test_wrong_shape(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 50
    (ckpt / "config.json").write_text(json.dumps(cfg))
    before = digest(ckpt)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = one_line(e)
    assert "mlp" in msg and "has shape" in msg and "implies" in msg
    assert digest(ckpt) == before


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(ckpt)
    assert "model_type" in one_line(e) and "config.json" in one_line(e)


def test_unsupported_rope_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load_model(ckpt)
    assert "rope_type" in one_line(e) and "yarn" in one_line(e)


def test_hub_id_without_network_says_how_to_pass_a_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as e:
        load_model("minisirev-test/does-not-exist")
    assert "local directory" in one_line(e)


def test_presets_and_hf_mapping_round_trip():
    for name in ("tiny", "llama2-7b", "llama3-8b", "mistral-7b"):
        cfg = ModelConfig.from_preset(name)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_preset("llama3-8b").n_heads // ModelConfig.from_preset("llama3-8b").n_kv_heads == 4
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("gpt2")
