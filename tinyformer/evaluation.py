"""Scoring a translation model on held-out pairs: loss by teacher forcing, then decoding every source and scoring
the outputs with sacrebleu (corpus BLEU, chrF) and exact match."""
from __future__ import annotations

import math
import re

import torch

from .data import PairData

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def bleu_tokenizer(references: list[str]) -> str:
    """sacrebleu's tokenizer for these references: `zh` when they are mostly Chinese/Japanese, else its 13a."""
    cjk = sum(len(CJK.findall(r)) for r in references)
    return "zh" if cjk > 0.3 * max(1, sum(len(r) for r in references)) else "13a"


@torch.inference_mode()
def teacher_forced_loss(lm, pairs: list[tuple[str, str]], batch_tokens: int = 4096) -> tuple[float, int]:
    """Mean per-token loss of the targets given the sources (-> loss, tokens scored)."""
    data = PairData.from_pairs(pairs, lm.tokenizer, lm.source_tokenizer, val_fraction=1.0,
                               context_length=lm.model.config.context_length, batch_tokens=batch_tokens)
    total, count = 0.0, 0
    for inputs, targets in data.all_batches("val"):
        inputs = {k: v.to(lm.device) for k, v in inputs.items()}
        logits = lm.model(**inputs)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.to(lm.device).flatten(),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count, count


def evaluate_translation(lm, pairs: list[tuple[str, str]], *, num_beams: int = 1, batch_size: int = 64,
                         max_new_tokens: int | None = None, bleu_tokenize: str | None = None,
                         progress: bool = True) -> dict:
    """Loss, BLEU, chrF and exact match of lm on (source, reference) pairs; sources decoded in batches."""
    import sacrebleu
    from tqdm.auto import tqdm

    sources = [s for s, _ in pairs]
    references = [t for _, t in pairs]
    loss, tokens = teacher_forced_loss(lm, pairs)
    limit = max_new_tokens or lm.model.config.context_length
    hypotheses: list[str] = []
    with tqdm(total=len(sources), disable=not progress, unit="sentence", desc="translating") as bar:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            hypotheses += lm.generate(chunk, max_new_tokens=limit, temperature=0, num_beams=num_beams)
            bar.update(len(chunk))
    tokenize = bleu_tokenize or bleu_tokenizer(references)
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize)
    chrf = sacrebleu.corpus_chrf(hypotheses, [references])
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(pairs)
    return {"pairs": len(pairs), "tokens": tokens, "loss": loss, "perplexity": math.exp(loss), "bleu": bleu.score,
            "chrf": chrf.score, "exact_match": exact, "bleu_tokenize": tokenize, "num_beams": num_beams,
            "hypotheses": hypotheses}
