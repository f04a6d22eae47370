"""Training text: where it comes from, how it becomes token ids, and how batches are drawn reproducibly."""
from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_DATA = "pydoc"  # the Python reference documentation that ships with every Python (pydoc_data.topics)


class DataError(ValueError):
    pass


def load_text(source: str | None = None) -> tuple[str, str]:
    """Return (text, description) from a file, a directory of .txt files, a glob, or the built-in default."""
    if source is None or source == DEFAULT_DATA:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics)), "Python reference docs (pydoc_data.topics)"
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data directory {source} holds no .txt files")
    elif path.is_file():
        files = [path]
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data glob {source!r} matches no files")
    else:
        raise DataError(f"data file {source} does not exist")
    parts = []
    for file in files:
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"data file {file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    text = "\n".join(parts)
    if not text.strip():
        raise DataError(f"data {source} is empty")
    return text, f"{len(files)} file(s) from {source}"


@dataclass
class TokenData:
    """Token ids split into a training and a held-out part; batches are random windows."""

    train: torch.Tensor
    val: torch.Tensor
    val_bytes: int  # UTF-8 bytes the validation tokens decode to, for bits per byte

    @classmethod
    def from_text(cls, text: str, tokenizer, val_fraction: float = 0.1, context_length: int = 128) -> "TokenData":
        if not 0.0 < val_fraction < 0.5:
            raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
        # Split the text first so no token straddles the boundary, then encode each part.
        cut = int(len(text) * (1 - val_fraction))
        train_ids = tokenizer.encode(text[:cut])
        val_ids = tokenizer.encode(text[cut:])
        need = context_length + 1
        if len(train_ids) < need or len(val_ids) < need:
            raise DataError(f"data too small: {len(train_ids)} training and {len(val_ids)} held-out tokens, "
                            f"but each part needs at least context_length + 1 = {need}; "
                            f"give more text or a smaller --context-length")
        dtype = torch.int32 if tokenizer.vocab_size < 2**31 else torch.int64
        return cls(torch.tensor(train_ids, dtype=dtype), torch.tensor(val_ids, dtype=dtype),
                   len(text[cut:].encode("utf-8")))

    def batch(self, split: str, batch_size: int, context_length: int, generator: torch.Generator,
              rows: slice = slice(None)):
        """batch_size random windows; `rows` keeps a part of them (one process's share of a global batch)."""
        ids = self.train if split == "train" else self.val
        starts = torch.randint(len(ids) - context_length, (batch_size,), generator=generator)[rows]  # room for +1
        offsets = torch.arange(context_length + 1)
        windows = ids[starts.unsqueeze(1) + offsets].long()
        return windows[:, :-1], windows[:, 1:]

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        return loss_nats_per_token * len(self.val) / (self.val_bytes * math.log(2))


