import itertools
import math

import pytest
import torch

from tinyformer import LanguageModel, get_tokenizer
from tinyformer.generation import GenerationError, KVCache, TextTracker, beam_search, kv_cache_bytes
from tinyformer.generation.cache import BufferPool
from tinyformer.generation.processors import (History, MinP, NoRepeatNGram, PresenceFrequencyPenalty,
                                              RepetitionPenalty, Temperature, TopK, TopP)

from .helpers import assert_close_scaled, char_lm, tiny_model

KINDS = ["tiny", "llama-tiny", "book"]


# ---------------------------------------------------------------- cache
@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_equal_uncached(kind):
    model = tiny_model(kind, vocab_size=60)
    ids = torch.randint(0, 60, (2, 24))
    full = model(ids)
    cache = KVCache(model.config, 2, 32)
    steps = [model(ids[:, :9], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(9, 24)]
    # a cache bug (wrong slot, position or mask) changes logits by 1e-2 relative or more
    assert_close_scaled(torch.cat(steps, 1), full)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_greedy_equals_uncached_even_past_the_context(kind):
    lm = char_lm(kind, context_length=16)
    cached = lm.generate("Speak", max_new_tokens=40, temperature=0, logprobs=0, window="recompute")
    plain = lm.generate("Speak", max_new_tokens=40, temperature=0, logprobs=0, use_cache=False)
    assert cached.token_ids == plain.token_ids and len(cached.token_ids) == 40
    assert_close_scaled(torch.tensor(cached.logprobs), torch.tensor(plain.logprobs))


def test_sliding_window_equals_generating_from_the_cropped_context():
    lm = char_lm("tiny", context_length=16)
    prompt = lm.tokenizer.encode("Before we proceed any further")  # 29 tokens > 16
    out = lm.generate([prompt], max_new_tokens=20, temperature=0)[0]
    cropped = lm.generate([prompt[-16:]], max_new_tokens=20, temperature=0)[0]
    assert out == cropped
    # and by hand: each step's token is the argmax over the last 16 tokens
    seq = list(prompt)
    for _ in range(20):
        seq.append(int(lm.model(torch.tensor([seq[-16:]]))[0, -1].argmax()))
    assert seq[len(prompt):] == out


def test_rolling_cache_on_one_layer_rope_equals_cropping():
    # with one layer, sliding-window attention over cached keys is exactly attention over the cropped window
    lm = char_lm("llama-tiny", context_length=12, n_layers=1)
    rolled = lm.generate("Speak, speak", max_new_tokens=30, temperature=0, logprobs=0, window="roll")
    exact = lm.generate("Speak, speak", max_new_tokens=30, temperature=0, logprobs=0, use_cache=False)
    assert rolled.token_ids == exact.token_ids
    assert_close_scaled(torch.tensor(rolled.logprobs), torch.tensor(exact.logprobs))


def test_roll_is_refused_for_absolute_positions():
    with pytest.raises(GenerationError, match="window='roll' needs relative"):
        char_lm("tiny").generate("Hi", window="roll", max_new_tokens=2)


def test_kv_cache_bytes_formula():
    model = tiny_model("llama-tiny")  # 2 layers, 2 kv heads, head dim 8
    assert kv_cache_bytes(model.config, batch_size=3, length=10) == 2 * 2 * 2 * 8 * 10 * 3 * 4
    assert KVCache(model.config, 3, 10).nbytes() == kv_cache_bytes(model.config, 3, 10)


def test_buffer_pool_reuses_a_buffer_only_when_nothing_else_refers_to_it():
    pool = BufferPool(limit=4000)
    kept = torch.empty(10, 10)
    address = kept.data_ptr()
    pool.give(kept)
    del kept
    reused = pool.take((10, 10), torch.float32, "cpu")
    assert reused.data_ptr() == address and not pool.spare
    assert pool.take((10, 10), torch.float32, "cpu").data_ptr() != address  # handed out once only
    assert pool.take((10, 10), torch.float64, "cpu").dtype == torch.float64  # no match: a new one
    view = reused[2:4]
    pool.give(reused)
    del reused
    assert pool.take((10, 10), torch.float32, "cpu").data_ptr() != address  # a view of it lives: not reused
    held = torch.empty(3)
    pool.give(held)
    assert pool.take((3,), torch.float32, "cpu") is not held  # its owner still holds it
    pool.give(torch.empty(500), torch.empty(500), torch.empty(10))  # 4040 bytes > 4000: the oldest goes
    assert [b.shape[0] for b in pool.spare] == [500, 10]
    pool.give(view)  # a view is never kept
    assert len(pool.spare) == 2
    with torch.inference_mode():
        made = torch.empty(7)
        address = made.data_ptr()
        pool.give(made)
        del made
    outside = pool.take((7,), torch.float32, "cpu")  # an inference tensor could not be written outside that mode
    assert outside.data_ptr() != address and not outside.is_inference()
    with torch.inference_mode():
        assert pool.take((7,), torch.float32, "cpu").data_ptr() == address
    pool.give(torch.empty(4, device="meta"))  # CPU memory only
    assert len(pool.spare) == 2
    pool.clear()
    assert not pool.spare


def test_generations_after_reused_cache_buffers_are_unchanged():
    lm = char_lm("tiny", context_length=32)
    first = lm.generate(["All:", "Speak"], max_new_tokens=12, num_beams=3)
    with_garbage = [lm.generate(["Before we", "x"], max_new_tokens=20, num_beams=2)]  # fills the pool's buffers
    assert lm.generate(["All:", "Speak"], max_new_tokens=12, num_beams=3) == first
    assert with_garbage[0] == lm.generate(["Before we", "x"], max_new_tokens=20, num_beams=2)


# ---------------------------------------------------------------- batching
@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_equal_single_runs(kind):
    lm = char_lm(kind, context_length=32)
    prompts = ["All:", "Before we proceed", "S", "hear me speak.\n"]
    batch = lm.generate(prompts, max_new_tokens=25, temperature=0)
    alone = [lm.generate(p, max_new_tokens=25, temperature=0) for p in prompts]
    assert batch == alone


def test_rows_finish_independently():
    lm = char_lm("tiny")
    first = lm.generate("All:", max_new_tokens=6, temperature=0, details=True)
    stop_id = first.token_ids[3]  # make row 0 stop at its 4th token
    prompts = ["All:", "Before we proceed"]
    batch = lm.generate(prompts, max_new_tokens=20, temperature=0, stop_token_ids=[stop_id], details=True)
    alone = [lm.generate(p, max_new_tokens=20, temperature=0, stop_token_ids=[stop_id], details=True)
             for p in prompts]
    assert batch[0].finish_reason == "eos" and len(batch[0].token_ids) <= 3
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]


def test_token_id_prompts_return_token_ids():
    lm = char_lm()
    ids = lm.tokenizer.encode("Speak")
    out = lm.generate([ids, ids[:2]], max_new_tokens=5, temperature=0)
    assert all(isinstance(t, int) for row in out for t in row) and len(out) == 2
    assert lm.tokenizer.decode(out[0]) == lm.generate("Speak", max_new_tokens=5, temperature=0)


def test_same_seed_same_sample_different_seed_differs():
    lm = char_lm()
    kw = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.95)
    a, b, c = (lm.generate("All:", seed=s, **kw) for s in (7, 7, 8))
    assert a == b and a != c


def test_logprobs_are_the_models_log_softmax():
    lm = char_lm()
    r = lm.generate("Speak", max_new_tokens=5, temperature=0, logprobs=3)
    seq = lm.tokenizer.encode("Speak")
    for token, lp, top in zip(r.token_ids, r.logprobs, r.top_logprobs):
        expected = lm.model(torch.tensor([seq]))[0, -1].log_softmax(-1)
        torch.testing.assert_close(lp, expected[token].item(), rtol=1e-5, atol=1e-5)  # a log-prob is O(1)
        assert [t for t, _ in top] == expected.topk(3).indices.tolist()
        seq.append(token)


# ---------------------------------------------------------------- processors, by hand
def _history(*rows):
    return History([list(r) for r in rows])


def test_temperature_divides():
    out = Temperature(2.0)(torch.tensor([[2.0, -4.0]]), _history([]))
    assert out.tolist() == [[1.0, -2.0]]


def test_top_k_keeps_k_largest():
    out = TopK(2)(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), _history([]))
    assert torch.isinf(out).tolist() == [[True, False, False, True]]


@pytest.mark.parametrize("p, kept", [(0.4, 1), (0.55, 2), (0.75, 2), (0.85, 3), (1.0, 3)])
def test_top_p_is_inclusive_of_the_boundary_token(p, kept):
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    out = TopP(p)(logits.clone(), _history([]))
    assert (~torch.isinf(out)).sum().item() == kept
    assert not torch.isinf(out[0, 0])  # the most likely token always survives


