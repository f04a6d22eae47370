"""Decoding strategies as small composable logits processors.

Each processor takes float32 logits [B, V] and the history of each row, returns new logits, and validates its own
parameter. `build_processors` applies them in this documented order:

  1. repetition penalty (CTRL: over prompt + generated tokens, positive logits / p, negative logits * p)
  2. presence and frequency penalties (OpenAI's additive meaning, over generated tokens only)
  3. no-repeat-ngram (over prompt + generated tokens)
  3b. suppressed tokens (never chosen: Marian models ban <pad>), then a forced <eos> at the last allowed step
      (transformers' forced_eos_token_id); these two run under beam search too
  4. temperature (0 means greedy: the argmax of the penalised logits, later steps skipped)
  5. top-k, 6. top-p (inclusive: keeps the smallest set whose probability reaches p, always at least one token),
  7. min-p (drops tokens less likely than min_p x the most likely one)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


class GenerationError(ValueError):
    """A generation parameter outside what it allows; the message names it."""


@dataclass
class History:
    """What the processors may look at: every row's tokens so far, and counts of the generated ones."""

    tokens: list[list[int]]  # prompt + generated, per row (no padding)
    generated_counts: torch.Tensor | None = None  # [B, V] float, only when a penalty needs it
    generated: int = 0  # tokens each running row has generated so far (rows advance together)

    def select(self, rows: list[int]) -> None:
        self.tokens = [self.tokens[r] for r in rows]
        if self.generated_counts is not None:
            self.generated_counts = self.generated_counts[rows]


class RepetitionPenalty:
    def __init__(self, penalty: float):
        if not penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty = penalty

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        for row, tokens in enumerate(history.tokens):
            ids = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=logits.device)
            if len(ids):
                seen = logits[row, ids]
                logits[row, ids] = torch.where(seen > 0, seen / self.penalty, seen * self.penalty)
        return logits


class PresenceFrequencyPenalty:
    """logit -= presence * (count > 0) + frequency * count, counting generated tokens (as OpenAI and vLLM do)."""

    def __init__(self, presence: float, frequency: float):
        for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
            if not -2.0 <= value <= 2.0:
                raise GenerationError(f"{name} must be in [-2, 2], got {value}")
        self.presence, self.frequency = presence, frequency

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        counts = history.generated_counts
        return logits - self.presence * (counts > 0).to(logits.dtype) - self.frequency * counts


class NoRepeatNGram:
    """Ban any token that would complete an n-gram already present in the row."""

    def __init__(self, n: int):
        if not (isinstance(n, int) and n > 0):
            raise GenerationError(f"no_repeat_ngram_size must be a positive integer, got {n}")
        self.n = n

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        n = self.n
        for row, tokens in enumerate(history.tokens):
            if len(tokens) < n:
                continue
            prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
            banned = {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix}
            if banned:
                logits[row, list(banned)] = NEG_INF
        return logits


class SuppressTokens:
    """These token ids are never chosen (transformers' bad_words_ids of single tokens, suppress_tokens)."""

    def __init__(self, token_ids):
        ids = sorted(set(token_ids))
        if not all(isinstance(t, int) and t >= 0 for t in ids):
            raise GenerationError(f"suppress_token_ids must be non-negative token ids, got {token_ids}")
        self.ids = ids
        self._index = None  # the ids as a tensor on the logits' device, made at the first call

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        if self._index is None or self._index.device != logits.device:
            self._index = torch.tensor(self.ids, dtype=torch.long, device=logits.device)
        return logits.index_fill_(-1, self._index, NEG_INF)  # one op; indexing with the list built an index a step


class ForcedEOS:
    """At the last of max_new_tokens steps only token_id may be chosen (transformers' forced_eos_token_id): a text
    cut by the length limit still ends with <eos>."""

    def __init__(self, token_id: int, max_new_tokens: int):
        if not (isinstance(token_id, int) and token_id >= 0):
            raise GenerationError(f"forced_eos_token_id must be a token id, got {token_id}")
        self.token_id, self.last = token_id, max_new_tokens - 1

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        if history.generated != self.last:
            return logits
        forced = torch.full_like(logits, NEG_INF)
        forced[:, self.token_id] = 0.0
        return forced


class Temperature:
    def __init__(self, temperature: float):
        if not temperature > 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        return logits / self.temperature


class TopK:
    def __init__(self, k: int):
        if not (isinstance(k, int) and k > 0):
            raise GenerationError(f"top_k must be a positive integer (0 disables it), got {k}")
        self.k = k

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        k = min(self.k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP:
    def __init__(self, p: float):
        if not 0.0 < p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1], got {p}")
        self.p = p

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # keep a token while the mass of the tokens ranked above it is still short of p: the token that reaches
        # p is kept (inclusive), and the first token always is
        drop_sorted = mass_before >= self.p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        return logits.masked_fill(drop, NEG_INF)


class MinP:
    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise GenerationError(f"min_p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        probs = logits.softmax(-1)
        threshold = self.p * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < threshold, NEG_INF)


def build_processors(*, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                     repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     no_repeat_ngram_size: int = 0, suppress_token_ids=None, forced_eos_token_id: int | None = None,
                     max_new_tokens: int | None = None) -> tuple[list, list, bool]:
    """Return (penalties, samplers, greedy): penalties run first; samplers only when sampling."""
    if temperature is None or temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k must be a non-negative integer (0 disables it), got {top_k}")
    if not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise GenerationError(f"no_repeat_ngram_size must be a non-negative integer, got {no_repeat_ngram_size}")
    penalties, samplers = [], []
    if repetition_penalty != 1.0:
        penalties.append(RepetitionPenalty(repetition_penalty))
    if presence_penalty or frequency_penalty:
        penalties.append(PresenceFrequencyPenalty(presence_penalty, frequency_penalty))
    if no_repeat_ngram_size:
        penalties.append(NoRepeatNGram(no_repeat_ngram_size))
    if suppress_token_ids:
        penalties.append(SuppressTokens(suppress_token_ids))
    if forced_eos_token_id is not None and max_new_tokens:
        penalties.append(ForcedEOS(forced_eos_token_id, max_new_tokens))
    # validate sampling parameters even under greedy, so a bad value never passes silently
    top_p_step, min_p_step = TopP(top_p), MinP(min_p)
    greedy = temperature == 0
    if not greedy:
        if temperature != 1.0:
            samplers.append(Temperature(temperature))
        if top_k:
            samplers.append(TopK(top_k))
        if top_p < 1.0:
            samplers.append(top_p_step)
        if min_p > 0.0:
            samplers.append(min_p_step)
    return penalties, samplers, greedy
