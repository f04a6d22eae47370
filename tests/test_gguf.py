"""GGUF export: read back with gguf.GGUFReader (tensors, metadata, tokenizer); llama.cpp's greedy tokens when
llama-cpp-python is installed (a bench extra: skipped otherwise)."""
import math

import numpy as np
import pytest
import torch

from tinyformer import CheckpointError, save_checkpoint
from tinyformer.cli import main
from tinyformer.interop.gguf import export_gguf
from tinyformer.model import quant

from tinyformer import LanguageModel, get_tokenizer

from .helpers import SAMPLE_TEXT, char_lm, tiny_model

gguf = pytest.importorskip("gguf")


def read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return tensors, fields


def values(tensor) -> np.ndarray:
    shape = tuple(int(d) for d in tensor.shape[::-1])
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).copy()


def test_gpt2_style_f32_holds_our_weights_and_config(tmp_path):
    lm = char_lm("tiny", seed=3)
    assert export_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf") == []
    tensors, fields = read(tmp_path / "m.gguf")
    c, state = lm.model.config, lm.model.state_dict()
    assert fields["general.architecture"] == "gpt2" and fields["general.file_type"] == 0
    assert (fields["gpt2.block_count"], fields["gpt2.embedding_length"], fields["gpt2.attention.head_count"],
            fields["gpt2.context_length"], fields["gpt2.feed_forward_length"]) == \
        (c.n_layers, c.d_model, c.n_heads, c.context_length, c.ff_dim)
    assert len(tensors) == 4 + 12 * c.n_layers and "output.weight" not in tensors  # tied head: llama.cpp reuses
    np.testing.assert_array_equal(values(tensors["token_embd.weight"]), state["tok_emb.weight"].numpy())
    np.testing.assert_array_equal(values(tensors["position_embd.weight"]), state["pos_emb.weight"].numpy())
    qkv = values(tensors["blk.1.attn_qkv.weight"])  # [3D, D]: rows of q, then k, then v
    for j, name in enumerate("qkv"):
        np.testing.assert_array_equal(qkv[j * c.d_model:(j + 1) * c.d_model],
                                      state[f"blocks.1.attn.{name}_proj.weight"].numpy())
    np.testing.assert_array_equal(values(tensors["blk.0.ffn_down.weight"]), state["blocks.0.mlp.down.weight"].numpy())
    np.testing.assert_array_equal(values(tensors["blk.0.ffn_down.bias"]), state["blocks.0.mlp.down.bias"].numpy())


