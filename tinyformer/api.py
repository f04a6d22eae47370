"""One entry point for every model source: `tinyformer.load(path)`."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, is_checkpoint, load_checkpoint, load_source_tokenizer
from .model import quant


class LanguageModel:
    """A loaded model with its tokenizer: `.model` (logits [B, T, V] from input_ids [B, T]), `.tokenizer`,
    `.generate(...)`, and `.source` (what it was loaded from). A seq2seq model reads its prompts (the sources)
    with `.source_tokenizer`, which is `.tokenizer` unless the checkpoint has a separate one."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: dict | None = None, source: str = "",
                 pack: bool = True, source_tokenizer=None):
        self.model, self.tokenizer, self.config, self.source = model, tokenizer, config or {}, source
        self.source_tokenizer = source_tokenizer or tokenizer
        # options the model's own config sets for generation (a Marian model bans <pad> and forces a final <eos>,
        # as transformers does); anything passed to generate() overrides them
        self.generation_defaults = dict(self.config.get("generation") or {})
        if pack:
            quant.pack(model)  # fast CPU decode kernels; a no-op for the values

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts, **options):
        from .generation.api import generate

        return generate(self.model, self.tokenizer, prompts, source_tokenizer=self.source_tokenizer,
                        **{**self.generation_defaults, **options})

    @property
    def is_seq2seq(self) -> bool:
        return self.model.config.architecture == "seq2seq"

    def __repr__(self) -> str:
        return f"LanguageModel({self.source!r}, {self.model.num_parameters():,} parameters)"


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


def load(path, device: str | None = "auto", dtype: str | None = None, quantize: str | None = None) -> LanguageModel:
    """Load a tinyformer checkpoint, a Hugging Face GPT-2/Llama/Marian directory, or the tutorial's .ckpt file.

    dtype ("float32", "bfloat16", "float16") casts the model; quantize="int8" stores its matrices as int8
    (model/quant.py). None keeps the file's precision (float32 unless it was saved quantized or cast).
    """
    quant.check_precision(dtype, quantize)
    device = resolve_device(device)
    if quantize and device != "cpu":
        raise quant.PrecisionError(f"quantize={quantize!r} runs on the CPU only (fbgemm kernels), not {device!r}; "
                                   f"use device='cpu'")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    source_tokenizer = None
    if path.is_dir() and is_checkpoint(path):
        model, tokenizer, config = load_checkpoint(path, device)
        source_tokenizer = load_source_tokenizer(path, config)
    elif path.is_dir() and (path / "config.json").is_file():
        from .interop.hf import load_hf

        model, tokenizer, config, source_tokenizer = load_hf(path, device)
    elif path.is_file():
        from .interop.book import load_book

        model, tokenizer, config = load_book(path, device)
    else:
        raise CheckpointError(f"{path} is neither a checkpoint directory (config.json) nor a .ckpt file")
    quant.set_precision(model, dtype, quantize)
    return LanguageModel(model, tokenizer, config, str(path), source_tokenizer=source_tokenizer)
