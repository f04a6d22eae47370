"""The HTTP server through the official `openai` client and raw HTTP: results, streams, batching, errors."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tinyformer.server import Limits, create_app  # noqa: E402
from tinyformer.server.protocol import default_chat_prompt  # noqa: E402

from .helpers import char_lm  # noqa: E402
from .server_helpers import RunningServer, slowed  # noqa: E402

PROMPTS = ["First Citizen:", "Speak", "All:\nSpeak, speak.", "naïve café", "B", "hear me speak.\n\nAll"]


@pytest.fixture(scope="module")
def lm():
    return char_lm(context_length=128)


@pytest.fixture(scope="module")
def server(lm):
    with RunningServer(create_app(lm, name="tiny", limits=Limits(max_tokens=100, max_body_bytes=4096))) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def solo(lm, prompt, max_tokens, **options):
    """The reference: tinyformer.generate on the prompt alone -> (Completion, completion token count)."""
    c = lm.generate(prompt, max_new_tokens=max_tokens, details=True, **options)
    return c, len(c.token_ids) + (c.finish_reason == "eos")


def test_completion_text_usage_and_logprobs(client, lm):
    want, steps = solo(lm, "First Citizen:", 20, temperature=0, logprobs=3)
    r = client.completions.create(model="tiny", prompt="First Citizen:", max_tokens=20, temperature=0, logprobs=3)
    choice = r.choices[0]
    assert choice.text == want.text and choice.finish_reason == ("length" if steps == 20 else "stop")
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode("First Citizen:"))
    assert r.usage.completion_tokens == steps and r.usage.total_tokens == r.usage.prompt_tokens + steps
    assert choice.logprobs.tokens == [lm.tokenizer.token_text(t) for t in want.token_ids]
    # the same numbers as generate(); a logprob from the wrong step or row is off by > 0.1
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(want.logprobs),
                               rtol=0, atol=1e-4)
    assert [list(d) for d in choice.logprobs.top_logprobs] == [
        [lm.tokenizer.token_text(t) for t, _ in alts] for alts in want.top_logprobs]
    assert choice.logprobs.text_offset[:2] == [0, len(choice.logprobs.tokens[0])]


def test_stream_equals_the_whole_response_and_ends_with_usage(client, server, lm):
    whole = client.completions.create(model="tiny", prompt="Speak", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Speak", max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    # without include_usage the usage still arrives, on the last chunk
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 30,
                                                                      "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"] == whole.usage.model_dump(exclude_none=True)


def test_prompt_forms_n_and_seed(client, lm):
    ids = lm.tokenizer.encode("Speak")
    want = [lm.generate(p, max_new_tokens=12, temperature=0) for p in ("Speak", "All:")]
    r = client.completions.create(model="tiny", prompt=[ids, lm.tokenizer.encode("All:")], max_tokens=12,
                                  temperature=0)
    assert [c.text for c in r.choices] == want
    r = client.completions.create(model="tiny", prompt=["Speak", "All:"], max_tokens=12, temperature=0)
    assert [c.text for c in r.choices] == want
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == want[0]
    r = client.completions.create(model="tiny", prompt="Speak", max_tokens=15, temperature=1.0, n=3,
                                  seed=5, extra_body={"top_k": 20})
    assert len(r.choices) == 3
    for i, choice in enumerate(r.choices):  # choice i samples with seed + i, each reproducible
        assert choice.text == lm.generate("Speak", max_new_tokens=15, temperature=1.0, top_k=20, seed=5 + i)
    assert len({c.text for c in r.choices}) > 1


def test_echo_scores_the_prompt(client, lm):
    prompt = "hear me speak."
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text == prompt and r.usage.completion_tokens == 0
    ids = lm.tokenizer.encode(prompt)
    with torch.inference_mode():
        reference = lm.model(torch.tensor([ids]))[0].log_softmax(-1)
    want = reference[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    assert choice.logprobs.token_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs[1:]), want, rtol=0, atol=1e-4)


def test_chat_with_default_template_and_logprobs(client, lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak"}]
    prompt = default_chat_prompt(messages)
    assert prompt == "System: Be brief.\nUser: Speak\nAssistant:"
    want, _ = solo(lm, prompt, 20, temperature=0, stop="\nUser:", logprobs=2)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                       logprobs=True, top_logprobs=2)
    message = r.choices[0].message
    assert message.role == "assistant" and message.content == want.text
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [lm.tokenizer.token_text(t) for t in want.token_ids]
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].usage.prompt_tokens == len(lm.tokenizer.encode(prompt))


def test_sixteen_concurrent_streams_each_equal_its_single_request(client, server, lm):
    jobs = [(PROMPTS[i % len(PROMPTS)], 10 + 3 * i) for i in range(16)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=m, temperature=0).choices[0].text
             for p, m in jobs]
    results = [None] * 16
    start = threading.Barrier(16)

    def run(i):
        p, m = jobs[i]
        start.wait()
        stream = client.completions.create(model="tiny", prompt=p, max_tokens=m, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream if c.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == alone
    metrics = httpx.get(server.url + "/metrics").text
    single = float(re.search(r'tinyformer_batch_size_bucket\{le="1.0"\} (\S+)', metrics).group(1))
    total = float(re.search(r"tinyformer_batch_size_count (\S+)", metrics).group(1))
    assert total - single > 0  # some steps decoded several requests together


def test_stop_string_split_across_tokens_never_streams(client, lm):
    free = lm.generate("Speak", max_new_tokens=40, temperature=1.0, seed=3)
    at = next(i for i in range(8, 30) if free.find(free[i:i + 3]) == i)
    stop = free[at:at + 3]  # three char tokens
    chunks = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Speak", max_tokens=40, temperature=1.0, seed=3, stop=[stop], stream=True) if c.choices]
    assert "".join(chunks) == free[:at]
    assert all(stop not in c for c in chunks)


def test_disconnected_stream_stops_costing_work(lm):
    slow_lm = char_lm(context_length=256)
    slowed(slow_lm.model, 0.01)  # 200 tokens would take > 2 s
    with RunningServer(create_app(slow_lm, name="slow")) as s:
        with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 200,
                                                                     "temperature": 0, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens arrive, then the client hangs up
        assert got[0].startswith("data: ")
        deadline = time.monotonic() + 5
        while s.engine.batch_size and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.engine.batch_size == 0 and s.engine.cancelled == 1
        spent = s.engine.generated_tokens
        assert spent < 60  # cancelled within a few steps of the hang-up, not after 200
        time.sleep(0.2)
        assert s.engine.generated_tokens == spent


BAD = [
    ({"prompt": "Speak", "max_tokens": "5"}, 422, "max_tokens"),  # wrong type (no silent coercion)
    ({"prompt": "Speak", "temperature": "hot"}, 422, "temperature"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "Speak", "max_tokens": -1}, 422, "max_tokens"),  # negative values
    ({"prompt": "Speak", "n": 0}, 422, "n"),
    ({"prompt": "Speak", "top_p": 1.5}, 422, "top_p"),
    ({"prompt": "Speak", "logprobs": -2}, 422, "logprobs"),
    ({"prompt": "Speak", "best_of": 3}, 422, "best_of"),  # not implemented: refused, not ignored
    ({"prompt": "Speak", "max_tokens": 10**9}, 400, "max_tokens"),  # huge
    ({"prompt": "Speak" * 10, "max_tokens": 100}, 400, "max_tokens"),
    ({"prompt": "Speak" * 30, "max_tokens": 1}, 400, "prompt"),  # a prompt longer than the context  # prompt + max_tokens over the context
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 5000]}, 400, None),  # a token id outside the vocabulary
    ({"prompt": "Speak", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "Speak", "stream_options": {"include_usage": True}}, 400, "stream_options"),
]


@pytest.mark.parametrize("payload,status,param", BAD)
def test_bad_requests_get_the_right_error_and_the_next_is_served(server, payload, status, param):
    r = httpx.post(server.url + "/v1/completions", json=payload)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param + ".")
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "Speak", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_broken_bodies(server):
    post = lambda **kw: httpx.post(server.url + "/v1/completions", **kw)  # noqa: E731
    assert post(content=b'{"prompt": "Speak",', headers={"content-type": "application/json"}).status_code == 400
    assert post(content=b"[1, 2]").status_code == 400
    assert post(content=b"\xff\xfe").status_code == 400
    assert post(json={"prompt": "x" * 5000}).status_code == 413  # the fixture's 4096-byte limit
    assert httpx.get(server.url + "/v1/nowhere").json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/v1/completions").status_code == 405


def test_errors_reach_the_client_as_its_exception_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="Speak")
    with pytest.raises(openai.BadRequestError, match="at most 100"):
        client.completions.create(model="tiny", prompt="Speak", max_tokens=100_000)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tiny", prompt="Speak", max_tokens=-5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert client.completions.create(model="tiny", prompt="Speak", max_tokens=2).usage.completion_tokens >= 1


def test_full_queue_is_429_and_the_server_recovers(lm):
    busy_lm = char_lm(context_length=256)
    # greedy: sampled, this random model draws <eos> within a few steps and a request can end before it is seen
    assert busy_lm.generate("Speak", max_new_tokens=240, temperature=0, details=True).finish_reason == "length"
    slowed(busy_lm.model, 0.02)  # each request below runs for > 4 s
    with RunningServer(create_app(busy_lm, name="busy", limits=Limits(max_batch=1, max_queue=1))) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        hang_up = threading.Event()

        def stream():  # opens a streamed request and holds it until hang_up, all in its own thread (an httpx
            # stream must be closed by the thread that opened it: the queued one may still be waiting for headers)
            with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                              json={"prompt": "Speak", "max_tokens": 240, "temperature": 0, "stream": True}):
                hang_up.wait()

        deadline = time.monotonic() + 30
        # one at a time, each once the engine shows the one before it: two sent together could both find the
        # first still waiting (max_queue=1) on a busy machine, and the second would get the 429 meant below
        threads = [threading.Thread(target=stream, daemon=True) for _ in range(2)]
        for thread, state in zip(threads, [(1, 0), (1, 1)]):
            thread.start()
            while (s.engine.batch_size, s.engine.queue_length) != state and time.monotonic() < deadline:
                time.sleep(0.01)
        assert (s.engine.batch_size, s.engine.queue_length) == (1, 1)  # one running, one waiting: queue full
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="busy", prompt="Speak", max_tokens=2)
        hang_up.set()  # both hang up and are cancelled (the queued one once its headers come)
        for thread in threads:
            thread.join(timeout=30)
        while s.engine.batch_size and time.monotonic() < deadline + 10:
            time.sleep(0.01)
        assert client.completions.create(model="busy", prompt="Speak", max_tokens=2).choices[0].finish_reason


def test_api_key_guards_v1(lm):
    with RunningServer(create_app(lm, name="tiny", api_key="sekret")) as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Speak"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        assert good.completions.create(model="tiny", prompt="Speak", max_tokens=2).usage.prompt_tokens == 5
        assert httpx.get(s.url + "/health").status_code == 200  # load balancers probe without the key


def test_health_models_tokenize_metrics(server, client, lm):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert client.models.list().data[0].id == "tiny"
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "Speak"}).json()
    assert tokens["tokens"] == lm.tokenizer.encode("Speak") and tokens["count"] == 5
    assert httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "Speak"
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    # one completion of its own: labelled histograms only appear once observed, whatever ran before this test
    client.completions.create(model="tiny", prompt="Speak", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("tinyformer_requests_total", "tinyformer_generation_tokens_total", "tinyformer_queue_length",
                 "tinyformer_running_sequences", "tinyformer_request_latency_seconds_bucket",
                 "tinyformer_time_to_first_token_seconds_bucket", "tinyformer_batch_size_bucket"):
        assert name in text
    served = re.search(r'tinyformer_requests_total\{route="/tokenize",status="200"\} (\S+)', text)
    assert served and float(served.group(1)) >= 1


def test_serve_command_rejects_bad_limits_in_one_line(capsys):
    from tinyformer.cli import main

    assert main(["serve", "runs/none", "--max-batch", "0"]) == 1
    assert capsys.readouterr().err.strip() == "tinyformer serve: error: --max-batch must be at least 1, got 0"