# ------------------------------------------------------------------------------------------------ parallel text
def load_pairs(source: str, target: str | None = None) -> tuple[list[tuple[str, str]], str]:
    """(source, target) sentence pairs from a TSV file (`source<TAB>target`, further columns ignored, such as
    Tatoeba's attribution) or, when `target` is given, from two files aligned line by line."""
    def read(path: str) -> list[str]:
        file = Path(path)
        if not file.is_file():
            raise DataError(f"data file {path} does not exist")
        try:
            return file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise DataError(f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None

    pairs = []
    if target is None:
        for number, line in enumerate(read(source), 1):
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataError(f"{source} line {number} has no tab: parallel data is `source<TAB>target` per line "
                                f"(or give the target side as a second file)")
            src, tgt = line.split("\t")[:2]
            pairs.append((src.strip(), tgt.strip(), number))
        description = f"{source} (TSV)"
    else:
        sources, targets = read(source), read(target)
        if len(sources) != len(targets):
            raise DataError(f"{source} has {len(sources)} lines but {target} has {len(targets)}; "
                            f"aligned files need one target line per source line")
        pairs = [(s.strip(), t.strip(), n) for n, (s, t) in enumerate(zip(sources, targets), 1) if s.strip() or t.strip()]
        description = f"{source} -> {target}"
    for src, tgt, number in pairs:
        if not src or not tgt:
            raise DataError(f"{source} line {number} has an empty {'source' if not src else 'target'} side")
    if not pairs:
        raise DataError(f"data {source} holds no sentence pairs")
    return [(s, t) for s, t, _ in pairs], description


def is_val(index: int, val_fraction: float) -> bool:
    """Held-out pairs are spread evenly through the file (files are often sorted by length)."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


@dataclass
class PairData:
    """Encoded sentence pairs in length buckets. The encoder reads source + <eos>; the decoder reads <bos> + target
    and is scored on target + <eos>, with <pad> ignored in the loss (label -100)."""

    batches: dict  # split -> list of lists of pair indices, each a bucket of similar lengths
    pairs: dict  # split -> list of (source ids, target ids)
    pad_id: int
    bos_id: int
    eos_id: int
    source_pad_id: int
    source_eos_id: int
    val_target_bytes: int
    val_target_tokens: int

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], tokenizer, source_tokenizer=None, val_fraction: float = 0.1,
                   context_length: int = 128, batch_tokens: int = 4096) -> "PairData":
        """val_fraction 1.0 puts every pair in "val" (to score a test set)."""
        source_tokenizer = source_tokenizer or tokenizer
        split_pairs = {"train": [], "val": []}
        val_bytes = 0
        for i, (src, tgt) in enumerate(pairs):
            s, t = source_tokenizer.encode(src), tokenizer.encode(tgt)
            for side, ids, text in (("source", s, src), ("target", t, tgt)):
                if len(ids) + 1 > context_length:
                    raise DataError(f"pair {i + 1}: the {side} is {len(ids)} tokens + <eos>, longer than the "
                                    f"model's context_length {context_length} ({text[:40]!r}...); raise "
                                    f"--context-length or drop long pairs")
            split = "val" if is_val(i, val_fraction) else "train"
            split_pairs[split].append((s, t))
            if split == "val":
                val_bytes += len(tgt.encode("utf-8"))
        if val_fraction < 1.0 and (not split_pairs["train"] or not split_pairs["val"]):
            raise DataError(f"data too small: {len(pairs)} pair(s) leave none for "
                            f"{'training' if not split_pairs['train'] else 'validation'} at val_fraction {val_fraction}")
        batches = {split: _buckets(items, batch_tokens) for split, items in split_pairs.items()}
        return cls(batches, split_pairs, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                   source_tokenizer.pad_id, source_tokenizer.eos_id, val_bytes,
                   sum(len(t) + 1 for _, t in split_pairs["val"]))

    def collate(self, items: list[tuple[list[int], list[int]]]):
        """-> (model inputs, labels): sources right-padded with a mask, decoder inputs and labels padded."""
        S = max(len(s) for s, _ in items) + 1
        T = max(len(t) for _, t in items) + 1
        source = torch.full((len(items), S), self.source_pad_id, dtype=torch.long)
        source_mask = torch.zeros((len(items), S), dtype=torch.long)
        decoder = torch.full((len(items), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        for row, (s, t) in enumerate(items):
            source[row, :len(s) + 1] = torch.tensor(s + [self.source_eos_id])
            source_mask[row, :len(s) + 1] = 1
            decoder[row, :len(t) + 1] = torch.tensor([self.bos_id] + t)
            labels[row, :len(t) + 1] = torch.tensor(t + [self.eos_id])
        return {"input_ids": decoder, "source_ids": source, "source_mask": source_mask}, labels

    def batch(self, split: str, generator: torch.Generator):
        """A random bucket (drawn with replacement, so a resumed run continues from the generator's state)."""
        return self.collate(self.bucket(split, self.draw_buckets(split, 1, generator)[0]))

    def draw_buckets(self, split: str, count: int, generator: torch.Generator) -> list[int]:
        return torch.randint(len(self.batches[split]), (count,), generator=generator).tolist()

    def bucket(self, split: str, index: int) -> list[tuple[list[int], list[int]]]:
        return [self.pairs[split][i] for i in self.batches[split][index]]

    @staticmethod
    def scored_tokens(items) -> int:
        return sum(len(t) + 1 for _, t in items)  # the target and its <eos>

    def all_batches(self, split: str):
        for bucket in self.batches[split]:
            yield self.collate([self.pairs[split][i] for i in bucket])

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        return loss_nats_per_token * self.val_target_tokens / (self.val_target_bytes * math.log(2))


def _buckets(items, batch_tokens: int) -> list[list[int]]:
    """Pair indices sorted by length and cut into batches of at most batch_tokens (padded) tokens a side."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), len(items[i][1])))
    batches, current, longest = [], [], 0
    for i in order:
        length = max(len(items[i][0]), len(items[i][1])) + 1
        if current and (len(current) + 1) * max(longest, length) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches
