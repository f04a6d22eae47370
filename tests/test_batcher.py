"""Continuous batching: requests joining and leaving a running batch compute what they compute alone."""
from __future__ import annotations

import pytest
import torch

from tinyformer.generation import GenerationError
from tinyformer.generation.batcher import Batcher, Options, QueueFull
from tinyformer.generation.cache import KVCache

from .helpers import char_lm, seq2seq_lm

PROMPTS = ["First Citizen:", "Speak", "All:\nSpeak, speak.", "naïve café", "B", "hear me speak.\n\nAll"]
SOURCES = ["je suis content .", "il", "nous sommes là ! il est grand .", "农夫山泉", "je", "il est content ."]


class Collector:
    def __init__(self):
        self.outputs = []

    def __call__(self, output):
        self.outputs.append(output)

    @property
    def tokens(self):
        return [o.token for o in self.outputs if o.token is not None]

    @property
    def text(self):
        return "".join(o.text or "" for o in self.outputs)

    @property
    def finish_reason(self):
        return self.outputs[-1].finish_reason if self.outputs else None


def submit(engine, lm, prompt, **options):
    collector = Collector()
    ids = lm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    engine.submit([engine.make(ids, Options(**options), collector)])
    return collector


def drain(engine, limit=1000):
    for _ in range(limit):
        if not engine.step():
            return
    raise AssertionError("the engine did not become idle")


@pytest.mark.parametrize("kind", ["tiny", "llama-tiny"])  # learned absolute positions, and RoPE with GQA
def test_staggered_greedy_requests_equal_their_solo_generation(kind):
    lm = char_lm(kind, context_length=48)
    engine = Batcher(lm.model, lm.tokenizer, max_batch=4)
    budgets = [20, 9, 25, 14, 30, 12]
    runs = []
    # requests join at different steps, some longer than what the batch holds (the batch shifts right), the
    # batch is full for a while (max_batch 4, the rest wait), and rows leave at different steps; over 48 context
    # slots the shared cache must compact leading slots to keep going
    for i, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        runs.append(submit(engine, lm, prompt, max_tokens=budget, temperature=0, logprobs=2))
        for _ in range(3 + i):
            engine.step()
        assert engine.cache is None or engine.cache.capacity <= 48
    drain(engine)
    for prompt, budget, run in zip(PROMPTS, budgets, runs):
        alone = lm.generate(prompt, max_new_tokens=budget, temperature=0, logprobs=2)
        assert run.tokens == alone.token_ids  # a wrong mask, position or cache row changes these tokens
        assert run.text == alone.text
        assert run.finish_reason == "length"
        got = torch.tensor([o.logprob for o in run.outputs])
        # float rounding of batched products is ~1e-6; a row reading another row's keys is off by > 1e-2
        torch.testing.assert_close(got, torch.tensor(alone.logprobs), rtol=0, atol=1e-4)
        assert [[t for t, _ in o.top] for o in run.outputs] == [[t for t, _ in a] for a in alone.top_logprobs]
    assert engine.generated_tokens == sum(budgets)
    assert engine.prompt_tokens == sum(len(lm.tokenizer.encode(p)) for p in PROMPTS)


def test_seeded_sampling_does_not_depend_on_the_batch():
    lm = char_lm(context_length=64)
    options = dict(max_tokens=30, temperature=0.9, top_k=12, top_p=0.95, seed=1234)
    engine = Batcher(lm.model, lm.tokenizer)
    alone = submit(engine, lm, "Speak", **options)
    drain(engine)
    crowd = [submit(engine, lm, p, max_tokens=25, temperature=1.2, seed=i) for i, p in enumerate(PROMPTS)]
    engine.step()
    engine.step()
    shared = submit(engine, lm, "Speak", **options)
    crowd.append(submit(engine, lm, "All", max_tokens=30, temperature=1.0))  # unseeded neighbour
    drain(engine)
    assert shared.tokens == alone.tokens and len(alone.tokens) >= 20
    # the same draws as the one-prompt generate() with that seed (same sampler, same generator stream)
    assert alone.tokens == lm.generate(lm.tokenizer.encode("Speak"), max_new_tokens=30, temperature=0.9,
                                       top_k=12, top_p=0.95, seed=1234)
    other = submit(engine, lm, "Speak", **{**options, "seed": 99})
    drain(engine)
    assert other.tokens != alone.tokens  # the seed matters (30 samples at T=0.9 agreeing by chance: ~never)


def test_penalties_are_per_request():
    lm = char_lm(context_length=64)
    engine = Batcher(lm.model, lm.tokenizer)
    penalised = dict(max_tokens=25, temperature=0, repetition_penalty=1.5, presence_penalty=1.0,
                     frequency_penalty=0.5)
    runs = [submit(engine, lm, "Speak", **penalised), submit(engine, lm, "Speak", max_tokens=25, temperature=0)]
    drain(engine)
    want = lm.generate("Speak", max_new_tokens=25, temperature=0, repetition_penalty=1.5, presence_penalty=1.0,
                       frequency_penalty=0.5)
    assert runs[0].text == want
    assert runs[1].text == lm.generate("Speak", max_new_tokens=25, temperature=0)
    assert runs[0].text != runs[1].text


def test_stop_strings_across_tokens_never_reach_the_output():
    lm = char_lm(context_length=64)
    engine = Batcher(lm.model, lm.tokenizer)
    sampling = dict(temperature=1.0, seed=3)
    free = lm.generate("Speak", max_new_tokens=40, **sampling)
    at = next(i for i in range(8, 30) if free.find(free[i:i + 3]) == i)  # a first occurrence past token 8
    stop = free[at:at + 3]  # three characters: three char tokens, so the stop string always spans tokens
    run = submit(engine, lm, "Speak", max_tokens=40, stop=[stop], **sampling)
    drain(engine)
    assert run.text == free[:at] == lm.generate("Speak", max_new_tokens=40, stop=stop, **sampling)
    assert "".join(o.text or "" for o in run.outputs[:-1]) == free[:at]  # nothing sent, then retracted
    assert run.finish_reason == "stop"
    decode = lm.tokenizer.decode  # the engine stopped at the token that completed it
    assert stop in decode(run.tokens) and stop not in decode(run.tokens[:-1])


def test_cancel_drops_the_row_at_the_next_step():
    lm = char_lm(context_length=128)
    engine = Batcher(lm.model, lm.tokenizer)
    long = submit(engine, lm, "Speak", max_tokens=100, temperature=0)
    short = submit(engine, lm, "All", max_tokens=20, temperature=0)
    for _ in range(5):
        engine.step()
    engine.rows[0].cancel()
    before = engine.generated_tokens
    drain(engine)
    assert long.finish_reason == "cancelled" and len(long.tokens) == 5
    assert engine.generated_tokens - before == 15  # only the other row kept costing work
    assert engine.cancelled == 1
    assert short.tokens == lm.generate(lm.tokenizer.encode("All"), max_new_tokens=20, temperature=0)


