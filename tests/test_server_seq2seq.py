"""Serving a seq2seq model: the prompt is the source, encoded once per request; its decode joins the running batch."""
from __future__ import annotations

import json
import threading

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tinyformer.server import create_app  # noqa: E402
from tinyformer.server.protocol import default_chat_prompt  # noqa: E402

from .helpers import seq2seq_lm  # noqa: E402
from .server_helpers import RunningServer, slowed  # noqa: E402

SOURCES = ["je suis content .", "il", "nous sommes là ! il est grand .", "农夫山泉", "je", "il est content ."]


@pytest.fixture(scope="module")
def lm():
    return seq2seq_lm(seed=1)  # different sources give different greedy outputs (checked below)


@pytest.fixture(scope="module")
def server(lm, one_thread):
    with RunningServer(create_app(lm, name="s2s")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def source_tokens(lm, text):
    return len(lm.source_tokenizer.encode(text)) + 1  # a text source ends with <eos>


def test_completion_is_generate_of_the_source(client, server, lm):
    want = lm.generate("je suis content .", max_new_tokens=12, temperature=0, logprobs=2)
    r = client.completions.create(model="s2s", prompt="je suis content .", max_tokens=12, temperature=0, logprobs=2)
    choice = r.choices[0]
    assert choice.text == want.text and choice.token_ids == want.token_ids
    assert r.usage.prompt_tokens == source_tokens(lm, "je suis content .")  # the source, not the decoder's start
    assert r.usage.completion_tokens == 12
    # logprobs from the wrong source or position are off by > 1e-2
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(want.logprobs),
                               rtol=0, atol=1e-4)
    ids = lm.source_tokenizer.encode("il est grand .") + [lm.source_tokenizer.eos_id]
    r = client.completions.create(model="s2s", prompt=ids, max_tokens=10, temperature=0)  # ids go to the encoder
    assert r.choices[0].text == lm.generate("il est grand .", max_new_tokens=10, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    tokenized = httpx.post(server.url + "/tokenize", json={"prompt": "il est grand ."}).json()
    assert tokenized["tokens"] == ids  # /tokenize counts what usage counts


def test_concurrent_sources_of_different_lengths_each_equal_generate_alone(client, server, lm):
    jobs = [(SOURCES[i % len(SOURCES)], 6 + 2 * i) for i in range(12)]
    want = [lm.generate(s, max_new_tokens=m, temperature=0, details=True) for s, m in jobs]
    assert len({tuple(w.token_ids) for w in want}) >= 5  # a row decoding another row's source would show
    results, usages = [None] * len(jobs), [None] * len(jobs)
    start = threading.Barrier(len(jobs))
    slowed(lm.model, 0.002)  # steps slow enough that the requests overlap and join at different steps
    try:
        def run(i):
            source, m = jobs[i]
            start.wait()
            stream = client.completions.create(model="s2s", prompt=source, max_tokens=m, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
            results[i] = "".join(c.choices[0].text for c in chunks if c.choices)
            usages[i] = chunks[-1].usage

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        del lm.model.forward  # back to the class's forward
    assert results == [w.text for w in want]
    assert [u.prompt_tokens for u in usages] == [source_tokens(lm, s) for s, _ in jobs]
    assert [u.completion_tokens for u in usages] == [m for _, m in jobs]
    metrics = httpx.get(server.url + "/metrics").text
    assert "tinyformer_batch_size_bucket" in metrics
    batched = [line for line in metrics.splitlines() if line.startswith('tinyformer_batch_size_bucket{le="1.0"}')]
    total = [line for line in metrics.splitlines() if line.startswith("tinyformer_batch_size_count")]
    assert float(total[0].split()[-1]) > float(batched[0].split()[-1])  # some steps decoded several sources


def test_sampling_with_a_seed_n_and_stop(client, lm):
    r = client.completions.create(model="s2s", prompt="nous sommes là !", max_tokens=15, temperature=1.0, n=2,
                                  seed=7)
    for i, choice in enumerate(r.choices):
        assert choice.text == lm.generate("nous sommes là !", max_new_tokens=15, temperature=1.0, seed=7 + i)
    assert r.usage.prompt_tokens == source_tokens(lm, "nous sommes là !")  # the prompt once, as OpenAI counts it


def test_echo_returns_the_source_and_refuses_scoring_it(client, server):
    r = client.completions.create(model="s2s", prompt="il est content .", max_tokens=5, temperature=0, echo=True)
    plain = client.completions.create(model="s2s", prompt="il est content .", max_tokens=5, temperature=0)
    assert r.choices[0].text == "il est content ." + plain.choices[0].text
    response = httpx.post(server.url + "/v1/completions",
                          json={"prompt": "il", "max_tokens": 0, "echo": True, "logprobs": 1})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "echo" and "seq2seq" in error["message"]
    assert client.completions.create(model="s2s", prompt="il", max_tokens=3).usage.completion_tokens >= 1


def test_chat_renders_the_source(client, lm):
    messages = [{"role": "user", "content": "il est là"}]  # "User: il est là\nAssistant:", 27 chars
    source = default_chat_prompt(messages)  # the template's text is what the encoder reads
    want = lm.generate(source, max_new_tokens=10, temperature=0, stop="\nUser:")
    r = client.chat.completions.create(model="s2s", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == source_tokens(lm, source)
    chunks = list(client.chat.completions.create(model="s2s", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_seq2seq_limits_are_the_sources_and_the_targets(server):
    long_source = {"prompt": [5] * 33, "max_tokens": 4}  # 32 source positions
    response = httpx.post(server.url + "/v1/completions", json=long_source)
    assert response.status_code == 400 and "33 tokens" in response.json()["error"]["message"]
    # a 32-token source still leaves all 32 target positions: the source is not in the decoder's context
    response = httpx.post(server.url + "/v1/completions", json={"prompt": [5] * 32, "max_tokens": 32,
                                                                "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {"prompt_tokens": 32, "completion_tokens": 32, "total_tokens": 64}
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "il", "max_tokens": 33})
    assert response.status_code == 400 and json.loads(response.text)["error"]["param"] == "max_tokens"


def test_the_models_own_generation_settings_apply_to_every_request(one_thread):
    # a Marian model's config bans tokens and forces a final <eos> (LanguageModel.generation_defaults); the server
    # must decode as generate() does, or its translations differ from the CLI's
    lm = seq2seq_lm(seed=1)
    free = lm.generate("je suis content .", max_new_tokens=8, temperature=0, details=True)
    lm.generation_defaults = {"suppress_token_ids": [free.token_ids[0]], "forced_eos_token_id": lm.tokenizer.eos_id}
    want = lm.generate("je suis content .", max_new_tokens=8, temperature=0, details=True)
    assert want.token_ids[0] != free.token_ids[0] and want.finish_reason == "eos"  # both settings show
    with RunningServer(create_app(lm, name="marian-like")) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "je suis content .", "max_tokens": 8,
                                                        "temperature": 0}, timeout=30).json()
    assert r["choices"][0]["token_ids"] == want.token_ids and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == 8  # seven tokens and the forced <eos>