def test_top_p_works_on_unsorted_logits():
    logits = torch.tensor([[math.log(0.2), math.log(0.5), math.log(0.3)]])
    out = TopP(0.75)(logits, _history([]))
    assert torch.isinf(out).tolist() == [[True, False, False]]


def test_min_p_relative_threshold():
    logits = torch.tensor([[0.6, 0.25, 0.1, 0.05]]).log()
    out = MinP(0.2)(logits, _history([]))  # threshold 0.12
    assert torch.isinf(out).tolist() == [[False, False, True, True]]


def test_repetition_penalty_ctrl_rule():
    out = RepetitionPenalty(2.0)(torch.tensor([[2.0, -2.0, 1.0]]), _history([0, 1, 1]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties_are_additive():
    history = _history([])
    history.generated_counts = torch.tensor([[2.0, 0.0, 1.0]])
    out = PresenceFrequencyPenalty(0.5, 0.1)(torch.zeros(1, 3), history)
    assert torch.allclose(out, torch.tensor([[-0.7, 0.0, -0.6]]))


@pytest.mark.parametrize("n, tokens, banned", [(2, [1, 2, 3, 1], {2}), (3, [1, 2, 3, 1, 2], {3}),
                                               (2, [1, 2, 1, 3, 1], {2, 3}), (1, [4, 0], {0, 4})])
def test_no_repeat_ngram(n, tokens, banned):
    out = NoRepeatNGram(n)(torch.zeros(1, 5), _history(tokens))
    assert {i for i in range(5) if torch.isinf(out[0, i])} == banned


def test_repetition_penalty_changes_generation():
    lm = char_lm()
    plain = lm.generate("All:", max_new_tokens=30, temperature=0)
    penalised = lm.generate("All:", max_new_tokens=30, temperature=0, repetition_penalty=5.0)
    assert plain != penalised
    ngram = lm.generate("All:", max_new_tokens=40, temperature=0, no_repeat_ngram_size=2, details=True)
    seq = lm.tokenizer.encode("All:") + ngram.token_ids
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"), (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(no_repeat_ngram_size=-2), "no_repeat_ngram_size"), (dict(num_beams=0), "num_beams"),
    (dict(logprobs=-1), "logprobs"), (dict(window="wide"), "window 'wide'")])
def test_invalid_parameters_are_clear_errors(options, message):
    with pytest.raises(GenerationError, match=message):
        char_lm().generate("Hi", **{"max_new_tokens": 3, **options})


def test_empty_prompt_and_bad_token_ids_are_refused():
    lm = char_lm()
    with pytest.raises(GenerationError, match="prompt 0 is empty"):
        lm.generate("")
    with pytest.raises(GenerationError, match="token id 999 is outside"):
        lm.generate([[1, 999]])
    with pytest.raises(GenerationError, match="prompts must be"):
        lm.generate(42)


# ---------------------------------------------------------------- stop strings and streaming
def test_stop_string_across_token_boundaries():
    lm = char_lm()
    free = lm.generate("All:", max_new_tokens=30, temperature=0)
    stop = free[5:8]  # three characters = three tokens
    cut = lm.generate("All:", max_new_tokens=30, temperature=0, stop=[stop], details=True)
    assert cut.text == free[:free.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(lm.generate("All:", max_new_tokens=30, temperature=0, stop=[stop], stream=True))
    assert streamed == cut.text


def test_stream_holds_back_a_possible_stop_string():
    tok = get_tokenizer("char", "abcdefgh xyz")
    tracker = TextTracker(tok, stop=["def"])
    deltas = []
    for ch in "abcdxde":
        tracker.add(tok.encode(ch)[0])
        deltas.append(tracker.delta())
    assert deltas == ["a", "b", "c", "", "dx", "", ""]  # "d" and "de" might start "def"
    tracker.add(tok.encode("f")[0])
    assert tracker.stopped and tracker.text == "abcdx" and tracker.delta() == ""


@pytest.mark.parametrize("spec", ["cl100k_base", "bpe:270"])
def test_stream_never_breaks_a_chinese_character(spec):
    text = "农夫山泉 有点甜，你好世界🙂"
    tok = get_tokenizer(spec, "hello world, 你好 " * 10)  # a small BPE splits most Chinese characters into bytes
    tracker = TextTracker(tok)
    deltas = []
    for token in tok.encode(text):
        tracker.add(token)
        deltas.append(tracker.delta())
    tracker.flush()
    deltas.append(tracker.delta(final=True))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d == "") > 0  # some tokens were partial characters, held back


def test_streaming_a_bpe_model_equals_the_full_text():
    text = "农夫山泉 有点甜。" * 40 + "hello world " * 20
    tok = get_tokenizer("bpe:300", text)
    lm = LanguageModel(tiny_model("tiny", vocab_size=tok.vocab_size), tok)
    full = lm.generate("农夫", max_new_tokens=40, temperature=1.0, seed=3)
    deltas = list(lm.generate("农夫", max_new_tokens=40, temperature=1.0, seed=3, stream=True))
    assert "".join(deltas) == full


def test_stream_for_several_prompts_yields_indexed_deltas():
    lm = char_lm()
    pieces = list(lm.generate(["All:", "Speak"], max_new_tokens=8, temperature=0, stream=True))
    joined = ["".join(d for i, d in pieces if i == k) for k in (0, 1)]
    assert joined == lm.generate(["All:", "Speak"], max_new_tokens=8, temperature=0)


# ---------------------------------------------------------------- beam search
def _exhaustive_best(model, prompt, eos, max_new, length_penalty):
    vocab = model.config.vocab_size
    best = (-math.inf, None)
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(vocab), repeat=n):
            if eos in seq[:-1] or (n < max_new and seq[-1] != eos):
                continue  # <eos> ends a hypothesis; only max-length ones may end without it
            ids = torch.tensor([prompt + list(seq)])
            logp = model(ids)[0].log_softmax(-1)
            total = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))
            score = total / n ** length_penalty
            if score > best[0]:
                best = (score, [t for t in seq if t != eos])
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_wide_beams_equals_exhaustive_search(length_penalty):
    model = tiny_model("tiny", vocab_size=5, seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharpen the distribution so lengths matter
    prompt, eos = [1, 3], 2
    score, tokens = _exhaustive_best(model, prompt, eos, 3, length_penalty)
    beams = beam_search(model, prompt, num_beams=25, max_new_tokens=3, eos_ids={eos},
                        length_penalty=length_penalty)
    assert beams[0].tokens == tokens
    assert beams[0].score == pytest.approx(score, rel=1e-5)  # another hypothesis would score 1e-2 apart or more


def test_beam_search_returns_n_best_sorted_and_one_beam_is_greedy():
    lm = char_lm()
    r = lm.generate("All:", max_new_tokens=12, num_beams=4, num_return_sequences=3, details=True)
    scores = [r.score] + [a.score for a in r.alternatives]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    one = lm.generate("All:", max_new_tokens=12, num_beams=1, temperature=0)
    assert beam_search(lm.model, lm.tokenizer.encode("All:"), num_beams=1, max_new_tokens=12,
                       eos_ids={lm.tokenizer.eos_id})[0].tokens == lm.tokenizer.encode(one)


def test_beam_search_cached_equals_uncached():
    lm = char_lm("llama-tiny")
    a = lm.generate("Speak", max_new_tokens=10, num_beams=3, details=True)
    b = lm.generate("Speak", max_new_tokens=10, num_beams=3, details=True, use_cache=False)
    assert a.token_ids == b.token_ids and a.score == pytest.approx(b.score, rel=1e-5)


# ---------------------------------------------------------------- trace
def test_trace_records_top5_and_text_so_far():
    lm = char_lm()
    r = lm.generate(["All:", "Speak"], max_new_tokens=6, temperature=0, trace=True)
    for row in r:
        assert len(row.trace) == 6
        for k, step in enumerate(row.trace):
            assert len(step.top) == 5 and step.top[0][0] == step.token  # greedy picks the top candidate
            assert step.top[0][1] >= step.top[1][1] and step.prob == pytest.approx(step.top[0][1], rel=1e-6)
            assert step.text == row.text[:k + 1]


def test_sampling_only_draws_allowed_tokens_with_the_right_frequencies():
    from tinyformer.generation.decode import sample

    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]]).repeat(4000, 1)
    samplers = [TopK(3), TopP(0.7)]  # top-k keeps 3; top-p then keeps 0.5 and 0.3 (renormalised: 5/8, 3/8)
    drawn = sample(logits, samplers, History([[]] * 4000), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 5 / 8) < 0.03
