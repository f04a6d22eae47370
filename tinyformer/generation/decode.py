"""The autoregressive loop: prefill the prompts once, then one token per step for every active row.

Prompts of different lengths are left-padded into one batch; the attention mask and per-row position ids make each
row compute exactly what it would alone. Finished rows are dropped from the batch (and the cache) so they stop
costing work. When the text outgrows the context window it slides: RoPE models roll their cache (attention only sees
relative positions: each token attends to the cached keys of the last `context_length` tokens, i.e. sliding-window
attention as in Mistral), models with absolute positions recompute the window, which equals running the model on the
last `context_length` tokens. `window="recompute"` asks for that exact cropping on RoPE models too.

Seq2seq models decode the same way: every row starts from the decoder's start token, and `sources` (the encoder's
input ids and mask, one row per decoder row) is encoded once at prefill and kept in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import kernels
from ..model.quant import cache_dtype
from .cache import KVCache
from .processors import GenerationError, History, TopK


@dataclass
class Step:
    """One decoding step: the token each active row produced (rows are indices into the original prompts)."""

    rows: list[int]
    tokens: list[int]
    logprobs: list[float] | None = None  # log-probability of each chosen token under the model
    top: list[list[tuple[int, float]]] | None = None  # each row's top-N (token, logprob) alternatives
    cross_attention: torch.Tensor | None = None  # seq2seq: [rows, source length], averaged over layers and heads


def sample(logits: torch.Tensor, samplers, history: History, generator: torch.Generator) -> torch.Tensor:
    """Apply the samplers in order and draw one token per row.

    Top-k shrinks the candidates to k columns instead of masking V of them, so the samplers after it (top-p sorts
    its input) work on k values, not the whole vocabulary.
    """
    candidates = None
    for sampler in samplers:
        if isinstance(sampler, TopK):
            logits, candidates = logits.topk(min(sampler.k, logits.shape[-1]), dim=-1)
        else:
            logits = sampler(logits, history)
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)
    return (candidates.gather(1, choice) if candidates is not None else choice).squeeze(1)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    padded = bool((mask == 0).any())
    return ids.to(device), (mask.to(device) if padded else None)


WINDOWS = ("auto", "roll", "recompute")


def rolls(model, window: str) -> bool:
    """Whether the cache rolls once the context window is full (else the window is recomputed)."""
    if window not in WINDOWS:
        raise GenerationError(f"window {window!r} is not one of {', '.join(WINDOWS)}")
    if model.config.architecture == "seq2seq":
        return False  # the target is capped at the decoder's positions instead (see max_target_tokens)
    if window == "roll" and model.absolute_positions:
        raise GenerationError(f"window='roll' needs relative (rope) positions; this model's are "
                              f"{model.config.positional!r}, use 'recompute' or 'auto'")
    return window == "roll" or (window == "auto" and not model.absolute_positions)


def max_target_tokens(model) -> int | None:
    """How many tokens a seq2seq decoder can write (its positions); None: no limit (the window slides)."""
    return model.config.context_length if model.config.architecture == "seq2seq" else None


def pad_sources(sources: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad encoder inputs -> (ids [B, S], mask [B, S]); right padding keeps each source's positions."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sources), width), dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def prefill(model, rows: list[list[int]], pad_id: int, room: int, use_cache: bool = True, rolling: bool = False,
            sources=None, record_attention: bool = False):
    """Run the model on each row's last `context_length` tokens -> (last logits [B, V], fresh cache or None).

    `room` is how many more tokens may follow, so the cache is sized to what will be used. `sources` (seq2seq):
    (ids, mask) of the encoder input of each row.
    """
    window = model.config.context_length
    ids, mask = left_pad([r[-window:] for r in rows], pad_id, next(model.parameters()).device)
    cache = None
    if use_cache:
        param = next(model.parameters())
        capacity = min(window, max(len(r) for r in rows) + room)
        cache = KVCache(model.config, len(rows), capacity, cache_dtype(model), param.device, rolling=rolling)
    extra = {} if sources is None else {"source_ids": sources[0], "source_mask": sources[1]}
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True, record_attention=record_attention, **extra)
    return logits[:, -1], cache


def next_logits(model, cache, rows: list[list[int]], last: torch.Tensor, pad_id: int, room: int,
                use_cache: bool = True, rolling: bool = False, sources=None, record_attention: bool = False):
    """Logits after appending `last` [B] (already in `rows`): one cached step, or a recomputed window (for a
    seq2seq model, `sources` are then encoded again)."""
    if cache is not None and (cache.length < cache.capacity or cache.rolling):
        return model(last.unsqueeze(1), cache=cache, record_attention=record_attention)[:, -1], cache
    return prefill(model, rows, pad_id, room, use_cache, rolling, sources, record_attention)


def cross_attention(model) -> torch.Tensor:
    """The last step's cross-attention, [rows, source length], averaged over decoder layers and heads."""
    weights = [block.cross_attn.last_weights[:, :, -1] for block in model.decoder]  # [rows, heads, S] each
    return torch.stack(weights).mean(dim=(0, 2))


