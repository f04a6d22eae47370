"""`generate`: one function behind the Python API, the CLI and the server.

prompts is a string, a list of strings, a list of token ids, or a list of token-id lists; the result mirrors it
(text for text, ids for ids). Asking for logprobs, a trace or details returns `Completion` objects instead.

For a seq2seq model the prompts are the sources: text is read with the source tokenizer and ends with <eos>
(token-id prompts are given to the encoder as they are), and the result is the target the decoder writes from
its start token. Sources are batched with padding, and each one's output equals its output alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .beam import beam_search_batch
from .decode import TokenStream, max_target_tokens, pad_sources
from .processors import GenerationError, build_processors
from .text import TextTracker
from .trace import TraceStep, trace_step


@dataclass
class Completion:
    text: str | None  # None when the prompt was token ids
    token_ids: list[int]  # generated tokens (a final <eos> is not included)
    finish_reason: str  # "eos", "stop" (a stop string), or "length"
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    score: float | None = None  # beam search: length-normalised log-probability
    alternatives: list["Completion"] = field(default_factory=list)  # beam search: the other best beams
    trace: list[TraceStep] | None = None


def _normalise(prompts, tokenizer, add_eos: bool = False) -> tuple[list[list[int]], bool, bool]:
    """-> (token-id prompts, single, as_text); add_eos ends each text prompt with <eos> (a seq2seq source)."""
    if isinstance(prompts, str):
        prompts, single, as_text = [prompts], True, True
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, int) for p in prompts):
        prompts, single, as_text = [list(prompts)], True, False
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        single, as_text = False, True
    elif isinstance(prompts, (list, tuple)) and prompts and all(
            isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
        single, as_text = False, False
    else:
        raise GenerationError("prompts must be a string, a list of strings, or token ids (a list of ints or of "
                              f"lists of ints), got {type(prompts).__name__}{' (empty)' if not prompts else ''}")
    if as_text:
        if tokenizer is None:
            raise GenerationError("this model has no tokenizer; pass token ids instead of text")
        for i, p in enumerate(prompts):
            if not p:
                raise GenerationError(f"prompt {i} is empty; give at least one character")
        ids = [encode_prompt(tokenizer, p, add_eos) for p in prompts]
    else:
        ids = [list(p) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise GenerationError(f"prompt {i} is empty; give at least one token")
    return ids, single, as_text


def encode_prompt(tokenizer, text: str, source: bool = False) -> list[int]:
    """The token ids a text prompt becomes; a seq2seq source (source=True) ends with <eos>, as in training."""
    return tokenizer.encode(text) + ([tokenizer.eos_id] if source and tokenizer.eos_id is not None else [])


def decoder_start(model, tokenizer) -> int:
    """The token a seq2seq decoder starts from: the config's, else the target tokenizer's <bos>, else 0."""
    start = model.config.decoder_start_id
    if start is None:
        start = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else 0
    return start


def check_token_ids(prompts: list[list[int]], vocab_size: int, tokenizer=None) -> None:
    for p in prompts:
        for t in p:
            if not 0 <= t < vocab_size:
                known = tokenizer is not None and 0 <= t < tokenizer.vocab_size
                shown = f" ({tokenizer.token_text(t)!r})" if known else ""
                raise GenerationError(f"token id {t}{shown} is outside this model's vocabulary of {vocab_size} "
                                      f"(ids 0..{vocab_size - 1})")


def generate(model, tokenizer, prompts, *, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, no_repeat_ngram_size: int = 0, stop=None, stop_token_ids=None,
             seed: int | None = None, num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
             num_return_sequences: int = 1, logprobs: int | None = None, trace: bool = False, details: bool = False,
             stream: bool = False, use_cache: bool = True, window: str = "auto", source_tokenizer=None,
             suppress_token_ids=None, forced_eos_token_id: int | None = None):
    """Generate continuations. See the module docstring for what prompts and the result look like.

    logprobs=N returns each chosen token's log-probability and its N best alternatives (N=0: just the token's).
    stream=True returns an iterator of text deltas (of (index, delta) pairs for several prompts).
    window: how text longer than the context is handled: "recompute" runs the model on the last context_length
    tokens (exact cropping); "roll" keeps a rolling cache (RoPE only; sliding-window attention); "auto" rolls
    when it can.
    suppress_token_ids: ids never generated; forced_eos_token_id: the token the last allowed step must produce
    (Marian models loaded from Hugging Face set both from their config, as transformers does).
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
    if logprobs is not None and (not isinstance(logprobs, int) or logprobs < 0):
        raise GenerationError(f"logprobs must be a non-negative integer (alternatives per token), got {logprobs}")
    if isinstance(stop, str):
        stop = [stop]
    seq2seq = model.config.architecture == "seq2seq"
    source_tokenizer = source_tokenizer or tokenizer
    ids, single, as_text = _normalise(prompts, source_tokenizer if seq2seq else tokenizer, add_eos=seq2seq)
    sources = None
    if seq2seq:
        check_token_ids(ids, model.config.source_vocab_size, source_tokenizer)
        if max(len(p) for p in ids) > model.config.context_length and model.absolute_positions:
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            raise GenerationError(f"source {longest} is {len(ids[longest])} tokens with its <eos>, longer than this "
                                  f"model's {model.config.context_length} source positions; shorten it")
        start = decoder_start(model, tokenizer)
        source_pad = source_tokenizer.pad_id if source_tokenizer is not None else 0
        sources = pad_sources(ids, source_pad, next(model.parameters()).device)
        ids = [[start] for _ in ids]  # what the decoder has written so far
        max_new_tokens = min(max_new_tokens, max_target_tokens(model))
    else:
        check_token_ids(ids, model.config.vocab_size, tokenizer)
    penalties, samplers, greedy = build_processors(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, suppress_token_ids=suppress_token_ids,
        forced_eos_token_id=forced_eos_token_id, max_new_tokens=max_new_tokens)
    if stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
    eos_ids = set(stop_token_ids or [])
    if tokenizer is not None and tokenizer.eos_id is not None:
        eos_ids.add(tokenizer.eos_id)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    rich = details or trace or logprobs is not None or num_return_sequences > 1

    if num_beams != 1:
        if stream:
            raise GenerationError("stream=True cannot be combined with beam search (num_beams > 1)")
        if trace or logprobs is not None:
            raise GenerationError("trace and logprobs follow one sampled or greedy path; they cannot be combined "
                                  "with beam search (num_beams > 1)")
        searches = beam_search_batch(model, ids, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                     eos_ids=eos_ids, pad_id=pad_id, length_penalty=length_penalty,
                                     early_stopping=early_stopping, penalties=penalties, use_cache=use_cache,
                                     num_return_sequences=num_return_sequences, window=window, sources=sources)
        results = [_completion(tokenizer, beams, as_text) for beams in searches]
    else:
        if num_return_sequences != 1:
            raise GenerationError("num_return_sequences > 1 needs beam search (num_beams > 1); "
                                  "for several samples pass the prompt several times")
        run = _run(model, tokenizer, ids, as_text, max_new_tokens=max_new_tokens, penalties=penalties,
                   samplers=samplers, greedy=greedy, eos_ids=eos_ids, seed=seed, pad_id=pad_id, stop=stop,
                   logprobs=logprobs, trace=trace, use_cache=use_cache, window=window, sources=sources,
                   source_tokenizer=source_tokenizer)
        if stream:
            return _deltas(run, single)
        results = _drain(run)
    if not rich:
        results = [r.text if as_text else r.token_ids for r in results]
    return results[0] if single else results


