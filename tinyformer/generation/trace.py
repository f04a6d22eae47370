"""A step-by-step record of generation: each token with its top candidates and their probabilities."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TraceStep:
    step: int
    row: int
    token_id: int
    token: str
    prob: float  # under the model's own distribution (before temperature and truncation)
    top: list[tuple[str, float]]  # the top candidates (token text, probability)
    text: str  # the row's generated text so far
    source: list[tuple[str, float]] | None = None  # seq2seq: the source tokens cross-attention weighted most

    def to_dict(self) -> dict:
        out = {"step": self.step, "row": self.row, "token_id": self.token_id, "token": self.token,
               "prob": self.prob, "top": [{"token": t, "prob": p} for t, p in self.top], "text": self.text}
        if self.source is not None:
            out["source_attention"] = [{"token": t, "weight": w} for t, w in self.source]
        return out


def trace_step(tokenizer, step: int, row: int, token: int, logprob: float, top, text: str) -> TraceStep:
    return TraceStep(step, row, token, tokenizer.token_text(token), math.exp(logprob),
                     [(tokenizer.token_text(t), math.exp(lp)) for t, lp in top], text)


def _show(text: str, width: int, token: bool = False) -> str:
    shown = text if text.isprintable() else repr(text)[1:-1]
    if token:
        shown = shown.replace(" ", "␣")  # a token's spaces matter: make them visible
    return shown if len(shown) <= width else "…" + shown[-(width - 1):]


def format_trace(steps: list[TraceStep], text_width: int = 40) -> str:
    """A plain-text table: step, chosen token and probability, top candidates, text so far."""
    attends = any(s.source is not None for s in steps)
    rows = [("step", "row", "chosen", "p", "top candidates") + (("attends to (source)",) if attends else ())
            + ("text so far",)]
    for s in steps:
        top = "  ".join(f"{_show(t, 8, token=True)}:{p:.2f}" for t, p in s.top)
        source = ("  ".join(f"{_show(t, 8, token=True)}:{w:.2f}" for t, w in s.source or []),) if attends else ()
        rows.append((str(s.step), str(s.row), _show(s.token, 10, token=True), f"{s.prob:.3f}", top) + source
                    + (_show(s.text, text_width),))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