def rope_half(x, positions, theta=10000.0):
    """Our (and Hugging Face's) rotary: dimension i pairs with i + d/2."""
    d = x.shape[-1]
    freqs = positions[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([freqs.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def rope_adjacent(x, positions, theta=10000.0):
    """llama.cpp's 'normal' rotary: dimensions 2i and 2i+1 form a pair with frequency i."""
    d = x.shape[-1]
    freqs = positions[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * freqs.cos() - odd * freqs.sin()
    out[..., 1::2] = even * freqs.sin() + odd * freqs.cos()
    return out


def test_llama_style_q_k_rows_are_permuted_for_llama_cpps_rotary(tmp_path):
    """Attention scores q.k under llama.cpp's rotary with the written weights equal ours with our weights: the
    permutation is what makes the two rotary conventions agree (without it scores differ by O(1))."""
    model = tiny_model("llama-tiny", vocab_size=40, seed=2)
    c = model.config
    export_gguf(model, None, tmp_path / "m.gguf")
    tensors, fields = read(tmp_path / "m.gguf")
    assert fields["llama.attention.head_count_kv"] == c.kv_heads and fields["llama.rope.dimension_count"] == 8
    assert fields["tokenizer.ggml.model"] == "none"
    x = torch.randn(6, c.d_model, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(6).float()
    hd = c.hidden_head_dim
    ours_q = (x @ model.blocks[0].attn.q_proj.weight.detach().T).view(6, c.n_heads, hd)
    ours_k = (x @ model.blocks[0].attn.k_proj.weight.detach().T).view(6, c.kv_heads, hd)
    theirs_q = (x @ torch.from_numpy(values(tensors["blk.0.attn_q.weight"])).T).view(6, c.n_heads, hd)
    theirs_k = (x @ torch.from_numpy(values(tensors["blk.0.attn_k.weight"])).T).view(6, c.kv_heads, hd)
    group = c.n_heads // c.kv_heads
    for h in range(c.n_heads):
        ours = rope_half(ours_q[:, h], positions) @ rope_half(ours_k[:, h // group], positions).T
        theirs = rope_adjacent(theirs_q[:, h], positions) @ rope_adjacent(theirs_k[:, h // group], positions).T
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(values(tensors["blk.1.ffn_gate.weight"]),
                                  model.blocks[1].mlp.gate.weight.detach().numpy())
    assert "output.weight" in tensors  # untied head


@pytest.mark.parametrize("quantize, qtype, step", [("f16", "F16", 2 ** -11), ("q8_0", "Q8_0", 1 / 127)])
def test_quantized_matrices_are_within_half_a_step(tmp_path, quantize, qtype, step):
    lm = char_lm("tiny", seed=1)
    export_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf", quantize=quantize)
    tensors, fields = read(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == qtype
    assert tensors["blk.0.ffn_up.bias"].tensor_type.name == "F32" and tensors["output_norm.weight"].tensor_type.name == "F32"
    weight = lm.model.blocks[0].mlp.up.weight.detach().numpy()
    error = np.abs(values(tensors["blk.0.ffn_up.weight"]) - weight)
    # f16: half an ulp relative; q8_0: half a step of each 32-block's max/127, plus 127 steps x the float16
    # rounding of that step (2^-11): 0.5 + 0.062 steps
    bound = (np.abs(weight) * step if quantize == "f16" else
             np.repeat(np.abs(weight).reshape(weight.shape[0], -1, 32).max(-1), 32, -1) * step * 0.563)
    assert (error <= bound + 1e-8).all() and error.max() > 0


def test_char_tokenizer_is_byte_level_bpe_with_merges_for_multibyte_characters(tmp_path):
    lm = char_lm("tiny")
    export_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf")
    _, fields = read(tmp_path / "m.gguf")
    tokens, merges = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.merges"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(tokens) == lm.tokenizer.vocab_size
    assert tokens[lm.tokenizer.encode("a")[0]] == "a" and tokens[lm.tokenizer.encode(" ")[0]] == "Ġ"
    assert tokens[lm.tokenizer.encode("\n")[0]] == "Ċ"
    assert tokens[lm.tokenizer.encode("农")[0]] == "åĨľ" and "å Ĩ" in merges and "åĨ ľ" in merges  # e5 86 9c
    types = fields["tokenizer.ggml.token_type"]
    assert types[lm.tokenizer.bos_id] == gguf.TokenType.CONTROL and types[lm.tokenizer.encode("a")[0]] == 1
    assert fields["tokenizer.ggml.eos_token_id"] == lm.tokenizer.eos_id


def test_unsupported_models_and_options_are_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="positional 'sinusoidal' has no llama.cpp architecture"):
        export_gguf(tiny_model("book"), None, tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match=r"gpt2-style model needs .* this one has mlp='relu'"):
        export_gguf(tiny_model("tiny", mlp="relu"), None, tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="quantize 'q4_0' is not one of f32, f16, q8_0"):
        export_gguf(tiny_model("tiny"), None, tmp_path / "m.gguf", quantize="q4_0")
    with pytest.raises(quant.PrecisionError, match="GGUF export needs float weights"):
        export_gguf(quant.set_precision(tiny_model("tiny"), quantize="int8"), None, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export_gguf(tmp_path, capsys):
    lm = char_lm("llama-tiny")
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--quantize", "q8_0"]) == 0
    assert "GGUF, q8_0" in capsys.readouterr().out
    assert read(tmp_path / "m.gguf")[1]["general.file_type"] == 7
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--quantize", "q8_0"]) == 1
    assert "--quantize is for --format gguf" in capsys.readouterr().err


@pytest.mark.parametrize("kind, text", [("tiny", SAMPLE_TEXT), ("llama-tiny", SAMPLE_TEXT),
                                        ("tiny", "First Citizen:\nBefore we proceed, hear me speak.")])  # ASCII only
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, kind, text):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[bench]')")
    tokenizer = get_tokenizer("char", text)
    lm = LanguageModel(tiny_model(kind, tokenizer.vocab_size, seed=5, d_model=64, context_length=64), tokenizer)
    export_gguf(lm.model, lm.tokenizer, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    prompt = lm.tokenizer.encode("First Citizen:\nBefore we")
    assert llm.tokenize("First Citizen:\nBefore we".encode(), add_bos=False, special=False) == prompt
    ours = lm.generate([prompt], max_new_tokens=24, temperature=0, details=True)[0].token_ids
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours
