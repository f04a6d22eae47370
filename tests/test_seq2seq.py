"""The encoder-decoder model: against torch.nn.Transformer with the same weights, padding, causality."""
import pytest
import torch
import torch.nn as nn

from tinyformer.model import ModelConfig, Seq2Seq, kernels

from tinyformer.generation import beam_search_batch
from tinyformer.generation.decode import prefill

from .helpers import assert_close_scaled, seq2seq_lm

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor", "ignore:The PyTorch API of nested tensors")


def small(**overrides) -> ModelConfig:
    base = dict(architecture="seq2seq", vocab_size=40, d_model=32, n_layers=2, n_encoder_layers=3, n_heads=4,
                d_ff=48, context_length=24, positional="sinusoidal", mlp="relu", scale_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def seq2seq(seed=0, **overrides) -> Seq2Seq:
    torch.manual_seed(seed)
    model = Seq2Seq(small(**overrides)).eval()
    with torch.no_grad():  # a wide init keeps logits far from flat; norms and biases random so a mis-copy shows
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.25)
            else:
                p.add_(0.3 * torch.randn_like(p))
    return model


def copy_attention(theirs: nn.MultiheadAttention, ours) -> None:
    theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
    theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
    theirs.out_proj.weight.copy_(ours.o_proj.weight)
    theirs.out_proj.bias.copy_(ours.o_proj.bias)


def copy_norm(theirs: nn.LayerNorm, ours) -> None:
    theirs.weight.copy_(ours.weight)
    theirs.bias.copy_(ours.bias)


def torch_transformer(model: Seq2Seq, activation: str) -> nn.Transformer:
    c = model.config
    ref = nn.Transformer(d_model=c.d_model, nhead=c.n_heads, num_encoder_layers=c.encoder_layers,
                         num_decoder_layers=c.n_layers, dim_feedforward=c.ff_dim, dropout=0.0,
                         activation=activation, batch_first=True, norm_first=c.norm_position == "pre").eval()
    with torch.no_grad():
        for theirs, ours in zip(ref.encoder.layers, model.encoder):
            copy_attention(theirs.self_attn, ours.attn)
            copy_norm(theirs.norm1, ours.norm1)
            copy_norm(theirs.norm2, ours.norm2)
        for theirs, ours in zip(ref.decoder.layers, model.decoder):
            copy_attention(theirs.self_attn, ours.attn)
            copy_attention(theirs.multihead_attn, ours.cross_attn)
            copy_norm(theirs.norm1, ours.norm1)
            copy_norm(theirs.norm2, ours.norm_cross)
            copy_norm(theirs.norm3, ours.norm2)
        for theirs, ours in [(t, o) for t, o in zip(ref.encoder.layers, model.encoder)] + \
                            [(t, o) for t, o in zip(ref.decoder.layers, model.decoder)]:
            theirs.linear1.weight.copy_(ours.mlp.up.weight)
            theirs.linear1.bias.copy_(ours.mlp.up.bias)
            theirs.linear2.weight.copy_(ours.mlp.down.weight)
            theirs.linear2.bias.copy_(ours.mlp.down.bias)
        copy_norm(ref.encoder.norm, model.encoder_norm)
        copy_norm(ref.decoder.norm, model.norm)
    return ref