class TokenStream:
    """Iterate over `Step`s. `finish(row)` ends a row early (a stop string matched, a client left)."""

    def __init__(self, model, prompts: list[list[int]], *, max_new_tokens: int, penalties=(), samplers=(),
                 greedy: bool = True, eos_ids=(), seed: int | None = None, top_n: int = 0, want_logprobs=False,
                 use_cache: bool = True, pad_id: int = 0, window: str = "auto", sources=None,
                 want_attention: bool = False):
        """prompts: each row's tokens so far (for a seq2seq model, the decoder's start token); sources: the
        encoder inputs (ids, mask) of a seq2seq model, one per prompt; want_attention: fill Step.cross_attention."""
        self.model, self.prompts, self.sources, self.want_attention = model, prompts, sources, want_attention
        self.max_new_tokens, self.penalties, self.samplers, self.greedy = max_new_tokens, penalties, samplers, greedy
        self.eos_ids = set(eos_ids)
        self.top_n, self.want_logprobs = top_n, want_logprobs or top_n > 0
        self.use_cache, self.pad_id, self.rolling = use_cache, pad_id, rolls(model, window)
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._finished: set[int] = set()
        self.finish_reasons: dict[int, str] = {}

    def finish(self, row: int, reason: str = "stop") -> None:
        if row not in self.finish_reasons:
            self.finish_reasons[row] = reason
        self._finished.add(row)

    @torch.inference_mode()
    def __iter__(self):
        history = History([list(p) for p in self.prompts])
        vocab = self.model.config.vocab_size
        if any(hasattr(p, "presence") for p in self.penalties):
            history.generated_counts = torch.zeros(len(self.prompts), vocab, device=self.device)
        active = list(range(len(self.prompts)))
        room = self.max_new_tokens
        sources = self.sources
        logits, self.cache = prefill(self.model, history.tokens, self.pad_id, room, self.use_cache,
                                     self.rolling, sources, self.want_attention)
        for step in range(self.max_new_tokens):
            logits = logits.float()
            logprobs = logits.log_softmax(-1) if self.want_logprobs else None
            for penalty in self.penalties:
                logits = penalty(logits, history)
            if self.greedy:
                chosen = kernels.argmax(logits)
            else:
                chosen = sample(logits, self.samplers, history, self.generator)
            tokens = chosen.tolist()
            out = Step(list(active), tokens)
            if self.want_attention:
                out.cross_attention = cross_attention(self.model)
            if logprobs is not None:
                out.logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
                if self.top_n:
                    values, ids = logprobs.topk(min(self.top_n, vocab), dim=-1)
                    out.top = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
            for row_tokens, token in zip(history.tokens, tokens):
                row_tokens.append(token)
            history.generated += 1
            if history.generated_counts is not None:
                history.generated_counts[torch.arange(len(tokens)), chosen] += 1
            yield out  # the consumer may call finish() here

            last_step = step == self.max_new_tokens - 1
            for row, token in zip(active, tokens):
                if token in self.eos_ids:
                    self.finish(row, "eos")
                elif last_step:
                    self.finish(row, "length")
            keep = [i for i, row in enumerate(active) if row not in self._finished]
            if not keep or last_step:
                break
            if len(keep) < len(active):
                active = [active[i] for i in keep]
                history.select(keep)
                chosen = chosen[keep]
                keep_rows = torch.tensor(keep, device=self.device)
                if self.cache is not None:
                    self.cache.select(keep_rows)
                if sources is not None:
                    sources = (sources[0][keep_rows], sources[1][keep_rows])
            logits, self.cache = next_logits(self.model, self.cache, history.tokens, chosen, self.pad_id, room,
                                             self.use_cache, self.rolling, sources, self.want_attention)
