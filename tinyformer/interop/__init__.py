"""Interoperability: Hugging Face GPT-2/Llama/Marian directories (load and export) and the tutorial's .ckpt format."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError
from .book import load_book
from .hf import export_hf, load_hf


def convert(src, out_dir, device: str = "cpu", dtype: str | None = None, quantize: str | None = None) -> Path:
    """Load any supported source (tinyformer.load, optionally cast or quantized) and write it as a native
    tinyformer checkpoint directory."""
    from ..api import load
    from ..checkpoint import save_checkpoint

    lm = load(src, device=device, dtype=dtype, quantize=quantize)
    if lm.tokenizer is None:
        raise CheckpointError(f"{src} has no tokenizer (no tokenizer.json); a tinyformer checkpoint needs one")
    extra = {"converted_from": str(src)}
    if lm.generation_defaults:  # e.g. a Marian model's banned <pad> and forced <eos>: the same tokens after conversion
        extra["generation"] = lm.generation_defaults
    source_tokenizer = lm.source_tokenizer if lm.source_tokenizer is not lm.tokenizer else None
    return save_checkpoint(out_dir, lm.model, lm.tokenizer, extra=extra, source_tokenizer=source_tokenizer)


__all__ = ["load_hf", "export_hf", "load_book", "convert"]
