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

    def batch(self, split: str, batch_size: int, context_length: int, generator: torch.Generator):
        ids = self.train if split == "train" else self.val
        starts = torch.randint(len(ids) - context_length, (batch_size,), generator=generator)  # room for +1
        offsets = torch.arange(context_length + 1)
        windows = ids[starts.unsqueeze(1) + offsets].long()
        return windows[:, :-1], windows[:, 1:]

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        return loss_nats_per_token * len(self.val) / (self.val_bytes * math.log(2))
