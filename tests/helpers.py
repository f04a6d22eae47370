"""Small shared builders for the tests: tiny random models, seeded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tinyformer import GPT, LanguageModel, get_tokenizer, preset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SAMPLE_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
               "农夫山泉 有点甜 🙂 — naïve café!\n") * 3


def assert_close_scaled(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """got equals expected to within rel x the largest |expected| (and rel relative, elementwise).

    The scale comes from the values compared, not a fixed threshold at the edge of float32 rounding: float32 through
    a few layers drifts by ~1e-6 relative (more on other thread counts: sums split differently), while the bugs these
    comparisons guard against (a wrong mask, scale, position or weight) move logits by 1e-2 relative or more.
    """
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(got.detach().to(expected.dtype), expected.detach(), rtol=rel, atol=rel * max(scale, 1e-6))


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not available (../shared is absent)")
    return path


def tiny_model(kind: str = "tiny", vocab_size: int = 64, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    small = dict(d_model=32, n_layers=2, n_heads=4, context_length=32)
    if kind == "llama-tiny":
        small.update(n_kv_heads=2, d_ff=48)
    return GPT(preset(kind, vocab_size=vocab_size, **{**small, **overrides})).eval()


def char_lm(kind: str = "tiny", seed: int = 0, **overrides) -> LanguageModel:
    tokenizer = get_tokenizer("char", SAMPLE_TEXT)
    return LanguageModel(tiny_model(kind, tokenizer.vocab_size, seed, **overrides), tokenizer, source="test")


PAIRS_TEXT = "je suis content .\ti am happy .\nil est grand .\the is tall .\nnous sommes là !\twe are here !\n农夫山泉\tfarmer spring\n"


def seq2seq_lm(seed: int = 0, **overrides) -> LanguageModel:
    """A tiny random encoder-decoder with a shared char tokenizer over French/English/Chinese text."""
    from tinyformer.model import ModelConfig, Seq2Seq

    tokenizer = get_tokenizer("char", PAIRS_TEXT)
    config = dict(architecture="seq2seq", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_encoder_layers=2,
                  n_heads=4, d_ff=64, context_length=32, positional="sinusoidal", mlp="relu", scale_embeddings=True)
    torch.manual_seed(seed)
    model = Seq2Seq(ModelConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # a wide init: logits far from flat, so greedy and beam choices are sharp
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return LanguageModel(model, tokenizer, source="test")
