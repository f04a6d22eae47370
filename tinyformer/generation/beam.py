"""Beam search for decoder-only models, scored as transformers does.

A finished hypothesis scores sum(log p) / generated_length ** length_penalty, the generated length counting <eos>.
Each step keeps the 2 x num_beams best continuations; an <eos> among the top num_beams finishes a hypothesis, the
best num_beams others run on. The cache rows are reordered to follow their beams, never recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode import next_logits, prefill, rolls
from .processors import GenerationError, History


@dataclass
class Beam:
    tokens: list[int]  # generated tokens, without a final <eos>
    score: float  # length-normalised
    logprob: float  # sum of token log-probabilities (including <eos>)
    finish_reason: str  # "eos" or "length"


@torch.inference_mode()
def beam_search(model, prompt: list[int], *, num_beams: int, max_new_tokens: int, eos_ids, pad_id: int = 0,
                length_penalty: float = 1.0, early_stopping: bool = False, penalties=(), use_cache: bool = True,
                num_return_sequences: int = 1, window: str = "auto") -> list[Beam]:
    if not (isinstance(num_beams, int) and num_beams >= 1):
        raise GenerationError(f"num_beams must be a positive integer, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise GenerationError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
    eos_ids = set(eos_ids)
    vocab = model.config.vocab_size
    rolling = rolls(model, window)
    logits, cache = prefill(model, [prompt], pad_id, max_new_tokens, use_cache, rolling)
    running = [[]]  # generated tokens of each running beam
    running_scores = torch.zeros(1, device=logits.device)
    finished: list[Beam] = []

    def add_finished(tokens, logprob, reason):
        finished.append(Beam(tokens, logprob / (len(tokens) + (reason == "eos")) ** length_penalty, logprob, reason))
        finished.sort(key=lambda b: b.score, reverse=True)
        del finished[num_beams:]

    for step in range(max_new_tokens):
        logprobs = logits.float().log_softmax(-1)
        history = History([prompt + tokens for tokens in running])
        for penalty in penalties:
            logprobs = penalty(logprobs, history)
        totals = (running_scores.unsqueeze(1) + logprobs).view(-1)
        values, indices = totals.topk(min(2 * num_beams, totals.numel()))
        last_step = step == max_new_tokens - 1
        next_beams, next_tokens, next_scores = [], [], []
        for rank, (score, index) in enumerate(zip(values.tolist(), indices.tolist())):
            beam, token = divmod(index, vocab)
            if token in eos_ids or last_step:
                if rank < num_beams:  # only the top num_beams may finish; the rest are spares
                    reason = "eos" if token in eos_ids else "length"
                    add_finished(running[beam] + ([] if token in eos_ids else [token]), score, reason)
                continue
            if len(next_beams) < num_beams:
                next_beams.append(beam)
                next_tokens.append(token)
                next_scores.append(score)
        if last_step or not next_beams:
            break
        if len(finished) == num_beams:
            if early_stopping:
                break
            # transformers' heuristic: the best running beam, scored at its current length, cannot win any more
            best_running = next_scores[0] / (step + 1) ** length_penalty
            if best_running <= finished[-1].score:
                break
        running = [running[b] + [t] for b, t in zip(next_beams, next_tokens)]
        running_scores = torch.tensor(next_scores, device=logits.device)
        order = torch.tensor(next_beams, device=logits.device)
        if cache is not None:
            cache.select(order)
        last = torch.tensor(next_tokens, device=logits.device)
        logits, cache = next_logits(model, cache, [prompt + r for r in running], last, pad_id, max_new_tokens,
                                    use_cache, rolling)
    return finished[:num_return_sequences]
