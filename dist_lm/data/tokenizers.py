"""Tokenizers: word, char, byte and BPE, all saved as one `vocab.json`.

    tok = load_tokenizer("shards/ptb")          # or the path of a vocab.json
    ids = tok.encode("the cat sat\n")           # [..., tok.eos_id]
    tok.decode(ids)

Kinds (the `kind` field of vocab.json):

- word: whitespace split (`str.split()`), one `<eos>` per line, exactly AWD-LSTM's data.py.
  Ids follow the order of first appearance in the training split (AWD-LSTM's order).
- char: as word, but the symbols are characters. `split: "whitespace"` is PTB-char's format
  (symbols already separated by spaces); `split: "chars"` takes every character of a line.
- byte: the 256 byte values, id = byte; lossless, the newline byte (10) plays `<eos>`.
- bpe: a Hugging Face `tokenizers` byte-level BPE trained on the training split, plus `<eos>`
  per line (optional extra: pip install 'dist-lm[bpe]').

The fast bulk encoders used by `prepare` live in dist_lm/data/prepare.py; the methods here
are the reference per-line versions every other part of dist-lm uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json, write_text_atomic

EOS = "<eos>"
UNK = "<unk>"
FORMAT = 1
KINDS = ("word", "char", "byte", "bpe")


def _lines(text: str) -> list[str]:
    """Lines as a file iterator sees them: a last line without newline still counts."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ended with a newline: no extra line
    return lines


class Tokenizer:
    """A vocabulary (itos/stoi) with the per-line encoding rule of its kind."""

    kind = "word"

    def __init__(self, itos: list[str], unk: str | None = None, eos: str | None = EOS):
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise UserError("vocab.json lists a symbol twice; re-run `dist-lm prepare`.")
        self.unk_id = self.stoi[unk] if unk is not None else None
        self.eos_id = self.stoi[eos] if eos is not None else None

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def symbols(self, line: str) -> list[str]:
        return line.split()

    def _id(self, sym: str) -> int:
        i = self.stoi.get(sym)
        if i is not None:
            return i
        if self.unk_id is None:
            raise UserError(f"'{sym}' is not in the vocabulary and it has no {UNK}; "
                            f"prepare the corpus with --min_freq or --max_vocab to get one.")
        return self.unk_id

    def encode_line(self, line: str) -> list[int]:
        return [self._id(s) for s in self.symbols(line.rstrip("\r\n"))] + [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return [i for line in _lines(text) for i in self.encode_line(line)]

    def _join(self, syms: list[str]) -> str:
        return " ".join(syms)

    def decode(self, ids) -> str:
        lines, cur = [], []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                lines.append(self._join(cur))
                cur = []
            else:
                cur.append(self.itos[i])
        text = "".join(line + "\n" for line in lines)
        return text + self._join(cur)

    def to_json(self) -> dict:
        return {"format": FORMAT, "kind": self.kind, "split": "whitespace", "itos": self.itos,
                "unk": None if self.unk_id is None else self.itos[self.unk_id],
                "eos": None if self.eos_id is None else self.itos[self.eos_id]}

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), ensure_ascii=False, indent=0) + "\n")


class WordTokenizer(Tokenizer):
    kind = "word"


class CharTokenizer(Tokenizer):
    """Characters as symbols. split="whitespace": PTB-char's space-separated symbols."""

    kind = "char"

    def __init__(self, itos, unk=None, eos=EOS, split="whitespace"):
        if split not in ("whitespace", "chars"):
            raise UserError(f"vocab.json: char split '{split}' is unknown (whitespace or chars).")
        self.split = split
        super().__init__(itos, unk, eos)

    def symbols(self, line: str) -> list[str]:
        return line.split() if self.split == "whitespace" else list(line)

    def _join(self, syms):
        return " ".join(syms) if self.split == "whitespace" else "".join(syms)

    def to_json(self) -> dict:
        return {**super().to_json(), "split": self.split}


class ByteTokenizer(Tokenizer):
    """The 256 byte values; id = byte value, so encoding is lossless (enwik8)."""

    kind = "byte"

    def __init__(self):
        super().__init__([chr(b) for b in range(256)], unk=None, eos="\n")

    def encode_line(self, line: str) -> list[int]:
        return list(line.rstrip("\r\n").encode("utf-8")) + [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))  # lossless: no newline added at the end

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"format": FORMAT, "kind": "byte"}


def require_hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("the bpe tokenizer needs the Hugging Face `tokenizers` package; "
                        "install it with: pip install 'dist-lm[bpe]'") from None
    return tokenizers


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Hugging Face tokenizers) plus one `<eos>` per line."""

    kind = "bpe"

    def __init__(self, hf_json: str):
        tk = require_hf_tokenizers()
        self.hf = tk.Tokenizer.from_str(hf_json)
        vocab = self.hf.get_vocab(with_added_tokens=True)
        itos = [""] * len(vocab)
        for s, i in vocab.items():
            itos[i] = s
        super().__init__(itos, unk=None, eos=EOS)

    def encode_line(self, line: str) -> list[int]:
        return self.hf.encode(line.rstrip("\r\n"), add_special_tokens=False).ids + [self.eos_id]

    def encode_lines(self, lines: list[str]) -> list[list[int]]:
        encs = self.hf.encode_batch(lines, add_special_tokens=False)
        return [e.ids + [self.eos_id] for e in encs]

    def decode(self, ids) -> str:
        lines, cur = [], []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                lines.append(cur)
                cur = []
            else:
                cur.append(i)
        text = "".join(self.hf.decode(c, skip_special_tokens=False) + "\n" for c in lines)
        return text + self.hf.decode(cur, skip_special_tokens=False)

    def to_json(self) -> dict:
        return {"format": FORMAT, "kind": "bpe", "eos": EOS,
                "hf_tokenizer": json.loads(self.hf.to_str())}


def train_bpe(lines_iter, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE on an iterator of lines (the training split)."""
    tk = require_hf_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = tk.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(lines_iter, trainer=trainer)
    return BPETokenizer(hf.to_str())


def tokenizer_from_json(obj: dict, where: str = "vocab.json") -> Tokenizer:
    try:
        kind = obj["kind"]
        if obj.get("format") != FORMAT:
            raise UserError(f"{where} has format {obj.get('format')}, this dist-lm reads "
                            f"format {FORMAT}; re-run `dist-lm prepare`.")
        if kind == "word":
            return WordTokenizer(obj["itos"], obj.get("unk"), obj.get("eos"))
        if kind == "char":
            return CharTokenizer(obj["itos"], obj.get("unk"), obj.get("eos"), obj.get("split", "whitespace"))
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BPETokenizer(json.dumps(obj["hf_tokenizer"]))
    except (KeyError, TypeError) as exc:
        raise UserError(f"{where} is not a dist-lm vocabulary (missing {exc}); "
                        f"re-run `dist-lm prepare`.") from None
    raise UserError(f"{where}: unknown tokenizer kind '{kind}' (one of {', '.join(KINDS)}).")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A prepared corpus directory (its vocab.json) or a vocab.json file -> Tokenizer."""
    p = Path(path)
    if p.is_dir():
        p = p / "vocab.json"
    if not p.is_file():
        raise UserError(f"{p} not found; run `dist-lm prepare CORPUS` first "
                        f"(it writes vocab.json next to the shards).")
    return tokenizer_from_json(read_json(p, "re-run `dist-lm prepare`"), str(p))


