"""The tokenizer wrapper: digit splitting, round trips, BOS/EOS from the checkpoint's files, and agreement with
transformers' AutoTokenizer on a saved tokenizer."""

import json

import pytest

from minisirev.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

CORPUS = [f"Tom has {a} apples and buys {b} more.\nHe has {a}+{b}=<<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"
          for a in range(3, 60, 7) for b in range(11, 90, 13)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def test_digits_are_single_tokens(tok):
    ids = tok.encode("12345 + 678")
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if p.strip().isdigit()] == list("12345678")


def test_round_trip(tok):
    for text in CORPUS[:5] + ["a  b\n\n  c 007", "ünïcødé 3.14"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode_batch(tok.encode_batch(CORPUS[:3])) == CORPUS[:3]


def test_special_ids_and_no_implicit_specials(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("Tom")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "Tom"


def test_save_load_and_transformers_agree(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:4]:
        assert again.encode(text) == tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2


def test_bos_eos_from_config_json(tok, tmp_path):
    tok.tok.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json: fall back to config.json ids
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 2]}))
    again = load_tokenizer(tmp_path)
    assert (again.bos_id, again.eos_id, again.eos_ids) == (2, 1, (1, 2))


def test_missing_tokenizer_is_one_line(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json: file not found"):
        load_tokenizer(tmp_path)


def test_several_eos_ids_are_all_kept(tok, tmp_path):
    """Llama 3 style: generation_config.json names two EOS ids, config.json a third; eos_id stays the first."""
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    again = load_tokenizer(tmp_path)
    assert again.eos_id == 2 and again.eos_ids == (2, 5, 7)
    assert load_tokenizer(tmp_path).eos_ids == (2, 5, 7)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(TokenizerError, match="config.json: field 'eos_token_id'"):
        load_tokenizer(tmp_path)


def test_no_eos_at_all(tok, tmp_path):
    """A tokenizer without any EOS: eos_id None, eos_ids empty, and generate accepts either as stop ids."""
    from minisirev.config import ModelConfig
    from minisirev.model import Transformer
    from minisirev.sampler import generate

    plain = train_tokenizer(["abc abd"], vocab_size=270)
    plain.tok.save(str(tmp_path / "tokenizer.json"))
    raw = json.loads((tmp_path / "tokenizer.json").read_text())
    raw["added_tokens"] = [t for t in raw["added_tokens"] if t["content"] != "</s>"]
    raw["model"]["vocab"].pop("</s>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(raw))
    again = load_tokenizer(tmp_path)
    assert again.eos_id is None and again.eos_ids == ()
    model = Transformer(ModelConfig(vocab_size=again.vocab_size + 1, dim=32, n_layers=1, n_heads=2, ffn_dim=64,
                                    eos_id=None)).init_weights(seed=0)
    prompt = [[3, 4, 5]]
    want = generate(model, prompt, max_new_tokens=5, stop_ids=())
    assert len(want[0][0]) == 5
    assert generate(model, prompt, max_new_tokens=5, stop_ids=again.eos_ids) == want
    assert generate(model, prompt, max_new_tokens=5, stop_ids=(again.eos_id,)) == want  # was int(None)
    assert generate(model, prompt, max_new_tokens=5) == want  # the config's eos_id None: no stop id
