"""Hugging Face interop: GPT-2 / Llama directories built locally with transformers (never downloaded) load into
tinyformer with the same logits and greedy tokens; tinyformer models export back without missing weights."""
import json
import logging
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

import tinyformer  # noqa: E402
from tinyformer import GPT, CheckpointError, ModelConfig  # noqa: E402
from tinyformer.interop.hf import export_hf, load_hf  # noqa: E402
from tinyformer.tokenizers import HFTokenizer, get_tokenizer  # noqa: E402

from .helpers import assert_close_scaled  # noqa: E402

transformers.logging.disable_progress_bar()
MAX_DIFF = {}  # family -> largest logit difference seen (printed at the end with -s)


def tokens(seed, vocab, shape=(2, 24)):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def greedy(forward, prompt, steps):
    """Plain greedy decoding with the full forward every step (no cache)."""
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


def assert_same_model(ours, theirs, vocab, family, steps=200):
    with torch.no_grad():
        x = tokens(1, vocab)
        expected = theirs(x).logits
        got = ours(x)
    assert expected.std() > 0.1, "logits too flat to test anything"
    MAX_DIFF[family] = max(MAX_DIFF.get(family, 0.0), (got - expected).abs().max().item())
    # seen: < 3e-7 relative; a mis-mapped weight, norm epsilon or RoPE layout moves logits by 1e-2 relative or more
    assert_close_scaled(got, expected, rel=1e-5)
    prompt = tokens(2, vocab, (1, 8))
    ours_ids = greedy(ours, prompt, steps)
    # transformers' own greedy search (with its KV cache)
    theirs_ids = theirs.generate(prompt, do_sample=False, max_new_tokens=steps)[:, prompt.shape[1]:]
    assert theirs_ids.shape == (1, steps) and torch.equal(ours_ids, theirs_ids)


def hf_model(kind, seed, **config):
    torch.manual_seed(seed)
    # A large init spread keeps logits far from ties, so greedy decoding is a sharp test.
    config.setdefault("initializer_range", 0.3)
    config.update(bos_token_id=None, eos_token_id=None)  # no eos: generate() must not stop early
    model = (GPT2LMHeadModel(GPT2Config(**config)) if kind == "gpt2" else LlamaForCausalLM(LlamaConfig(**config)))
    with torch.no_grad():  # HF initialises norms to 1/0 and biases to 0: randomise them so the mapping shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                is_norm_weight = name.endswith("weight") and ("norm" in name or ".ln_" in name)
                p.copy_((1.0 if is_norm_weight else 0.0) + 0.2 * torch.randn_like(p))
    return model.eval()


GPT2_CASES = {
    "odd-tied-gelu_new": dict(vocab_size=97, n_embd=36, n_head=3, n_layer=2, n_positions=256),
    "untied-exact-gelu-ninner-bin": dict(vocab_size=211, n_embd=64, n_head=4, n_layer=3, n_positions=256,
                                         activation_function="gelu", n_inner=100, tie_word_embeddings=False,
                                         layer_norm_epsilon=1e-6),
    "sharded": dict(vocab_size=128, n_embd=48, n_head=2, n_layer=2, n_positions=300,
                    activation_function="gelu_pytorch_tanh"),
}
LLAMA_CASES = {
    "gqa-untied-theta": dict(vocab_size=97, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                             intermediate_size=80, num_hidden_layers=2, rope_parameters={"rope_type": "default",
                                                                                          "rope_theta": 500000.0}),
    "mqa-tied-head_dim-attnbias-sharded": dict(vocab_size=131, hidden_size=32, num_attention_heads=4,
                                               num_key_value_heads=1, head_dim=16, intermediate_size=56,
                                               num_hidden_layers=2, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                               attention_bias=True),
    "mha-bias-bin": dict(vocab_size=64, hidden_size=40, num_attention_heads=5, intermediate_size=64,
                         num_hidden_layers=3, attention_bias=True, mlp_bias=True),
}


def save_as_pickle(model, directory):
    """The older pytorch_model.bin layout (transformers 5 always writes safetensors, even when asked not to)."""
    model.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")


def save(model, directory, case):
    if "sharded" in case:
        model.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").is_file()
    elif case.endswith("bin"):
        save_as_pickle(model, directory)
    else:
        model.save_pretrained(directory)
        assert (directory / "model.safetensors").is_file()


@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2_matches_transformers(tmp_path, case):
    theirs = hf_model("gpt2", 10 + list(GPT2_CASES).index(case), **GPT2_CASES[case])
    save(theirs, tmp_path, case)
    ours, tokenizer, config, _ = load_hf(tmp_path, "cpu")
    assert not ours.training and config["format"] == "hf" and config["source"] == str(tmp_path)
    assert tokenizer is None  # no tokenizer.json in the directory
    assert ours.config.tie_embeddings == theirs.config.tie_word_embeddings
    assert_same_model(ours, theirs, GPT2_CASES[case]["vocab_size"], "gpt2")


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_matches_transformers(tmp_path, case):
    theirs = hf_model("llama", 20 + list(LLAMA_CASES).index(case), **LLAMA_CASES[case])
    save(theirs, tmp_path, case)
    ours, _, config, _ = load_hf(tmp_path, "cpu")
    assert config["model"]["positional"] == "rope"
    assert_same_model(ours, theirs, LLAMA_CASES[case]["vocab_size"], "llama")


def test_rope_theta_is_read(tmp_path):
    hf_model("llama", 3, **LLAMA_CASES["gqa-untied-theta"]).save_pretrained(tmp_path)
    assert load_hf(tmp_path)[0].config.rope_theta == 500000.0