def test_prompt_logprobs_match_a_full_forward():
    lm = char_lm(context_length=64)
    engine = Batcher(lm.model, lm.tokenizer)
    ids = lm.tokenizer.encode("First Citizen:")
    collector = Collector()
    sequence = engine.make(ids, Options(max_tokens=0, logprobs=3, prompt_logprobs=True), collector)
    engine.submit([sequence])
    drain(engine)
    assert collector.finish_reason == "length" and collector.tokens == []
    with torch.inference_mode():
        reference = lm.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    got = torch.tensor([lp for lp, _ in sequence.prompt_logprobs])
    want = reference[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # an off-by-one position is off by > 0.1
    assert [t for t, _ in sequence.prompt_logprobs[0][1]] == reference[0].topk(3).indices.tolist()


def test_limits_and_bad_values():
    lm = char_lm(context_length=32)
    engine = Batcher(lm.model, lm.tokenizer, max_queue=2)
    with pytest.raises(GenerationError, match="context is 32 tokens"):
        engine.make(lm.tokenizer.encode("Speak"), Options(max_tokens=28), print)
    with pytest.raises(GenerationError, match="token id 999"):
        engine.make([1, 999], Options(), print)
    with pytest.raises(GenerationError, match="top_p"):
        engine.make([5], Options(top_p=0), print)
    waiting = [engine.make([5], Options(), Collector()), engine.make([6], Options(), Collector())]
    engine.submit(waiting)
    with pytest.raises(QueueFull):
        engine.submit([engine.make([7], Options(), Collector())])
    waiting[0].cancel()  # its client left while it waited: its place is free again
    engine.submit([engine.make([7], Options(), Collector())])
    assert waiting[0].on_output.finish_reason == "cancelled" and engine.queue_length == 2


def test_cache_add_rows_and_compact_keep_each_rows_keys():
    torch.manual_seed(0)
    config = char_lm().model.config
    a = KVCache(config, 1, 4)
    a.k[:, :, :, :3] = torch.randn(a.k[:, :, :, :3].shape)
    a.length = 3
    b = KVCache(config, 2, 5)
    b.k[:, :, :, :5] = torch.randn(b.k[:, :, :, :5].shape)
    b.key_valid[0, :2] = False  # row 0 of b was left-padded by two
    b.length = 5
    a_keys, b_keys = a.k[:, :, :, :3].clone(), b.k[:, :, :, :5].clone()
    a.add_rows(b)  # b holds more: a's row moves right by two
    assert a.batch_size == 3 and a.length == 5
    torch.testing.assert_close(a.k[:, 0, :, 2:5], a_keys[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(a.k[:, 1:, :, :5], b_keys, rtol=0, atol=0)
    assert a.key_valid[:, :5].tolist() == [[False, False, True, True, True], [False, False, True, True, True],
                                           [True] * 5]
    a.select(torch.tensor([0, 1]))  # the only row using slots 0 and 1 leaves: two leading slots are free
    a.compact()
    assert a.length == 3
    torch.testing.assert_close(a.k[:, 0, :, :3], a_keys[:, 0], rtol=0, atol=0)
    a.reserve(10, limit=32)
    assert a.capacity >= 13 and a.length == 3
    torch.testing.assert_close(a.k[:, 1, :, :3], b_keys[:, 0, :, 2:5], rtol=0, atol=0)


@pytest.mark.parametrize("positional", ["sinusoidal", "rope"])
def test_seq2seq_requests_join_with_their_sources_and_equal_generate_alone(positional, one_thread):
    lm = seq2seq_lm(seed=1, positional=positional)
    engine = Batcher(lm.model, lm.tokenizer, source_tokenizer=lm.source_tokenizer, max_batch=4)
    budgets = [20, 9, 25, 14, 30, 12]
    runs = []
    # sources of 2 to 32 tokens join a batch whose sources are shorter and longer (the cross-attention keys are
    # padded to the longest, masked per row), rows leave at different steps (the longest source leaving trims
    # the padding), and the full batch makes the last two wait
    for i, (source, budget) in enumerate(zip(SOURCES, budgets)):
        runs.append(submit(engine, lm, engine.encode(source), max_tokens=budget, temperature=0, logprobs=2))
        for _ in range(2 + i):
            engine.step()
    drain(engine)
    outputs = []
    for source, budget, run in zip(SOURCES, budgets, runs):
        alone = lm.generate(source, max_new_tokens=budget, temperature=0, logprobs=2)
        assert run.tokens == alone.token_ids and run.text == alone.text  # another row's source changes these
        got = torch.tensor([o.logprob for o in run.outputs])
        # float rounding of batched products is ~1e-6; attending to another source or to padding is off by > 1e-2
        torch.testing.assert_close(got, torch.tensor(alone.logprobs), rtol=0, atol=1e-4)
        outputs.append(tuple(alone.token_ids))
    assert len(set(outputs)) >= 5  # the sources lead to different outputs: a row fed the wrong source shows
    # usage counts the source tokens (with the <eos> that ends each text source), not the decoder's start token
    assert engine.prompt_tokens == sum(len(lm.source_tokenizer.encode(s)) + 1 for s in SOURCES)
    assert engine.generated_tokens == sum(budgets)


def test_seq2seq_limits():
    lm = seq2seq_lm()  # context 32: 32 source positions, 32 target tokens
    engine = Batcher(lm.model, lm.tokenizer)
    engine.make([5] * 32, Options(max_tokens=32), print)  # both at the limit: accepted
    with pytest.raises(GenerationError, match="source is 33 tokens"):
        engine.make([5] * 33, Options(), print)
    with pytest.raises(GenerationError, match="at most 32 target tokens; max_tokens is 33"):
        engine.make([4, 5], Options(max_tokens=33), print)
    with pytest.raises(GenerationError, match="does not score"):
        engine.make([4, 5], Options(max_tokens=0, prompt_logprobs=True), print)


def test_cache_add_rows_carries_sources_and_select_trims_them():
    torch.manual_seed(0)
    lm = seq2seq_lm()
    config = lm.model.config

    def cache_with_sources(lengths):
        """A one-row-per-source cache after its prefill: cross keys/values [sources, kv_heads, S, head_dim]."""
        cache = KVCache(config, len(lengths), 4)
        cache.length = 1
        width = max(lengths)
        cache.cross = [(torch.randn(len(lengths), config.kv_heads, width, config.hidden_head_dim),
                        torch.randn(len(lengths), config.kv_heads, width, config.hidden_head_dim))
                       for _ in range(config.n_layers)]
        valid = torch.arange(width) < torch.tensor(lengths)[:, None]
        cache.memory_mask = (None if bool(valid.all()) else valid[:, None, None, :], False)
        return cache

    a, b = cache_with_sources([3]), cache_with_sources([6, 2])
    a_cross, b_cross = ([tuple(t.clone() for t in kv) for kv in cache.cross] for cache in (a, b))
    a.add_rows(b)
    assert a.batch_size == a.cross_sources == 3 and a.source_length == 6
    assert a.memory_mask[0][:, 0, 0].tolist() == [[True] * 3 + [False] * 3, [True] * 6, [True] * 2 + [False] * 4]
    for layer in range(config.n_layers):
        for t in range(2):
            torch.testing.assert_close(a.cross[layer][t][0, :, :3], a_cross[layer][t][0], rtol=0, atol=0)
            assert not a.cross[layer][t][0, :, 3:].any()  # padding slots hold zeros (masked anyway)
            torch.testing.assert_close(a.cross[layer][t][1:], b_cross[layer][t], rtol=0, atol=0)
    a.select(torch.tensor([0, 2]))  # the 6-token source leaves: its padding goes with it
    assert a.source_length == 3 and a.memory_mask[0][:, 0, 0].tolist() == [[True] * 3, [True] * 2 + [False]]
    torch.testing.assert_close(a.cross[1][0][1, :, :2], b_cross[1][0][1, :, :2], rtol=0, atol=0)
    a.select(torch.tensor([0]))  # one source, unpadded: no mask needed any more
    assert a.memory_mask == (None, False) and a.source_length == 3
    with pytest.raises(ValueError, match="one per source"):
        a.add_rows(KVCache(config, 1, 4))  # rows without their encoded source cannot join a seq2seq batch
