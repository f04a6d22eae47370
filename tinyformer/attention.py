"""Attention heat maps of one generation: cross-attention (target x source tokens) for seq2seq models, self-attention
(token x token) for GPT, one panel per layer, averaged over heads."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
             "WenQuanYi Micro Hei", "Droid Sans Fallback", "AR PL UMing CN", "SimHei", "Microsoft YaHei")


@dataclass
class AttentionMaps:
    kind: str  # "cross" or "self"
    queries: list[str]  # row labels: the tokens that attend
    keys: list[str]  # column labels: the tokens attended to
    layers: list[torch.Tensor]  # per layer [len(queries), len(keys)], averaged over heads
    text: str  # what was generated


@torch.inference_mode()
def attention_maps(lm, prompt: str, max_new_tokens: int = 20) -> AttentionMaps:
    """Generate greedily from prompt, then replay the whole sequence once with attention recorded."""
    text = lm.generate(prompt, max_new_tokens=max_new_tokens, temperature=0)
    model = lm.model
    if lm.is_seq2seq:
        source = lm.source_tokenizer.encode(prompt) + [lm.source_tokenizer.eos_id]
        start = model.config.decoder_start_id if model.config.decoder_start_id is not None else lm.tokenizer.bos_id
        target = [start] + lm.tokenizer.encode(text)
        model(torch.tensor([target], device=lm.device), source_ids=torch.tensor([source], device=lm.device),
              record_attention=True)
        layers = [block.cross_attn.last_weights[0].mean(0).cpu() for block in model.decoder]
        # row i is the attention while predicting the token after target[i]: label it with that token
        queries = [lm.tokenizer.token_text(t) for t in target[1:]] + ["<eos>"]
        return AttentionMaps("cross", queries, [lm.source_tokenizer.token_text(t) for t in source], layers, text)
    ids = lm.tokenizer.encode(prompt + text)[-model.config.context_length:]
    model(torch.tensor([ids], device=lm.device), record_attention=True)
    tokens = [lm.tokenizer.token_text(t) for t in ids]
    return AttentionMaps("self", tokens, tokens, [block.attn.last_weights[0].mean(0).cpu() for block in model.blocks],
                         text)


def _font_families() -> list[str]:
    """DejaVu Sans first, then any installed CJK font as a fallback (matplotlib >= 3.6 falls back per glyph)."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return ["DejaVu Sans"] + [name for name in CJK_FONTS if name in installed]


def plot_attention(maps: AttentionMaps, path, layer: int | None = None) -> Path:
    """Write the heat maps as a PNG (atomically); layer picks one panel (0-based), else every layer."""
    from matplotlib.figure import Figure

    if layer is not None and not 0 <= layer < len(maps.layers):
        raise ValueError(f"layer {layer} does not exist; this model has layers 0..{len(maps.layers) - 1}")
    chosen = list(range(len(maps.layers))) if layer is None else [layer]
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    cell = 0.28
    width = max(4.0, cell * len(maps.keys) + 1.5) * cols
    height = max(3.0, cell * len(maps.queries) + 1.5) * rows
    fig = Figure(figsize=(min(width, 40), min(height, 40)))
    families = _font_families()
    for panel, index in enumerate(chosen):
        ax = fig.add_subplot(rows, cols, panel + 1)
        image = ax.imshow(maps.layers[index].numpy(), cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_xticks(range(len(maps.keys)))
        ax.set_yticks(range(len(maps.queries)))
        ax.set_xticklabels([_label(t) for t in maps.keys], rotation=90, fontsize=8, family=families)
        ax.set_yticklabels([_label(t) for t in maps.queries], fontsize=8, family=families)
        ax.set_title(f"layer {index}: {'cross' if maps.kind == 'cross' else 'self'}-attention (mean of heads)",
                     fontsize=9)
        ax.set_xlabel("source token" if maps.kind == "cross" else "attended token", fontsize=8)
        ax.set_ylabel("target token" if maps.kind == "cross" else "token", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")  # no CJK font installed: boxes, not noise
        fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def _label(token: str) -> str:
    shown = token if token.isprintable() else repr(token)[1:-1]
    return shown.replace(" ", "␣")