def test_tokenizer_and_api_dispatch(tmp_path):
    text = "the quick brown fox jumps over the lazy dog " * 20
    trained = get_tokenizer("bpe:300", text)
    fast = PreTrainedTokenizerFast(tokenizer_object=trained.tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")
    fast.save_pretrained(tmp_path)
    hf_model("gpt2", 4, vocab_size=trained.vocab_size, n_embd=32, n_head=2, n_layer=1,
             n_positions=64).save_pretrained(tmp_path)
    lm = tinyformer.load(tmp_path, device="cpu")
    assert isinstance(lm.tokenizer, HFTokenizer)
    assert lm.tokenizer.encode("the lazy fox") == trained.encode("the lazy fox")
    assert (lm.tokenizer.bos_id, lm.tokenizer.eos_id, lm.tokenizer.pad_id) == \
           (trained.bos_id, trained.eos_id, trained.pad_id)


# ------------------------------------------------------------------------------------------------- export

def random_tinyformer(config, seed):
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    return model.eval()


EXPORT_CASES = {
    "gpt2-tied": dict(vocab_size=101, d_model=48, n_layers=2, n_heads=4, d_ff=72, context_length=64),
    "gpt2-untied-exact-gelu": dict(vocab_size=57, d_model=30, n_layers=2, n_heads=3, context_length=40,
                                   gelu_approximate="none", tie_embeddings=False, norm_eps=1e-6),
    "gpt2-relu": dict(vocab_size=50, d_model=32, n_layers=1, n_heads=2, context_length=32, mlp="relu"),
    "llama-gqa-untied": dict(vocab_size=99, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=88,
                             context_length=128, positional="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
                             bias=False, tie_embeddings=False, rope_theta=20000.0),
    "llama-tied-bias-head_dim": dict(vocab_size=70, d_model=32, n_layers=2, n_heads=4, head_dim=12, d_ff=40,
                                     context_length=64, positional="rope", norm="rmsnorm", mlp="swiglu", bias=True,
                                     tie_embeddings=True),
}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def from_pretrained_quietly(directory):
    """Load with transformers and return (model, every warning it logged or raised)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not any(info.values()), info  # missing / unexpected / mismatched keys, error messages
    return model.eval(), handler.messages + [str(w.message) for w in caught]


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_round_trip(tmp_path, case):
    ours = random_tinyformer(ModelConfig(**EXPORT_CASES[case]), seed=30 + list(EXPORT_CASES).index(case))
    notes = export_hf(ours, None, tmp_path / "out")
    assert notes == ["no tokenizer given; none written"]
    theirs, messages = from_pretrained_quietly(tmp_path / "out")
    assert messages == []  # no missing/unexpected/newly-initialised weights, nor any other warning
    with torch.no_grad():
        x = tokens(5, ours.config.vocab_size, (2, min(ours.config.context_length, 32)))
        expected = theirs(x).logits
        got = ours(x)
    family = "export-" + case.split("-")[0]
    MAX_DIFF[family] = max(MAX_DIFF.get(family, 0.0), (got - expected).abs().max().item())
    assert expected.std() > 0.1
    assert_close_scaled(got, expected, rel=1e-5)
    # And back again: our own loader reads what we wrote, bit for bit.
    again = load_hf(tmp_path / "out")[0]
    assert torch.equal(again(x), ours(x))


def test_export_with_tokenizer(tmp_path):
    text = "hello world, hello tinyformer " * 20
    tokenizer = get_tokenizer("bpe:280", text)
    model = random_tinyformer(ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                          context_length=32), seed=7)
    assert export_hf(model, tokenizer, tmp_path) == []
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == tokenizer.encode("hello world")
    assert hf_tok.eos_token == "<eos>"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eos_id
    assert load_hf(tmp_path)[1].encode("hello world") == tokenizer.encode("hello world")
    # tiktoken: weights are still exported, the note says the tokenizer is not
    notes = export_hf(model, get_tokenizer("cl100k_base"), tmp_path / "tik")
    assert len(notes) == 1 and "cl100k_base" in notes[0] and not (tmp_path / "tik" / "tokenizer.json").exists()


@pytest.mark.parametrize("changes, setting", [
    (dict(positional="sinusoidal"), "positional 'sinusoidal'"),
    (dict(positional="rope", norm="rmsnorm", mlp="relu"), "mlp 'relu'"),
    (dict(positional="learned", norm="rmsnorm"), "norm 'rmsnorm'"),
    (dict(lm_head_bias=True), "lm_head_bias"),
    (dict(bias=False), "bias=False"),
    (dict(n_kv_heads=1), "n_kv_heads 1"),
    (dict(positional="rope", norm="rmsnorm", mlp="gelu"), "mlp 'gelu'"),
])
def test_export_refuses_unmappable_config(tmp_path, changes, setting):
    model = GPT(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, context_length=16, **changes))
    with pytest.raises(CheckpointError, match="cannot export") as error:
        export_hf(model, None, tmp_path / "out")
    assert setting in str(error.value)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []  # nothing half-written


def test_export_over_existing_directory(tmp_path):
    first = random_tinyformer(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, context_length=16), 1)
    second = random_tinyformer(first.config, 2)
    export_hf(first, None, tmp_path / "out")
    export_hf(second, None, tmp_path / "out")
    x = tokens(0, 40, (1, 8))
    assert torch.equal(load_hf(tmp_path / "out")[0](x), second(x))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp directory left behind


# ------------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def gpt2_dir(tmp_path):
    hf_model("gpt2", 0, vocab_size=50, n_embd=16, n_head=2, n_layer=2, n_positions=32).save_pretrained(tmp_path)
    return tmp_path


def rewrite_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_weight_is_named(gpt2_dir):
    rewrite_weights(gpt2_dir, lambda s: s.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_hf(gpt2_dir)


def test_wrong_shape_is_named(gpt2_dir):
    rewrite_weights(gpt2_dir, lambda s: s.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(16, 47)}))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.c_attn\.weight has shape \(16, 47\), "
                                              r"the config needs \(16, 48\)"):
        load_hf(gpt2_dir)


def test_unexpected_weight_is_named(gpt2_dir):
    rewrite_weights(gpt2_dir, lambda s: s.update({"transformer.h.2.ln_1.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"unexpected weight\(s\) transformer\.h\.2\.ln_1\.weight"):
        load_hf(gpt2_dir)


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unsupported_model_type(gpt2_dir):
    edit_config(gpt2_dir, model_type="bert", architectures=["BertForMaskedLM"])
    with pytest.raises(CheckpointError, match="unsupported model_type 'bert'"):
        load_hf(gpt2_dir)


def test_unsupported_architecture(gpt2_dir):
    edit_config(gpt2_dir, architectures=["GPT2ForSequenceClassification"])
    with pytest.raises(CheckpointError, match="unsupported architecture GPT2ForSequenceClassification"):
        load_hf(gpt2_dir)


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope_type 'linear'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_llama_settings(tmp_path, changes, message):
    hf_model("llama", 0, vocab_size=32, hidden_size=16, num_attention_heads=2, intermediate_size=24,
             num_hidden_layers=1).save_pretrained(tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    save_as_pickle(hf_model("gpt2", 0, vocab_size=50, n_embd=16, n_head=2, n_layer=1, n_positions=32), tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "evil": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a weights-only PyTorch file.*system.*nothing in it was executed"):
        load_hf(tmp_path)
    assert not marker.exists()


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8, "n_embd": 4,
                                                      "n_layer": 1, "n_head": 1, "n_positions": 4}))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_hf(tmp_path)


def test_report_max_diff():
    print("\nlargest logit differences:", MAX_DIFF)
