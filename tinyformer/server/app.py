"""`tinyformer serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Every request is turned into token-id prompts and `Options`, its sequences (one per prompt and choice) join the
engine's running batch, and their outputs come back on an asyncio queue: streamed as Server-Sent Events in OpenAI's
chunk format or gathered into one response. A client that goes away cancels its sequences. Errors are OpenAI's
JSON shape (protocol.APIError). The server keeps no state between requests, so replicas can sit behind any load
balancer (README: "Serving").
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.batcher import Batcher, Options, QueueFull
from ..generation.processors import GenerationError
from .protocol import (DEFAULT_CHAT_TEMPLATE_STOP, APIError, ChatRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest, default_chat_prompt, parse)

API_KEY_ENV = "TINYFORMER_API_KEY"


@dataclass
class Limits:
    """What one server accepts. None means the model's context window."""

    max_prompt_tokens: int | None = None
    max_tokens: int | None = None  # cap on max_tokens (a request asking for more gets a 400)
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # sequences waiting to join the batch (more: 429)
    max_body_bytes: int = 1 << 20


def make_engine(lm, limits: Limits, on_step=None) -> Batcher:
    """The engine for a loaded model (decoder-only or seq2seq: a seq2seq model's prompts are its sources)."""
    return Batcher(lm.model, lm.tokenizer, source_tokenizer=lm.source_tokenizer, max_batch=limits.max_batch,
                   max_queue=limits.max_queue, on_step=on_step)


def _default_options(lm) -> dict:
    """Options every request gets from the model's own generation config (LanguageModel.generation_defaults)."""
    defaults = lm.generation_defaults
    return {"stop_token_ids": list(defaults.get("stop_token_ids") or []),
            "suppress_token_ids": list(defaults.get("suppress_token_ids") or []),
            "forced_eos_token_id": defaults.get("forced_eos_token_id")}


