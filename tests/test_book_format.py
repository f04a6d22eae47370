"""The tutorial's model.ckpt: files built from shared/formats/book-checkpoint.md load with the spec's logits."""
import math
import os
from collections import OrderedDict

import pytest
import torch

import tinyformer
from tinyformer import CheckpointError, load_checkpoint
from tinyformer.interop import convert, load_book

from .helpers import assert_close_scaled


def book_state(D, H, N, L, V, seed):
    """Random tensors with exactly the spec's names, shapes and order (section 2)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0, std=0.2):
        return mean + std * torch.randn(*shape, generator=g)

    hs = D // H
    sd = OrderedDict()
    sd["token_embedding_lookup_table.weight"] = rand(V, D, std=1.0)
    for b in range(N):
        p = f"transformer_blocks.{b}."
        for ln in ("ln1", "ln2"):
            sd[f"{p}{ln}.weight"], sd[f"{p}{ln}.bias"] = rand(D, mean=1.0), rand(D)
        for h in range(H):
            sd[f"{p}mha.heads.{h}.mask"] = torch.tril(torch.ones(L, L))
            for w in ("Wq", "Wk", "Wv"):
                sd[f"{p}mha.heads.{h}.{w}.weight"] = rand(hs, D, std=0.4)
        sd[f"{p}mha.projection_layer.weight"], sd[f"{p}mha.projection_layer.bias"] = rand(D, D), rand(D)
        sd[f"{p}ffn.ffn.0.weight"], sd[f"{p}ffn.ffn.0.bias"] = rand(4 * D, D), rand(4 * D)
        sd[f"{p}ffn.ffn.2.weight"], sd[f"{p}ffn.ffn.2.bias"] = rand(D, 4 * D), rand(D)
    sd[f"transformer_blocks.{N}.weight"], sd[f"transformer_blocks.{N}.bias"] = rand(D, mean=1.0), rand(D)
    sd["model_out_linear_layer.weight"], sd["model_out_linear_layer.bias"] = rand(V, D, std=0.5), rand(V)
    return sd


def write_book(path, D=16, H=4, N=2, L=24, V=50, seed=0, **changes):
    h_params = dict(d_model=D, batch_size=4, context_length=L, num_blocks=N, num_heads=H, dropout=0.1,
                    max_iters=500, learning_rate=1e-3, eval_interval=50, eval_iters=20,
                    device="cuda",  # the tutorial records where it trained; loading must ignore it
                    TORCH_SEED=1337, max_token_value=V)
    data = {"model_state_dict": book_state(D, H, N, L, V, seed), "h_params": h_params, **changes}
    torch.save(data, path)
    return data


def reference_forward(data, idx, scale_by="head_size"):
    """The spec's forward (section 3), written out with per-head loops, in float64 so that only our float32
    rounding shows in a comparison. scale_by="d_model" is a deliberate bug (the spec scales by the head size)."""
    sd, hp = {k: v.double() for k, v in data["model_state_dict"].items()}, data["h_params"]
    D, H, N, L = hp["d_model"], hp["num_heads"], hp["num_blocks"], hp["context_length"]
    hs, T = D // H, idx.shape[1]

    def linear(x, name, bias=True):
        return x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased variance
        return (x - mean) / torch.sqrt(var + 1e-5) * sd[name + ".weight"] + sd[name + ".bias"]

    pe = torch.zeros(L, D, dtype=torch.float64)
    for p in range(L):
        for i in range(D // 2):
            w = torch.exp(torch.tensor(2 * i * (-math.log(10000.0) / D), dtype=torch.float64))
            pe[p, 2 * i], pe[p, 2 * i + 1] = torch.sin(p * w), torch.cos(p * w)  # interleaved sin, cos
    x = sd["token_embedding_lookup_table.weight"][idx] + pe[:T]
    causal = torch.tril(torch.ones(T, T)) == 1
    for b in range(N):
        p = f"transformer_blocks.{b}."
        h = layer_norm(x, p + "ln1")
        outs = []
        for k in range(H):
            q, key, v = (linear(h, f"{p}mha.heads.{k}.{w}", bias=False) for w in ("Wq", "Wk", "Wv"))
            scores = (q @ key.transpose(-2, -1)) / math.sqrt(hs if scale_by == "head_size" else D)
            scores = scores.masked_fill(~causal, float("-inf"))
            outs.append(scores.softmax(-1) @ v)
        x = x + linear(torch.cat(outs, -1), p + "mha.projection_layer")
        h = layer_norm(x, p + "ln2")
        x = x + linear(torch.relu(linear(h, p + "ffn.ffn.0")), p + "ffn.ffn.2")
    return linear(layer_norm(x, f"transformer_blocks.{N}"), "model_out_linear_layer")


@pytest.mark.parametrize("shape", [dict(D=16, H=4, N=2, L=24, V=50), dict(D=30, H=5, N=3, L=17, V=97),
                                   dict(D=8, H=1, N=1, L=9, V=11)])
def test_logits_match_the_spec(tmp_path, shape):
    data = write_book(tmp_path / "model.ckpt", seed=shape["D"], **shape)
    model, tokenizer, config = load_book(tmp_path / "model.ckpt", "cpu")
    assert not model.training and config["format"] == "book" and tokenizer.spec == "cl100k_base"
    gen = torch.Generator().manual_seed(0)
    for T in (1, shape["L"] // 2, shape["L"]):
        idx = torch.randint(0, shape["V"], (2, T), generator=gen)
        with torch.no_grad():
            expected, got = reference_forward(data, idx), model(idx)
        assert expected.std() > 0.3  # non-trivial logits
        # float32 vs float64 drifts by < 1e-6 relative here (1 or 2 threads); the spec's own easy mistakes (scaling by d_model,
        # below) move logits by more than 1e-2 relative, three orders of magnitude above the tolerance
        assert_close_scaled(got.double(), expected, rel=2e-5)
        if T > 1 and shape["H"] > 1:
            wrong = reference_forward(data, idx, scale_by="d_model")
            assert (wrong - expected).abs().max() > 1e-2 * expected.abs().max()


def test_loads_through_tinyformer_load_and_ignores_masks(tmp_path):
    data = write_book(tmp_path / "a.ckpt")
    without_masks = {**data, "model_state_dict": {k: v for k, v in data["model_state_dict"].items()
                                                  if not k.endswith(".mask")}}
    torch.save(without_masks, tmp_path / "b.ckpt")
    idx = torch.randint(0, 50, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = tinyformer.load(tmp_path / "a.ckpt", device="cpu").model(idx)
        b = load_book(tmp_path / "b.ckpt")[0](idx)
    assert torch.equal(a, b)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    write_book(tmp_path / "model.ckpt", V=50)
    lm = tinyformer.load(tmp_path / "model.ckpt", device="cpu")
    hello = lm.tokenizer.encode("Hello")[0]  # a cl100k id far above 50
    with pytest.raises(ValueError, match=rf"token id {hello} \('Hello'\) is outside this model's vocabulary of 50"):
        lm.generate("Hello world", max_new_tokens=1)
    with pytest.raises(ValueError, match=r"token id 50 .* is outside this model.s vocabulary of 50"):
        lm.generate([[1, 2, 50]], max_new_tokens=1)
    assert len(lm.generate([[0, 49]], max_new_tokens=2, temperature=0)[0]) == 2  # in range: fine


def test_convert_to_native_checkpoint(tmp_path):
    write_book(tmp_path / "model.ckpt", seed=3)
    convert(tmp_path / "model.ckpt", tmp_path / "native")
    book_model = load_book(tmp_path / "model.ckpt")[0]
    native, tokenizer, config = load_checkpoint(tmp_path / "native")
    assert tokenizer.spec == "cl100k_base" and config["converted_from"] == str(tmp_path / "model.ckpt")
    idx = torch.randint(0, 50, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(native(idx), book_model(idx))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(optimizer_state_dict={}), "expected exactly the keys h_params and model_state_dict"),
    (lambda d: d["model_state_dict"].pop("transformer_blocks.1.mha.heads.2.Wk.weight"),
     r"missing weight transformer_blocks\.1\.mha\.heads\.2\.Wk\.weight"),
    (lambda d: d["model_state_dict"].update({"transformer_blocks.0.ffn.ffn.2.bias": torch.zeros(17)}),
     r"blocks\.0\.mlp\.down\.bias has shape \(17,\), the config needs \(16,\)"),
    (lambda d: d["model_state_dict"].update({"transformer_blocks.0.mha.heads.4.Wq.weight": torch.zeros(4, 16)}),
     r"unexpected weight\(s\) transformer_blocks\.0\.mha\.heads\.4\.Wq\.weight"),
    (lambda d: d["h_params"].pop("num_heads"), "h_params lacks num_heads"),
    (lambda d: d["h_params"].update(num_heads=3), "d_model 16 is not divisible by n_heads 3"),
])
def test_bad_files_are_refused(tmp_path, edit, message):
    data = write_book(tmp_path / "model.ckpt")
    edit(data)
    torch.save(data, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=message):
        load_book(tmp_path / "model.ckpt")


def test_code_in_the_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    data = write_book(tmp_path / "model.ckpt")
    data["h_params"]["device"] = Evil()
    torch.save(data, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="not a weights-only PyTorch file.*system.*nothing in it was executed"):
        tinyformer.load(tmp_path / "model.ckpt", device="cpu")
    assert not marker.exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_book(tmp_path / "notes.txt")
