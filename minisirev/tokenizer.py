"""A thin wrapper on the `tokenizers` library (tokenizer.json), with the BOS/EOS rules of the checkpoint, and a
helper that trains a small byte-level BPE tokenizer for the embedded task.

`encode` never adds special tokens: the caller decides where BOS goes (the loop puts it before every prompt)
and appends EOS after every training completion.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 in a tokenizer trained here (the tiny preset's ids)
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|eot_id|>", "<eos>")


class TokenizerError(ValueError):
    """A tokenizer this kit cannot load; one line naming the file."""


class Tokenizer:
    """eos_id is the checkpoint's EOS token (the one appended after a training completion), None when it has none;
    eos_ids every id that ends a generation (eos_id first, then the other ids the checkpoint's files name), () when
    there is none: what generate's stop_ids wants."""

    def __init__(self, tok: HFTokenizer, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 eos_ids: tuple[int, ...] | None = None):
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        if eos_ids is None:
            eos_ids = () if eos_id is None else (eos_id,)
        self.eos_ids = tuple(eos_ids)
        self.bos_token = bos_token or (tok.id_to_token(bos_id) if bos_id is not None else None)
        self.eos_token = eos_token or (tok.id_to_token(eos_id) if eos_id is not None else None)
        self.pad_token = pad_token or (tok.id_to_token(pad_id) if pad_id is not None else None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """[BOS] + encode(text): how every prompt is fed to the model (training, sampling, evaluation)."""
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return self.tok.decode_batch([list(ids) for ids in batch], skip_special_tokens=True)

    def save(self, out_dir: str | Path):
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json, as transformers' AutoTokenizer
        (PreTrainedTokenizerFast) reads them."""
        out_dir = Path(out_dir)
        self.tok.save(str(out_dir / "tokenizer.json"))
        special = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                     ("pad_token", self.pad_token)) if v is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000, **special}
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def load_tokenizer(src: str | Path) -> Tokenizer:
    """From a checkpoint directory, a tokenizer.json path, or a Hub repo id. BOS/EOS come from
    tokenizer_config.json (or special_tokens_map.json), then config.json's ids, then the usual token names.
    eos_ids: eos_id, then every eos_token_id of generation_config.json and config.json (an int or a list each),
    in that order without repeats (Llama 3 Instruct ends a turn with <|eot_id|> or <|end_of_text|>)."""
    path = Path(src).expanduser()
    if path.is_file():
        path, tok_file = path.parent, path
    else:
        if not path.exists():
            from minisirev.checkpoint import resolve
            path = resolve(src, patterns=["*.json", "tokenizer.model"])
        tok_file = path / "tokenizer.json"
    if not tok_file.exists():
        raise TokenizerError(f"{tok_file}: file not found (only tokenizer.json tokenizers are supported)")
    try:
        tok = HFTokenizer.from_file(str(tok_file))
    except Exception as e:
        raise TokenizerError(f"{tok_file}: cannot be read by the tokenizers library ({e})") from None

    tcfg = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
    mcfg = _read_json(path / "config.json")

    def find(key: str, id_key: str, names: tuple[str, ...]) -> tuple[int | None, str | None]:
        name = _token_content(tcfg.get(key))
        if name is not None and tok.token_to_id(name) is not None:
            return tok.token_to_id(name), name
        ident = mcfg.get(id_key)
        if isinstance(ident, list):
            ident = ident[0] if ident else None
        if ident is not None:
            return ident, tok.id_to_token(ident)
        for name in names:
            if tok.token_to_id(name) is not None:
                return tok.token_to_id(name), name
        return None, None

    bos_id, bos = find("bos_token", "bos_token_id", BOS_NAMES)
    eos_id, eos = find("eos_token", "eos_token_id", EOS_NAMES)
    pad_id, pad = find("pad_token", "pad_token_id", ("<pad>",))
    eos_ids = [] if eos_id is None else [eos_id]
    for file in (path / "generation_config.json", path / "config.json"):
        ids = _read_json(file).get("eos_token_id")
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TokenizerError(f"{file}: field 'eos_token_id' is {ids!r}, not an integer or a list of them")
            if i not in eos_ids:
                eos_ids.append(i)
    return Tokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, bos_token=bos, eos_token=eos, pad_token=pad,
                     eos_ids=tuple(eos_ids))


def train_tokenizer(texts, vocab_size: int = 512, *, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer on an iterable of strings. Digits are split one per token (as Llama 3
    does) so that arithmetic stays learnable; specials are <pad>=0, <s>=1, </s>=2."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, bos_id=1, eos_id=2, pad_id=0)
