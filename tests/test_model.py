import pytest
import torch

from tinyformer import ConfigError, ModelConfig, preset
from tinyformer.model import GPT

from .helpers import assert_close_scaled, tiny_model

KINDS = ["tiny", "llama-tiny", "book"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_shape(kind):
    model = tiny_model(kind, vocab_size=50)
    out = model(torch.randint(0, 50, (3, 7)))
    assert out.shape == (3, 7, 50)


@pytest.mark.parametrize("kind", KINDS)
def test_causal_mask_future_tokens_never_change_the_past(kind):
    model = tiny_model(kind, vocab_size=50)
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 20))
    base = model(ids)
    for t in (0, 5, 18):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(0, 50, changed[:, t + 1:].shape)
        out = model(changed)
        assert_close_scaled(out[:, :t + 1], base[:, :t + 1], rel=1e-6)
        if t + 1 < 20:  # and the future does change, by far more than the tolerance (the test can fail)
            assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-3 * base.abs().max()


def test_left_padding_with_mask_equals_unpadded():
    model = tiny_model("tiny", vocab_size=50)
    ids = torch.randint(0, 50, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], 1).long()
    out = model(padded, attention_mask=mask)[:, 4:]
    assert_close_scaled(out, model(ids))  # attending to one padding key moves logits by 1e-2 relative or more


def test_dropout_only_in_train_mode():
    model = tiny_model("tiny", vocab_size=50, dropout=0.5)
    ids = torch.randint(0, 50, (2, 10))
    assert torch.equal(model(ids), model(ids))
    model.train()
    assert not torch.equal(model(ids), model(ids))


def test_gqa_has_fewer_kv_weights():
    model = tiny_model("llama-tiny", vocab_size=50)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)


def test_tied_embeddings_share_storage():
    model = tiny_model("tiny")
    assert model.lm_head.weight is model.tok_emb.weight
    untied = tiny_model("tiny", tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(preset("gpt2", vocab_size=50257))
    assert model.num_parameters() == 124_439_808


@pytest.mark.parametrize("changes, word", [
    (dict(d_model=30, n_heads=4), "divisible"), (dict(n_heads=4, n_kv_heads=3), "multiple"),
    (dict(positional="alibi"), "alibi"), (dict(norm="batchnorm"), "batchnorm"), (dict(mlp="tanh"), "tanh"),
    (dict(dropout=1.5), "dropout"), (dict(n_layers=0), "n_layers")])
def test_bad_config_is_one_clear_error(changes, word):
    with pytest.raises(ConfigError, match=word):
        ModelConfig(**changes)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_input_longer_than_context_is_refused_clearly():
    model = tiny_model("tiny", vocab_size=50, context_length=8)
    with pytest.raises(ValueError, match="longer than context_length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_packed_linear_matches_plain_and_never_uses_stale_weights():
    from tinyformer.model.layers import Linear

    torch.manual_seed(0)
    layer = Linear(16, 24)
    x = torch.randn(5, 16)
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.pack()
    with torch.no_grad():
        assert_close_scaled(layer(x), plain)
        assert_close_scaled(layer(x[:1]), plain[:1])
        layer.weight.mul_(2)  # an in-place update (a training step, load_state_dict) outdates the packed copy
        assert_close_scaled(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # stale: 50% off
    assert layer(x).requires_grad  # with autograd on, the plain path runs


def test_packing_keeps_logits_and_state_dict():
    model = tiny_model("tiny", vocab_size=50)
    ids = torch.randint(0, 50, (3, 12))
    before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.pack_for_inference()
    with torch.no_grad():
        assert_close_scaled(model(ids), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.tok_emb.weight