def packed(model: Seq2Seq) -> Seq2Seq:
    """The model as tinyformer.load leaves it: weights in panels, attention through kernels.cpp where it runs."""
    model.pack_for_inference()
    if kernels.library() is not None:  # the encoder's attention goes through kernels.cpp, not SDPA
        assert all(block.attn._attend_kernel is not None and block.attn._packed_kernel is not None
                   for block in model.encoder)
    return model


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("mlp", ["relu", "gelu"])
@pytest.mark.parametrize("pack", [False, True])
def test_encoder_and_decoder_equal_torch_nn_transformer(norm_position, mlp, pack):
    model = seq2seq(norm_position=norm_position, mlp=mlp, gelu_approximate="none")
    ref = torch_transformer(model, mlp)
    if pack:
        model = packed(model)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 40, (3, 11), generator=g)
    src_mask = torch.ones(3, 11, dtype=torch.long)
    src_mask[1, 7:] = 0  # a shorter source, right-padded
    src_mask[2, 4:] = 0
    tgt = torch.randint(3, 40, (3, 9), generator=g)
    with torch.no_grad():
        memory, _ = model.encode(src, src_mask)
        src_x, _ = model.embed(model.tok_emb, src, torch.arange(11).expand(3, 11))
        tgt_x, _ = model.embed(model.tok_emb, tgt, torch.arange(9).expand(3, 9))
        pad = src_mask == 0
        expected_memory = ref.encoder(src_x, src_key_padding_mask=pad)
        real = ~pad
        # float32 against float32 computed another way: ~1e-6 relative; a missing padding mask, a wrong norm
        # position or a mis-wired sublayer moves these by 1e-1 relative or more
        assert_close_scaled(memory[real], expected_memory[real])
        causal = nn.Transformer.generate_square_subsequent_mask(9)
        hidden = ref.decoder(tgt_x, expected_memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
        expected = model.lm_head(hidden)
        got = model(tgt, source_ids=src, source_mask=src_mask)
    assert got.shape == (3, 9, 40)
    assert expected.std() > 0.3
    assert_close_scaled(got, expected)


@pytest.mark.parametrize("pack", [False, True])
def test_a_padded_source_encodes_as_it_does_alone(pack):
    model = packed(seq2seq(seed=2)) if pack else seq2seq(seed=2)
    src = torch.randint(3, 40, (1, 6))
    padded = torch.cat([src, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], 1).long()
    tgt = torch.randint(3, 40, (1, 7))
    with torch.no_grad():
        alone = model.encode(src)[0]
        in_batch = model.encode(padded, mask)[0][:, :6]
        assert_close_scaled(in_batch, alone)
        if pack and kernels.library() is not None:  # every kernel's row is independent of the others: same bits
            assert torch.equal(in_batch, alone)
        assert_close_scaled(model(tgt, source_ids=padded, source_mask=mask), model(tgt, source_ids=src))
        # without the mask the padding leaks in (the test can fail)
        leaked = model(tgt, source_ids=padded)
        assert (leaked - model(tgt, source_ids=src)).abs().max() > 1e-3


def test_inference_skips_the_padding_in_the_encoder_and_the_cross_projections():
    model = seq2seq(seed=4)
    src = torch.randint(3, 40, (3, 10))
    lengths = [10, 6, 3]
    mask = (torch.arange(10) < torch.tensor(lengths)[:, None]).long()
    rows = {}

    def count(name):
        return lambda module, args: rows.setdefault(name, []).append(args[0].shape[:-1].numel())

    model.encoder[1].mlp.up.register_forward_pre_hook(count("encoder feed-forward"))
    model.decoder[0].cross_attn.k_proj.register_forward_pre_hook(count("cross keys"))
    with torch.no_grad():
        memory = model.encode(src, mask)[0]
        assert rows == {"encoder feed-forward": [sum(lengths)]}
        assert (memory[mask == 0] == 0).all()
        model.train()  # (dropout 0) the padded layout: every row computed
        padded = model.encode(src, mask)[0]
        model.eval()
        assert rows["encoder feed-forward"][-1] == 30
        assert_close_scaled(memory[mask == 1], padded[mask == 1])
        logits, _ = prefill(model, [[1]] * 3, 0, 4, sources=(src, mask))
        assert rows["cross keys"] == [sum(lengths)]
        assert_close_scaled(logits, model(torch.ones(3, 1, dtype=torch.long), source_ids=src, source_mask=mask)[:, -1])


def test_the_decoder_is_causal_and_the_encoder_is_not():
    model = seq2seq(seed=3)
    src = torch.randint(3, 40, (2, 8))
    tgt = torch.randint(3, 40, (2, 10))
    with torch.no_grad():
        base = model(tgt, source_ids=src)
        changed = tgt.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % 40
        out = model(changed, source_ids=src)
        assert_close_scaled(out[:, :6], base[:, :6], rel=1e-6)  # the past never sees the future
        assert (out[:, 6:] - base[:, 6:]).abs().max() > 1e-3
        # every encoder position sees every other: changing the last source token changes the first position
        src2 = src.clone()
        src2[:, -1] = (src2[:, -1] + 1) % 40
        assert (model.encode(src2)[0][:, 0] - model.encode(src)[0][:, 0]).abs().max() > 1e-3


# ---------------------------------------------------------------- generation
SOURCES = ["je suis content .", "il est grand", "nous", "农夫山泉 là !"]


@pytest.mark.parametrize("overrides", [{}, dict(norm_position="post", final_norm=False, mlp="silu",
                                                 sinusoidal_layout="halves", lm_head_bias=True)])
def test_cached_decoding_equals_recomputing_every_step(overrides):
    lm = seq2seq_lm(**overrides)
    cached = lm.generate(SOURCES[0], max_new_tokens=20, temperature=0, logprobs=0, stop_token_ids=[])
    plain = lm.generate(SOURCES[0], max_new_tokens=20, temperature=0, logprobs=0, use_cache=False)
    assert cached.token_ids == plain.token_ids and len(cached.token_ids) > 3
    assert_close_scaled(torch.tensor(cached.logprobs), torch.tensor(plain.logprobs))
    # and by hand: each token is the argmax of the full forward over the source and the target so far
    src = torch.tensor([lm.tokenizer.encode(SOURCES[0]) + [lm.tokenizer.eos_id]])
    seq = [lm.tokenizer.bos_id]
    with torch.no_grad():
        for _ in range(len(cached.token_ids)):
            seq.append(int(lm.model(torch.tensor([seq]), source_ids=src)[0, -1].argmax()))
    assert seq[1:] == cached.token_ids


def test_a_batch_of_sources_equals_each_source_alone_greedy_and_beam():
    lm = seq2seq_lm(seed=1)
    greedy = lm.generate(SOURCES, max_new_tokens=16, temperature=0)
    assert greedy == [lm.generate(s, max_new_tokens=16, temperature=0) for s in SOURCES]
    assert len(set(greedy)) > 1  # different sources, different outputs: the test can tell rows apart
    beams = lm.generate(SOURCES, max_new_tokens=12, num_beams=3, num_return_sequences=2, details=True)
    for source, batched in zip(SOURCES, beams):
        alone = lm.generate(source, max_new_tokens=12, num_beams=3, num_return_sequences=2, details=True)
        assert batched.token_ids == alone.token_ids
        assert batched.score == pytest.approx(alone.score, rel=1e-5)
        assert [a.token_ids for a in batched.alternatives] == [a.token_ids for a in alone.alternatives]


def test_one_beam_is_greedy_and_cached_beams_equal_uncached():
    lm = seq2seq_lm(seed=2)
    assert lm.generate(SOURCES, max_new_tokens=12, num_beams=1, temperature=0) == \
        [lm.tokenizer.decode(b[0].tokens) for b in beam_search_batch(
            lm.model, [[lm.tokenizer.bos_id]] * len(SOURCES), num_beams=1, max_new_tokens=12,
            eos_ids={lm.tokenizer.eos_id}, sources=_sources(lm, SOURCES))]
    a = lm.generate(SOURCES, max_new_tokens=10, num_beams=4, details=True)
    b = lm.generate(SOURCES, max_new_tokens=10, num_beams=4, details=True, use_cache=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


def _sources(lm, texts):
    from tinyformer.generation.decode import pad_sources

    return pad_sources([lm.tokenizer.encode(t) + [lm.tokenizer.eos_id] for t in texts], lm.tokenizer.pad_id, "cpu")


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_wide_beams_equals_exhaustive_search(length_penalty):
    import itertools

    lm = seq2seq_lm(seed=4, vocab_size=5)
    model, eos, bos = lm.model, 2, 1
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # sharpen so lengths matter
    source = torch.tensor([[3, 4, 3, 2]])
    best = (float("-inf"), None)
    for length in range(1, 4):  # every sequence of up to 3 tokens; shorter ones end with <eos>
        for seq in itertools.product(range(5), repeat=length):
            if eos in seq[:-1] or (length < 3 and seq[-1] != eos):
                continue
            with torch.no_grad():
                logp = model(torch.tensor([[bos, *seq[:-1]]]), source_ids=source)[0].log_softmax(-1)
            total = sum(logp[i, t].item() for i, t in enumerate(seq))
            score = total / length ** length_penalty
            if score > best[0]:
                best = (score, [t for t in seq if t != eos])
    beams = beam_search_batch(model, [[bos]], num_beams=25, max_new_tokens=3, eos_ids={eos},
                              length_penalty=length_penalty, sources=(source, torch.ones_like(source)))[0]
    assert beams[0].tokens == best[1]
    # float32 log-softmax: a log-probability near 0 is known to ~1e-7 (sums of exps rounded at 1.0)
    assert beams[0].score == pytest.approx(best[0], rel=1e-5, abs=1e-6)


def test_sampling_with_every_processor_is_seeded_and_batch_independent():
    lm = seq2seq_lm(seed=5)
    kw = dict(max_new_tokens=12, temperature=0.9, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
              presence_penalty=0.3, frequency_penalty=0.2, no_repeat_ngram_size=3)
    a, b = lm.generate(SOURCES[0], seed=3, **kw), lm.generate(SOURCES[0], seed=3, **kw)
    assert a == b and isinstance(a, str)


def test_streaming_and_trace_show_the_source_tokens_attended():
    lm = seq2seq_lm(seed=6)
    whole = lm.generate("农夫山泉", max_new_tokens=10, temperature=0)
    assert "".join(lm.generate("农夫山泉", max_new_tokens=10, temperature=0, stream=True)) == whole
    traced = lm.generate("农夫山泉", max_new_tokens=5, temperature=0, trace=True)
    step = traced.trace[0]
    assert len(step.top) == 5 and len(step.source) == 3
    weights = [w for _, w in step.source]
    assert weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1 + 1e-6
    assert {t for t, _ in step.source} <= set("农夫山泉") | {"<eos>"}


def test_bad_sources_get_one_clear_line():
    lm = seq2seq_lm(context_length=8)
    with pytest.raises(ValueError, match=r"source 0 is 14 tokens with its <eos>, longer than this model's 8 source positions"):
        lm.generate("je suis grand", max_new_tokens=3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        lm.generate("", max_new_tokens=3)
    # the target is capped at the decoder's positions instead of failing
    out = lm.generate("je", max_new_tokens=50, temperature=0, details=True, stop_token_ids=[])
    assert len(out.token_ids) <= 8