def _run(model, tokenizer, ids, as_text, *, max_new_tokens, penalties, samplers, greedy, eos_ids, seed, pad_id,
         stop, logprobs, trace, use_cache, window, sources=None, source_tokenizer=None):
    """Yield (index, delta text or new ids) while generating; return the Completions at the end."""
    trackers = [TextTracker(tokenizer, stop) if tokenizer is not None else None for _ in ids]
    completions = [Completion(None, [], "length", [] if logprobs is not None else None,
                              [] if logprobs else None, trace=[] if trace else None) for _ in ids]
    if max_new_tokens == 0:
        for c in completions:
            c.text = "" if as_text else None
        return completions
    top_n = max(logprobs or 0, 5 if trace else 0)
    tokens = TokenStream(model, ids, max_new_tokens=max_new_tokens, penalties=penalties, samplers=samplers,
                         greedy=greedy, eos_ids=eos_ids, seed=seed, top_n=top_n,
                         want_logprobs=logprobs is not None or trace, use_cache=use_cache, pad_id=pad_id,
                         window=window, sources=sources, want_attention=trace and sources is not None)
    for step_index, step in enumerate(tokens):
        for k, (row, token) in enumerate(zip(step.rows, step.tokens)):
            done = token in eos_ids
            c, tracker = completions[row], trackers[row]
            if not done:
                c.token_ids.append(token)
                if tracker is not None:
                    tracker.add(token)
            if step.logprobs is not None and logprobs is not None:
                c.logprobs.append(step.logprobs[k])
                if logprobs:
                    c.top_logprobs.append(step.top[k][:logprobs])
            if trace:
                c.trace.append(trace_step(tokenizer, step_index, row, token, step.logprobs[k], step.top[k][:5],
                                          tracker.text if tracker is not None else ""))
                if step.cross_attention is not None:
                    c.trace[-1].source = _attended(step.cross_attention[k], sources[0][row], source_tokenizer)
            if tracker is not None and tracker.stopped:
                tokens.finish(row, "stop")
            yield row, tracker.delta() if (as_text and tracker is not None) else ([] if done else [token])
    for row, c in enumerate(completions):
        c.finish_reason = tokens.finish_reasons.get(row, "length")
        tracker = trackers[row]
        if tracker is not None:
            tracker.flush()
            if as_text:
                c.text = tracker.text
                final = tracker.delta(final=True)
                if final:
                    yield row, final
    return completions


def _drain(run) -> list[Completion]:
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


def _deltas(run, single: bool):
    for row, delta in run:
        if delta:
            yield delta if single else (row, delta)


def _attended(weights: torch.Tensor, source_ids: torch.Tensor, source_tokenizer, top: int = 3):
    """The source tokens a step's cross-attention weighted most: [(token text, weight)]."""
    values, positions = weights.topk(min(top, len(weights)))
    shown = (lambda t: source_tokenizer.token_text(t)) if source_tokenizer is not None else str
    return [(shown(int(source_ids[p])), float(v)) for v, p in zip(values, positions)]


def _completion(tokenizer, beams, as_text) -> Completion:
    def completion(beam):
        text = tokenizer.decode(beam.tokens) if as_text else None
        return Completion(text, beam.tokens, beam.finish_reason, score=beam.score)

    best = completion(beams[0])
    best.alternatives = [completion(b) for b in beams[1:]]
    return best


@torch.inference_mode()
def next_token_distribution(model, prompt_ids: list[int]) -> torch.Tensor:
    """Probabilities of the next token after a prompt (for inspection)."""
    logits = model(torch.tensor([prompt_ids[-model.config.context_length:]]), last_only=True)[0, -1]
    return logits.float().softmax(-1)
