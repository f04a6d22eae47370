"""Continuous batching: independent requests share one running decode batch over one KV cache.

Between two decode steps, new requests are prefilled (together, left-padded) and their cache rows joined to the
running batch (`KVCache.add_rows`); requests that finished or whose client left are dropped (`KVCache.select`), so
the batch never waits for its slowest member and a cancelled request costs nothing from the next step on.

Every request keeps its own processors, stop strings and random generator, and the model computes each row of a
batch independently, so a request's tokens do not depend on what else is in the batch: with a seed it samples the
same tokens, and greedy decoding gives the tokens it gives alone (up to float rounding of the batched products,
which does not move an argmax unless two logits tie to ~1e-6).

The engine is `Batcher`: `submit()` from any thread, `step()` runs one iteration (tests drive it by hand),
`start()` runs steps on a background thread whenever there is work. Each generated token is handed to the
request's `on_output` callback as an `Output`.

Seq2seq models are served the same way: a request's prompt is the source. Its encoder runs once, in the prefill of
the requests joining with it; its decoder row starts from the decoder's start token, and the cache rows carry each
source's cross-attention keys, values and mask in and out of the batch with the decoder rows (`KVCache.add_rows`,
`KVCache.select`).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model import kernels
from ..model.quant import cache_dtype
from .api import check_token_ids, decoder_start, encode_prompt
from .cache import KVCache
from .decode import left_pad, pad_sources, sample
from .processors import GenerationError, History, PresenceFrequencyPenalty, build_processors
from .text import TextTracker


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; try again later."""


@dataclass
class Options:
    """What one request asks for; the meaning of each field is `tinyformer.generate`'s (OpenAI's)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; N: the chosen token's and its N best alternatives
    prompt_logprobs: bool = False  # also score the prompt tokens (OpenAI's echo with logprobs)
    # what a model's own config asks of every generation (LanguageModel.generation_defaults: a Marian model bans
    # <pad> and forces a final <eos>, as transformers does)
    suppress_token_ids: list[int] = field(default_factory=list)
    forced_eos_token_id: int | None = None


@dataclass
class Output:
    """One step of one request: the token it produced (None when it ended on an end-of-sequence token), the text
    that became final with it, and, on its last step, why it finished ("stop", "length" or "cancelled")."""

    token: int | None
    text: str | None  # None when the model has no tokenizer
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: str | None = None


class Sequence:
    """One request being generated: its prompt, processors, generator, text tracker and results so far.
    For a seq2seq model `source` is the request's prompt (the encoder's input) and `prompt` the decoder's start."""

    def __init__(self, prompt: list[int], options: Options, tokenizer, eos_ids: set[int], device,
                 on_output: Callable[[Output], None], source: list[int] | None = None):
        self.prompt, self.options, self.on_output = list(prompt), options, on_output
        self.source = None if source is None else list(source)
        self.penalties, self.samplers, self.greedy = build_processors(
            temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, min_p=options.min_p,
            repetition_penalty=options.repetition_penalty, presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty, suppress_token_ids=options.suppress_token_ids,
            forced_eos_token_id=options.forced_eos_token_id, max_new_tokens=options.max_tokens)
        self.generator = torch.Generator(device=device)
        if options.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(options.seed)
        self.eos_ids = eos_ids | set(options.stop_token_ids)
        self.tracker = TextTracker(tokenizer, options.stop) if tokenizer is not None else None
        self.tokens = list(prompt)  # prompt + generated, what the penalties look at
        self.counts: torch.Tensor | None = None  # [1, V] generated-token counts, for presence/frequency
        self.generated: list[int] = []  # output tokens (an ending end-of-sequence token is not one)
        self.steps = 0  # tokens the model produced for this request, an end-of-sequence token included
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # prompt tokens 1..
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        """The tokens the request gave (its source, for a seq2seq model): what usage counts as the prompt."""
        return len(self.source if self.source is not None else self.prompt)

    def cancel(self) -> None:
        """Stop generating at the next step (safe from any thread)."""
        self.cancelled = True

    def choose(self, logits: torch.Tensor, greedy_choice: int) -> int:
        """The next token from this row's logits [1, V] (penalties, then greedy or this request's sampler)."""
        if not self.penalties and self.greedy:
            return greedy_choice
        history = History([self.tokens], self.counts, generated=self.steps)
        logits = logits.clone()
        for penalty in self.penalties:
            logits = penalty(logits, history)
        if self.greedy:
            return int(logits.argmax(-1))
        return int(sample(logits, self.samplers, history, self.generator))

    def accept(self, token: int, logprob: float | None, top) -> None:
        """Record a produced token and hand the caller what it made final."""
        self.steps += 1
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens.append(token)
        if self.counts is not None:
            self.counts[0, token] += 1
        tracker = self.tracker
        if token in self.eos_ids:
            self.finish_reason = "stop"
            token = None
        else:
            self.generated.append(token)
            if tracker is not None:
                tracker.add(token)
                if tracker.stopped:
                    self.finish_reason = "stop"
            if self.finish_reason is None and self.steps >= self.options.max_tokens:
                self.finish_reason = "length"
        text = None
        if tracker is not None:
            if self.finish_reason is not None:
                tracker.flush()  # the last bytes, even if they are not valid UTF-8
                if tracker.stopped:
                    self.finish_reason = "stop"
            text = tracker.delta(final=self.finish_reason is not None)
        self.on_output(Output(token, text, logprob, top, self.finish_reason))

    def end(self, reason: str, error: str | None = None) -> None:
        """Finish without a new token (cancelled, max_tokens=0, or an engine error)."""
        self.finish_reason = reason
        text = None
        if self.tracker is not None:
            self.tracker.flush()
            text = self.tracker.delta(final=True)
        self.on_output(Output(None, text, finish_reason=reason, error=error))