class _Metrics:
    """Prometheus metrics: request counts and latencies observed here, engine counters read at scrape time."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("tinyformer_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("tinyformer_request_latency_seconds", "Time from request to its last token",
                                 ["route"], registry=self.registry,
                                 buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("tinyformer_time_to_first_token_seconds", "Time from request to its first token",
                              ["route"], registry=self.registry,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.step = Histogram("tinyformer_step_seconds", "Duration of one decode step of the whole batch",
                              registry=self.registry, buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1))
        self.batch = Histogram("tinyformer_batch_size", "Sequences decoded together per step",
                               registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.engine: Batcher | None = None
        self.registry.register(self)

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step.observe(seconds)

    def collect(self):
        engine = self.engine
        if engine is None:
            return
        for name, text, value in (("prompt_tokens", "Prompt tokens prefilled", engine.prompt_tokens),
                                  ("generation_tokens", "Tokens generated", engine.generated_tokens),
                                  ("decode_steps", "Decode steps of the running batch", engine.steps),
                                  ("cancelled_sequences", "Sequences cancelled (client gone)", engine.cancelled)):
            yield CounterMetricFamily(f"tinyformer_{name}", text, value=value)
        yield GaugeMetricFamily("tinyformer_queue_length", "Sequences waiting to join the batch",
                                value=engine.queue_length)
        yield GaugeMetricFamily("tinyformer_running_sequences", "Sequences in the running batch",
                                value=engine.batch_size)


class _CountRequests:
    """ASGI middleware: count every response by route and status (streams included)."""

    ROUTES = {"/", "/health", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/v1/completions",
              "/v1/chat/completions"}

    def __init__(self, app, counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope["path"] if scope["path"] in self.ROUTES else "other"
            self.counter.labels(route, str(status)).inc()


def create_app(lm, *, name: str | None = None, api_key: str | None = None, limits: Limits | None = None,
               chat_template: str | None = None) -> FastAPI:
    """The FastAPI app serving one loaded model (`tinyformer.load`'s LanguageModel).

    chat_template: a Jinja template (Hugging Face's convention: `messages`, `add_generation_prompt`); None uses
    the model's own (a Hugging Face directory's tokenizer_config.json) or else the default documented in
    protocol.py.
    """
    limits = limits or Limits()
    name = name or Path(lm.source or "model").name or "model"
    context = lm.model.config.context_length
    max_prompt = min(limits.max_prompt_tokens or context, context)
    max_tokens_cap = min(limits.max_tokens or context, context)
    tokenizer = lm.tokenizer
    metrics = _Metrics()
    engine = make_engine(lm, limits, metrics.on_step)
    metrics.engine = engine
    seq2seq = engine.seq2seq  # the prompt is the source: it does not share the decoder's context
    model_defaults = _default_options(lm)
    template = _chat_template(lm, chat_template)
    created = int(time.time())

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tinyformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_CountRequests, counter=metrics.requests)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        status = error.status_code
        return JSONResponse(APIError(status, f"{request.method} {request.url.path}: {error.detail}").body(),
                            status_code=status)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {limits.max_body_bytes}",
                           code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"the request body is over the limit of {limits.max_body_bytes} bytes",
                               code="body_too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(400, f"the body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        return data

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {name!r}", "model",
                           "model_not_found")

    async def accept(request: Request, cls):
        """Check the key, read and validate the body, check the model it names."""
        authorize(request)
        body = parse(cls, await read_json(request))
        check_model(body.model)
        return body

    def encode(text: str) -> list[int]:
        """A text prompt's token ids (a seq2seq model's source: its source tokenizer's, ending with <eos>)."""
        try:
            return engine.encode(text)
        except GenerationError as error:
            raise APIError(400, str(error), "prompt") from None

    def token_text(token: int) -> str:
        return tokenizer.token_text(token) if tokenizer is not None else f"token_id:{token}"

    def options_from(body, max_tokens: int | None, prompts: list[list[int]], logprobs: int | None,
                     default_max: int | None, extra_stop=()) -> Options:
        longest = max(len(p) for p in prompts)
        if longest > max_prompt:
            raise APIError(400, f"the prompt has {longest} tokens; this server accepts at most {max_prompt}",
                           "prompt", "context_length_exceeded")
        in_context = 0 if seq2seq else longest  # context slots the prompt takes from the generated tokens
        if max_tokens is None:
            max_tokens = max(0, min(default_max or max_tokens_cap, max_tokens_cap, context - in_context))
        elif max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {max_tokens_cap}",
                           "max_tokens")
        if in_context + max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; the prompt has {longest} and max_tokens "
                                f"is {max_tokens}: shorten the prompt or lower max_tokens", "max_tokens",
                           "context_length_exceeded")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
        return Options(max_tokens=max_tokens, temperature=body.temperature, top_k=max(body.top_k, 0),
                       top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                       presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                       stop=body.stops() + list(extra_stop),
                       stop_token_ids=list(body.stop_token_ids or []) + model_defaults["stop_token_ids"],
                       suppress_token_ids=model_defaults["suppress_token_ids"],
                       forced_eos_token_id=model_defaults["forced_eos_token_id"], logprobs=logprobs)

    def start(prompts: list[list[int]], options: Options, n: int, seed: int | None):
        """Queue n sequences per prompt; -> (sequences, queue of (choice index, Output))."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sequences = []
        try:
            for p, prompt in enumerate(prompts):
                for j in range(n):
                    index = p * n + j
                    # choice i samples with seed + i, so n choices differ and each is reproducible
                    chosen = replace(options, seed=None if seed is None else seed + index)
                    sequences.append(engine.make(prompt, chosen, lambda out, i=index: loop.call_soon_threadsafe(
                        queue.put_nowait, (i, out))))
        except GenerationError as error:
            raise APIError(400, str(error)) from None
        if len(sequences) > limits.max_queue:
            raise APIError(400, f"this request asks for {len(sequences)} sequences (prompts x n); the server queues "
                                f"at most {limits.max_queue}", "n")
        try:
            engine.submit(sequences)
        except QueueFull as error:
            raise APIError(429, f"the server is busy: {error}; retry later", code="queue_full") from None
        return sequences, queue

    async def outputs(request: Request, sequences, queue, watch: bool, began: float):
        """Yield (index, Output) until every sequence finished; a client gone (or the caller stopping) cancels.
        The first output's delay is the request's time to first token."""
        remaining = len(sequences)
        first = True
        try:
            while remaining:
                try:
                    index, out = await asyncio.wait_for(queue.get(), 0.25 if watch else None)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if out.error is not None:
                    raise APIError(503, out.error, code="generation_failed")
                if first:
                    metrics.ttft.labels(request.url.path).observe(time.monotonic() - began)
                    first = False
                if out.finish_reason is not None:
                    remaining -= 1
                yield index, out
        finally:
            for s in sequences:
                s.cancel()  # a no-op for the finished ones

    def usage(prompts, sequences) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(s.steps for s in sequences)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def sse(data) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def stream_end(rid, kind, include_usage, prompts, sequences, route, began):
        """The end of a finished stream: the usage chunk (when asked for), [DONE], the latency metric."""
        if include_usage:
            yield sse({"id": rid, "object": kind, "created": int(time.time()), "model": name, "choices": [],
                       "usage": usage(prompts, sequences)})
        yield "data: [DONE]\n\n"
        metrics.latency.labels(route).observe(time.monotonic() - began)

    async def guarded(events):
        """A failure after the stream has started can no longer change the status: it becomes an error event."""
        try:
            async for event in events:
                yield event
        except APIError as error:
            yield sse(error.body())

    def stream_response(events) -> StreamingResponse:
        return StreamingResponse(guarded(events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        body = {"status": "ok" if alive else "engine stopped", "model": name, "queue_length": engine.queue_length,
                "running": engine.batch_size, "max_queue": limits.max_queue}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "tinyformer", "max_model_len": context}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await accept(request, TokenizeRequest)
        tokens = encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await accept(request, DetokenizeRequest)
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer", "tokens")
        vocab = lm.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        began = time.monotonic()
        body = await accept(request, CompletionRequest)
        prompt = body.prompt
        if isinstance(prompt, list) and not prompt:
            raise APIError(400, "prompt is an empty list", "prompt")
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompts = [encode(p) if isinstance(p, str) else list(p) for p in prompt]
        if any(not p for p in prompts):
            raise APIError(400, "a prompt is empty; give at least one token", "prompt")
        if seq2seq and body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs scores the prompt, and a seq2seq model's prompt is its source, "
                                "which it does not score; use echo without logprobs (it returns the source text)",
                           "echo")
        options = options_from(body, body.max_tokens, prompts, body.logprobs, default_max=16)
        options.prompt_logprobs = body.echo and body.logprobs is not None
        sequences, queue = start(prompts, options, body.n, body.seed)
        rid, n = f"cmpl-{uuid.uuid4().hex}", body.n
        reader = engine.source_tokenizer  # a seq2seq model's echo is its source text
        echo_text = [(reader.decode(p) if reader is not None else "") if body.echo else "" for p in prompts]

        def prompt_logprobs(choice: int):
            """(tokens, logprobs, top) of the prompt for echo: the first token has no logprob."""
            s, p = sequences[choice], prompts[choice // n]
            tokens = [token_text(t) for t in p]
            if s.prompt_logprobs is None:
                return tokens, [None] * len(p), [None] * len(p)
            lps = [None] + [lp for lp, _ in s.prompt_logprobs]
            top = [None] + [{token_text(t): v for t, v in alts} for _, alts in s.prompt_logprobs]
            return tokens, lps, top

        def logprob_block(tokens, lps, tops, start_offset):
            offsets, at = [], start_offset
            for t in tokens:
                offsets.append(at)
                at += len(t)
            return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

        def token_logprobs(out):
            if out.token is None or out.logprob is None:
                return [], [], []
            return [token_text(out.token)], [out.logprob], [{token_text(t): v for t, v in out.top}]

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events():
                texts = [""] * len(sequences)
                first = False
                remaining = len(sequences)
                async for index, out in outputs(request, sequences, queue, False, began):
                    chunks = []
                    if body.echo and not first:
                        first = True
                        for i in range(len(sequences)):
                            lp = None
                            if body.logprobs is not None:
                                lp = logprob_block(*prompt_logprobs(i), 0)
                            texts[i] = echo_text[i // n]
                            chunks.append({"index": i, "text": texts[i], "logprobs": lp, "finish_reason": None})
                    remaining -= out.finish_reason is not None
                    lp = None
                    if body.logprobs is not None:
                        lp = logprob_block(*token_logprobs(out), len(texts[index]))
                    texts[index] += out.text or ""
                    if out.text or lp and lp["tokens"] or out.finish_reason:
                        chunks.append({"index": index, "text": out.text or "", "logprobs": lp,
                                       "finish_reason": out.finish_reason})
                    for k, choice in enumerate(chunks):
                        chunk = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                                 "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = None
                        elif remaining == 0 and k == len(chunks) - 1:  # usage in every response: the last chunk
                            chunk["usage"] = usage(prompts, sequences)
                        yield sse(chunk)
                if remaining == 0:
                    for event in stream_end(rid, "text_completion", include_usage, prompts, sequences, "/v1/completions", began):
                        yield event

            return stream_response(events())

        choices = [{"index": i, "text": echo_text[i // n], "logprobs": None, "finish_reason": None,
                    "token_ids": []} for i in range(len(sequences))]
        gathered = [([], [], []) for _ in sequences]
        async for index, out in outputs(request, sequences, queue, True, began):
            choice = choices[index]
            choice["text"] += out.text or ""
            if out.token is not None:
                choice["token_ids"].append(out.token)
            for acc, part in zip(gathered[index], token_logprobs(out)):
                acc.extend(part)
            if out.finish_reason is not None:
                choice["finish_reason"] = out.finish_reason
        if any(c["finish_reason"] is None for c in choices):
            return Response(status_code=499)  # the client left; nobody reads this
        if body.logprobs is not None:
            for i, choice in enumerate(choices):
                head = prompt_logprobs(i) if body.echo else ([], [], [])
                tokens, lps, tops = (h + g for h, g in zip(head, gathered[i]))
                choice["logprobs"] = logprob_block(tokens, lps, tops, 0)
        metrics.latency.labels("/v1/completions").observe(time.monotonic() - began)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": usage(prompts, sequences)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        began = time.monotonic()
        body = await accept(request, ChatRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if template is None:
            text, extra_stop = default_chat_prompt(messages), [DEFAULT_CHAT_TEMPLATE_STOP]
        else:
            text, extra_stop = _render(template, messages, engine.source_tokenizer), []
        prompts = [encode(text)]
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        options = options_from(body, max_tokens, prompts, logprobs, default_max=None, extra_stop=extra_stop)
        sequences, queue = start(prompts, options, body.n, body.seed)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def entry(token: int, logprob: float) -> dict:
            shown = token_text(token)
            raw = tokenizer.token_bytes(token) if tokenizer is not None else None
            return {"token": shown, "logprob": logprob, "bytes": list(raw if raw is not None else shown.encode())}

        def content_logprobs(out) -> list[dict]:
            if out.token is None or out.logprob is None:
                return []
            item = entry(out.token, out.logprob)
            item["top_logprobs"] = [entry(t, v) for t, v in out.top]
            return [item]

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def events():
                remaining = len(sequences)
                started = set()
                def chunk(choices, last=False):
                    data = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": name, "choices": choices}
                    if include_usage:
                        data["usage"] = None
                    elif last:
                        data["usage"] = usage(prompts, sequences)
                    return sse(data)

                async for index, out in outputs(request, sequences, queue, False, began):
                    if index not in started:
                        started.add(index)
                        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    remaining -= out.finish_reason is not None
                    lp = {"content": content_logprobs(out)} if body.logprobs else None
                    if out.text or (lp and lp["content"]) or out.finish_reason:
                        delta = {"content": out.text} if out.text else {}
                        yield chunk([{"index": index, "delta": delta, "logprobs": lp,
                                      "finish_reason": out.finish_reason}], last=remaining == 0)
                if remaining == 0:
                    for event in stream_end(rid, "chat.completion.chunk", include_usage, prompts, sequences, "/v1/chat/completions", began):
                        yield event

            return stream_response(events())

        choices = [{"index": i, "message": {"role": "assistant", "content": ""},
                    "logprobs": {"content": []} if body.logprobs else None, "finish_reason": None}
                   for i in range(len(sequences))]
        async for index, out in outputs(request, sequences, queue, True, began):
            choice = choices[index]
            choice["message"]["content"] += out.text or ""
            if body.logprobs:
                choice["logprobs"]["content"].extend(content_logprobs(out))
            if out.finish_reason is not None:
                choice["finish_reason"] = out.finish_reason
        if any(c["finish_reason"] is None for c in choices):
            return Response(status_code=499)
        metrics.latency.labels("/v1/chat/completions").observe(time.monotonic() - began)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": choices, "usage": usage(prompts, sequences)}

    return app


def _chat_template(lm, given: str | None):
    """The Jinja chat template in use: the one given, the model's own, or None (the default one)."""
    text = given
    if text is None and lm.source:
        config = Path(lm.source) / "tokenizer_config.json"
        if config.is_file():
            try:
                text = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            except (ValueError, AttributeError):
                text = None
            if not isinstance(text, str):
                text = None
    if text is None:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # as Hugging Face renders chat templates

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)


def _render(template, messages: list[dict], tokenizer) -> str:
    special = {}
    if tokenizer is not None:
        for role in ("bos", "eos"):
            token_id = getattr(tokenizer, f"{role}_id", None)
            special[f"{role}_token"] = tokenizer.token_text(token_id) if token_id is not None else ""
    try:
        return template.render(messages=messages, add_generation_prompt=True, **special)
    except Exception as error:  # a template error is the template's, reported, not a crash
        raise APIError(400, f"the chat template failed on these messages: {error}", "messages") from None
