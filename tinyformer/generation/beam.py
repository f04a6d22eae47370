"""Beam search, batched over prompts (decoder-only) or sources (seq2seq), scored as transformers does.

A finished hypothesis scores sum(log p) / generated_length ** length_penalty, the generated length counting <eos>.
Each step keeps the 2 x num_beams best continuations; an <eos> among the top num_beams finishes a hypothesis, the
best num_beams others run on. The cache rows are reordered to follow their beams, never recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import kernels
from .decode import next_logits, prefill, rolls
from .processors import NEG_INF, ForcedEOS, GenerationError, History, SuppressTokens


@dataclass
class Beam:
    tokens: list[int]  # generated tokens, without a final <eos>
    score: float  # length-normalised
    logprob: float  # sum of token log-probabilities (including <eos>)
    finish_reason: str  # "eos" or "length"


@torch.inference_mode()
def beam_search(model, prompt: list[int], **options) -> list[Beam]:
    """The best hypotheses for one prompt, best first (see beam_search_batch for the options)."""
    return beam_search_batch(model, [prompt], **options)[0]


@torch.inference_mode()
def beam_search_batch(model, prompts: list[list[int]], *, num_beams: int, max_new_tokens: int, eos_ids,
                      pad_id: int = 0, length_penalty: float = 1.0, early_stopping: bool = False, penalties=(),
                      use_cache: bool = True, num_return_sequences: int = 1, window: str = "auto",
                      sources=None) -> list[list[Beam]]:
    """Beam search over a batch of prompts at once: every prompt keeps num_beams rows in one decoder batch, and
    a prompt whose search is over leaves the batch. A prompt's result never depends on the others in the batch.

    For a seq2seq model, prompts are the decoder's start tokens and sources the encoder inputs (ids, mask), one
    per prompt; the beams of a source share its cross-attention keys and values in the cache.
    """
    if not (isinstance(num_beams, int) and num_beams >= 1):
        raise GenerationError(f"num_beams must be a positive integer, got {num_beams}")
    if not 1 <= num_return_sequences <= num_beams:
        raise GenerationError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")
    eos_ids = set(eos_ids)
    vocab = model.config.vocab_size
    rolling = rolls(model, window)
    logits, cache = prefill(model, prompts, pad_id, max_new_tokens, use_cache, rolling, sources)
    searches = [_Search(list(p), num_beams, length_penalty) for p in prompts]
    active, group = list(range(len(prompts))), 1  # prompts still searching (in row order), rows per prompt
    scores = torch.zeros(len(prompts), device=logits.device)  # each row's sum of log-probabilities
    # Penalties that only ban tokens (a Marian model's <pad>; a forced <eos> does nothing before its step) leave
    # the whole step to kernels.beam_topk; any other penalty reads the log-probabilities.
    banned = sorted({t for p in penalties if isinstance(p, SuppressTokens) for t in p.ids})
    banned = torch.tensor(banned, device=logits.device) if banned else None
    only_bans = all(isinstance(p, (SuppressTokens, ForcedEOS)) for p in penalties)
    forced_steps = {p.last for p in penalties if isinstance(p, ForcedEOS)}
    for step in range(max_new_tokens):
        k = min(2 * num_beams, group * vocab)
        if only_bans and step not in forced_steps:
            values, indices = kernels.beam_topk(logits, scores, group, k, banned)
        else:
            logprobs = logits.float()  # written over: the step's logits are not read again
            logprobs = (torch.log_softmax(logprobs, -1, out=logprobs) if logprobs.is_contiguous()
                        else logprobs.log_softmax(-1))
            history = History([searches[p].prompt + tokens for p in active for tokens in searches[p].running],
                              generated=step)
            for penalty in penalties:
                logprobs = penalty(logprobs, history)
            # in place: one [rows, vocabulary] tensor less a step (4 MB at batch 32 x beam 4 x 8k tokens)
            values, indices = kernels.topk(logprobs.add_(scores.unsqueeze(1)).view(len(active), group * vocab), k)
        last_step = step == max_new_tokens - 1
        kept, parents, tokens, next_scores = [], [], [], []
        for i, (p, row_values, row_indices) in enumerate(zip(active, values.tolist(), indices.tolist())):
            chosen = searches[p].advance(row_values, row_indices, vocab, eos_ids, last_step, step, early_stopping)
            if chosen:
                kept.append(p)
                for beam, token, score in chosen:
                    parents.append(i * group + beam)
                    tokens.append(token)
                    next_scores.append(score)
        if not kept:
            break
        active, group = kept, num_beams
        order = torch.tensor(parents, device=logits.device)
        if cache is not None:
            cache.select(order, group=num_beams)
        scores = torch.tensor(next_scores, device=logits.device)
        rows = [searches[p].prompt + tokens for p in active for tokens in searches[p].running]
        row_sources = None
        if sources is not None:  # only read when the step is recomputed (no cache)
            index = torch.tensor(active, device=logits.device).repeat_interleave(group)
            row_sources = (sources[0][index], sources[1][index])
        last = torch.tensor(tokens, device=logits.device)
        logits, cache = next_logits(model, cache, rows, last, pad_id, max_new_tokens, use_cache, rolling,
                                    row_sources)
    return [search.finished[:num_return_sequences] for search in searches]


class _Search:
    """One prompt's beams: the running hypotheses and the best finished ones."""

    def __init__(self, prompt: list[int], num_beams: int, length_penalty: float):
        self.prompt, self.num_beams, self.length_penalty = prompt, num_beams, length_penalty
        self.running: list[list[int]] = [[]]  # generated tokens of each running beam
        self.finished: list[Beam] = []

    def _finish(self, tokens: list[int], logprob: float, reason: str) -> None:
        length = len(tokens) + (reason == "eos")
        self.finished.append(Beam(tokens, logprob / length ** self.length_penalty, logprob, reason))
        self.finished.sort(key=lambda b: b.score, reverse=True)
        del self.finished[self.num_beams:]

    def advance(self, values, indices, vocab, eos_ids, last_step, step, early_stopping):
        """Take this step's best 2 x num_beams candidates (sorted); -> the num_beams (parent beam, token, score)
        to run on, or None when this prompt's search is over."""
        K = self.num_beams
        chosen = []
        for rank, (score, index) in enumerate(zip(values, indices)):
            if score == NEG_INF:
                break  # only dead beams (padding, below) or banned tokens remain
            beam, token = divmod(index, vocab)
            if token in eos_ids or last_step:
                if rank < K:  # only the top num_beams may finish; the rest are spares
                    ended = token in eos_ids
                    self._finish(self.running[beam] + ([] if ended else [token]), score, "eos" if ended else "length")
                continue
            if len(chosen) < K:
                chosen.append((beam, token, score))
        if last_step or not chosen:
            return None
        if len(self.finished) == K:
            if early_stopping:
                return None
            # transformers' heuristic: the best running beam, scored at its current length, cannot win any more
            if chosen[0][2] / (step + 1) ** self.length_penalty <= self.finished[-1].score:
                return None
        # Every prompt keeps exactly num_beams rows (its source's cross-attention is shared by a fixed group);
        # when fewer continuations exist (a tiny vocabulary), dead beams scored -inf fill the group.
        chosen += [(chosen[0][0], chosen[0][1], NEG_INF)] * (K - len(chosen))
        self.running = [self.running[beam] + [token] for beam, token, _ in chosen]
        return chosen