class Batcher:
    """The continuous-batching engine for one model, decoder-only or seq2seq (see the module docstring).

    max_batch: rows decoded together at most; max_queue: requests waiting to join at most (then QueueFull).
    Counters (read them from any thread): steps, prompt_tokens, generated_tokens, cancelled, finished.
    on_step(batch_size, seconds) is called after every decode step (for metrics).
    """

    def __init__(self, model, tokenizer, *, source_tokenizer=None, max_batch: int = 16, max_queue: int = 64,
                 on_step: Callable[[int, float], None] | None = None):
        """source_tokenizer: a seq2seq model's reader of prompts (default: tokenizer)."""
        if getattr(model, "absolute_positions", None) is None:
            raise GenerationError(f"{type(model).__name__} is not a tinyformer model the batcher can serve")
        self.model, self.tokenizer = model, tokenizer
        self.seq2seq = model.config.architecture == "seq2seq"
        self.source_tokenizer = (source_tokenizer or tokenizer) if self.seq2seq else tokenizer
        self.start_id = decoder_start(model, tokenizer) if self.seq2seq else None
        reader = self.source_tokenizer
        self.source_pad_id = reader.pad_id if reader is not None and reader.pad_id is not None else 0
        self.max_batch, self.max_queue, self.on_step = max_batch, max_queue, on_step
        self.context = model.config.context_length
        param = next(model.parameters())
        self.device, self.dtype = param.device, cache_dtype(model)
        self.eos_ids = {tokenizer.eos_id} if tokenizer is not None and tokenizer.eos_id is not None else set()
        self.pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence] = []  # the running batch, in cache-row order
        self.cache: KVCache | None = None
        self.logits: torch.Tensor | None = None  # [rows, V]: each row's next-token logits
        self.steps = self.prompt_tokens = self.generated_tokens = self.cancelled = self.finished = 0
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---------------------------------------------------------------- requests
    def encode(self, text: str) -> list[int]:
        """The token ids a text prompt becomes (a seq2seq source, read by the source tokenizer, ends with <eos>)."""
        if self.source_tokenizer is None:
            raise GenerationError("this model has no tokenizer: send the prompt as token ids")
        return encode_prompt(self.source_tokenizer, text, source=self.seq2seq)

    def make(self, prompt: list[int], options: Options, on_output: Callable[[Output], None]) -> Sequence:
        """Validate one request (GenerationError names the bad value) and build its Sequence. For a seq2seq model
        the prompt is the source."""
        if not prompt:
            raise GenerationError("the prompt is empty; give at least one token")
        if not isinstance(options.max_tokens, int) or options.max_tokens < 0:
            raise GenerationError(f"max_tokens must be a non-negative integer, got {options.max_tokens}")
        source = None
        if self.seq2seq:
            source, prompt = prompt, [self.start_id]
            check_token_ids([source], self.model.config.source_vocab_size, self.source_tokenizer)
            if self.model.absolute_positions and len(source) > self.context:
                raise GenerationError(f"the source is {len(source)} tokens, longer than this model's {self.context} "
                                      "source positions; shorten it")
            if options.max_tokens > self.context:  # the decoder's positions: start token + max_tokens - 1 fed
                raise GenerationError(f"this model writes at most {self.context} target tokens; max_tokens is "
                                      f"{options.max_tokens}")
            if options.prompt_logprobs:
                raise GenerationError("a seq2seq model's prompt is its source, which it does not score: "
                                      "prompt logprobs (echo with logprobs) need a decoder-only model")
        else:
            check_token_ids([prompt], self.model.config.vocab_size, self.tokenizer)
            if len(prompt) + options.max_tokens > self.context:
                raise GenerationError(
                    f"this model's context is {self.context} tokens; the prompt has {len(prompt)} and max_tokens is "
                    f"{options.max_tokens} ({len(prompt) + options.max_tokens} in all): shorten the prompt or lower "
                    "max_tokens")
        if options.logprobs is not None and (not isinstance(options.logprobs, int) or options.logprobs < 0):
            raise GenerationError(f"logprobs must be a non-negative integer, got {options.logprobs}")
        if options.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
        check_token_ids([list(options.stop_token_ids)], self.model.config.vocab_size, self.tokenizer)
        sequence = Sequence(prompt, options, self.tokenizer, self.eos_ids, self.device, on_output, source)
        if any(isinstance(p, PresenceFrequencyPenalty) for p in sequence.penalties):
            sequence.counts = torch.zeros(1, self.model.config.vocab_size, device=self.device)
        return sequence

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue sequences to join the batch (all or none: QueueFull when the queue has no room for them)."""
        with self._wake:
            if any(s.cancelled for s in self.waiting):  # clients that left while waiting free their places
                for s in self.waiting:
                    if s.cancelled:
                        s.end("cancelled")
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the limit is {self.max_queue})")
            self.waiting.extend(sequences)
            self._wake.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    # ---------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting requests, choose one token for every running row, run the model once. False if idle."""
        with self._wake:
            joining = []
            while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    sequence.end("cancelled")
                else:
                    joining.append(sequence)
        if joining:
            self._prefill(joining)
        # rows whose client left, or that asked for no new tokens (scoring a prompt), leave before sampling
        leaving = [s for s in self.rows if s.cancelled or s.options.max_tokens == 0]
        if leaving:
            for s in leaving:
                self.cancelled += s.cancelled
                s.end("cancelled" if s.cancelled else "length")
            self._keep([i for i, s in enumerate(self.rows) if s.finish_reason is None])
        if not self.rows:
            return bool(joining)

        started = time.perf_counter()
        tokens = self._choose()
        self.generated_tokens += len(tokens)
        keep = [i for i, s in enumerate(self.rows) if s.finish_reason is None]
        self.finished += len(self.rows) - len(keep)
        self._keep(keep)
        if self.rows:
            self.cache.reserve(1, self.context)
            fed = torch.tensor([tokens[i] for i in keep], device=self.device).unsqueeze(1)
            self.logits = self.model(fed, cache=self.cache)[:, -1]
        self.steps += 1
        if self.on_step is not None:
            self.on_step(len(tokens), time.perf_counter() - started)
        return True

    def _prefill(self, joining: list[Sequence]) -> None:
        """Run the new prompts together (left-padded; seq2seq: their sources encoded together, right-padded) and
        join their cache rows and logits to the batch."""
        prompts = [s.prompt for s in joining]
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        width = ids.shape[1]
        cache = KVCache(self.model.config, len(prompts), width, self.dtype, self.device)
        scored = any(s.options.prompt_logprobs for s in joining)
        sources = {}
        if self.seq2seq:
            source_ids, source_mask = pad_sources([s.source for s in joining], self.source_pad_id, self.device)
            sources = {"source_ids": source_ids, "source_mask": source_mask}
        logits = self.model(ids, attention_mask=mask, cache=cache, last_only=not scored, **sources)
        if scored:
            for row, s in enumerate(joining):
                if s.options.prompt_logprobs:
                    s.prompt_logprobs = self._score_prompt(logits[row, width - len(s.prompt):], s)
        self.prompt_tokens += sum(s.prompt_tokens for s in joining)
        last = logits[:, -1]
        if self.rows:
            self.cache.add_rows(cache)
            self.logits = torch.cat((self.logits, last))
        else:
            self.cache, self.logits = cache, last
        self.rows.extend(joining)

    def _score_prompt(self, logits: torch.Tensor, s: Sequence):
        """(logprob, top-N alternatives) of each prompt token after the first, from the prefill's logits."""
        logprobs = logits[:-1].float().log_softmax(-1)
        targets = torch.tensor(s.prompt[1:], device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        top = self._top(logprobs, s.options.logprobs or 0)
        return [(lp, alts) for lp, alts in zip(chosen, top)]

    @staticmethod
    def _top(logprobs: torch.Tensor, n: int) -> list[list[tuple[int, float]]]:
        if n == 0:
            return [[] for _ in range(logprobs.shape[0])]
        values, ids = logprobs.topk(min(n, logprobs.shape[-1]), dim=-1)
        return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def _choose(self) -> list[int]:
        logits = self.logits.float()
        greedy = kernels.argmax(logits).tolist()
        wants = [s.options.logprobs for s in self.rows]
        logprobs = logits.log_softmax(-1) if any(w is not None for w in wants) else None
        tokens = [s.choose(logits[i:i + 1], greedy[i]) for i, s in enumerate(self.rows)]
        chosen = top = None
        if logprobs is not None:
            chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
            top = self._top(logprobs, max(w or 0 for w in wants))
        for i, (s, token) in enumerate(zip(self.rows, tokens)):
            if wants[i] is None:
                s.accept(token, None, None)
            else:
                s.accept(token, chosen[i], top[i][:wants[i]])
        return tokens

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.logits = None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.select(index)
        self.logits = self.logits.index_select(0, index)

    # ---------------------------------------------------------------- background thread
    def start(self) -> "Batcher":
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tinyformer-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self.rows and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # a bad batch must not take the server down: fail its requests, go on
                message = f"generation failed: {type(error).__name__}: {error}"
                for s in self.rows:
                    s.end("error", message)
                self.rows, self.cache, self.logits = [], None, None
