"""Precision as a load option: bfloat16 / float16 / int8 weights against float32, save/load round trips, errors."""
import copy
import json

import pytest
import torch

from tinyformer import CheckpointError, load, save_checkpoint
from tinyformer.cli import main
from tinyformer.model import kernels, quant
from tinyformer.model.layers import Linear

from .helpers import char_lm, tiny_model


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).float()


@pytest.mark.parametrize("kind", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype, quantize, tolerance", [
    # Measured on these models: bfloat16 0.5%, float16 0.07% (10-bit mantissa), int8 2.1% (7-bit activations per
    # call). A real bug (a transposed or unscaled weight, a lost bias) is off by ~100%.
    ("bfloat16", None, 0.012), ("float16", None, 0.002), (None, "int8", 0.04), ("bfloat16", "int8", 0.04)])
def test_precision_logits_close_to_float32(kind, dtype, quantize, tolerance):
    base = tiny_model(kind, vocab_size=96, seed=1, d_model=64)
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = logits(base, ids)
    model = quant.pack(quant.set_precision(copy.deepcopy(base), dtype, quantize))
    out = logits(model, ids)
    assert out.dtype == torch.float32 and relative_error(out, reference) < tolerance
    assert quant.precision(model) == {"dtype": dtype or "float32", "quantize": quantize}


def test_int8_weights_are_exact_up_to_half_a_step():
    weight = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    q, scale = quant.quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert torch.equal(q.abs().amax(1), torch.full((16,), 127, dtype=torch.int8))  # each row's max hits 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


def test_int8_layer_equals_its_dequantized_float_layer():
    """Without fbgemm (autograd on) the int8 layer is weight-only: exactly a float layer holding q * scale.
    The fbgemm kernel adds only activation rounding (7 bits per call): ~1%, where a layout bug is ~100%."""
    torch.manual_seed(0)
    layer = Linear(48, 20)
    x = torch.randn(5, 48)
    quantized = copy.deepcopy(layer)
    quantized.quantize_int8()
    dequantized = torch.nn.functional.linear(x, quantized.weight.float() * quantized.weight_scale[:, None], layer.bias)
    torch.testing.assert_close(quantized(x).detach(), dequantized, rtol=1e-5, atol=1e-5)
    quantized.pack()
    with torch.inference_mode():
        assert isinstance(quantized._kernel, quant.Int8Kernel)
        assert relative_error(quantized(x), dequantized) < 0.02
        assert relative_error(quantized(x[:1]), dequantized[:1]) < 0.02


def test_tied_head_gets_its_own_int8_copy_and_embedding_stays_float():
    model = quant.set_precision(tiny_model("tiny", vocab_size=50), quantize="int8")
    assert model.tok_emb.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.int8
    assert model.lm_head.weight_scale.dtype == torch.float32
    # casting afterwards keeps the scales in float32 (16-bit scales would shift whole rows)
    quant.set_precision(model, dtype="bfloat16")
    assert model.lm_head.weight_scale.dtype == torch.float32 and model.tok_emb.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", None), (None, "int8"), ("bfloat16", "int8")])
def test_saved_precision_loads_back_exactly(tmp_path, dtype, quantize):
    lm = char_lm("llama-tiny")
    save_checkpoint(tmp_path / "float", lm.model, lm.tokenizer)
    first = load(tmp_path / "float", device="cpu", dtype=dtype, quantize=quantize)
    save_checkpoint(tmp_path / "saved", first.model, first.tokenizer)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["precision"] == {"dtype": dtype or "float32", "quantize": quantize}
    again = load(tmp_path / "saved", device="cpu")  # no options: the file's precision
    state, state_again = first.model.state_dict(), again.model.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) and state[k].dtype == state_again[k].dtype for k in state)
    ids = torch.randint(0, lm.tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(first.model, ids), logits(again.model, ids))
    assert first.generate("First", max_new_tokens=12, temperature=0) == \
        again.generate("First", max_new_tokens=12, temperature=0)


def test_hf_gpt2_directory_loads_quantized_close_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2,
                                                              n_head=4)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 80, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(ids).logits
    for dtype, quantize, tolerance in (("bfloat16", None, 0.012), (None, "int8", 0.04)):
        lm = load(tmp_path / "hf", device="cpu", dtype=dtype, quantize=quantize)
        assert relative_error(logits(lm.model, ids), reference) < tolerance


def test_book_checkpoint_loads_as_bfloat16(tmp_path):
    from .test_book_format import write_book

    path = tmp_path / "model.ckpt"
    write_book(path)
    reference = load(path, device="cpu")
    cast = load(path, device="cpu", dtype="bfloat16")
    ids = torch.randint(0, reference.model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert relative_error(logits(cast.model, ids), logits(reference.model, ids)) < 0.012


def test_bad_precisions_are_one_clear_line(tmp_path, capsys):
    lm = char_lm()
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer)
    with pytest.raises(quant.PrecisionError, match=r"dtype 'int4' is not one of float32, bfloat16, float16"):
        load(tmp_path / "ckpt", device="cpu", dtype="int4")
    with pytest.raises(quant.PrecisionError, match=r"quantize 'int4' is not one of int8"):
        load(tmp_path / "ckpt", device="cpu", quantize="int4")
    quantized = load(tmp_path / "ckpt", device="cpu", quantize="int8")
    from tinyformer.interop.hf import export_hf

    with pytest.raises(quant.PrecisionError, match="Hugging Face export needs float weights"):
        export_hf(quantized.model, quantized.tokenizer, tmp_path / "hf")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["precision"] = {"dtype": "float8", "quantize": None}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json is invalid: dtype 'float8'"):
        load(tmp_path / "ckpt", device="cpu")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(tmp_path / "ckpt"), "--prompt", "a", "--quantize", "int4"])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err


def test_cli_inspect_reports_weight_bytes_and_convert_quantizes_once(tmp_path, capsys):
    lm = char_lm("tiny")
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer)
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "int8"), "--quantize", "int8"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "int8"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    c = lm.model.config
    matrices = c.n_layers * (4 * c.d_model * c.d_model + 2 * c.d_model * c.ff_dim)
    scales = c.n_layers * (4 * c.d_model + c.ff_dim + c.d_model) + c.vocab_size
    floats = lm.model.num_parameters() - matrices  # embeddings, norms, biases (the head is tied: counted once)
    # int8 matrices + an int8 head of its own + float32 scales, embeddings, norms, biases
    assert data["weight_bytes"] == matrices + c.vocab_size * c.d_model + 4 * (scales + floats)
    assert data["precision"] == {"dtype": "float32", "quantize": "int8"}
    kv = data["kv_cache"]
    assert kv["bytes"] == 2 * c.n_layers * c.d_model * kv["length"] * kv["batch"] * 2  # bfloat16 keys and values
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"]["bytes"] == 2 * kv["bytes"]  # float32
    assert main(["inspect", str(tmp_path / "ckpt"), "--dtype", "bfloat16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kv_cache"]["bytes"] == kv["bytes"]
    # on the CPU: 16-bit matrices and embeddings (token + position), float32 norms and biases
    stored16 = matrices + (c.vocab_size + c.context_length) * c.d_model
    assert data["weight_bytes"] == 2 * stored16 + 4 * (lm.model.num_parameters() - stored16)
    assert data["precision"] == {"dtype": "bfloat16", "quantize": None}
    assert main(["eval", str(tmp_path / "int8"), "--data", str(tmp_path / "int8" / "config.json"), "--json"]) == 0


@pytest.mark.parametrize("dtype, quantize", [(None, None), ("bfloat16", None), (None, "int8")])
def test_fused_qkv_is_bit_identical_to_separate_projections(dtype, quantize):
    """Packing runs q, k and v as one product; every output column is the same dot product, so logits must be
    exactly equal (float32 at one row and several), and an in-place weight change must not be missed."""
    fused = quant.set_precision(tiny_model("tiny", vocab_size=64, d_model=64), dtype, quantize)
    separate = copy.deepcopy(fused)
    quant.pack(fused)
    for layer in quant.linears(separate):
        layer.pack()
    assert fused.blocks[0].attn._qkv.kernel is not None and separate.blocks[0].attn._qkv is None
    for ids in (torch.tensor([[5]]), torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))):
        assert torch.equal(logits(fused, ids), logits(separate, ids))
    if quantize is None:
        with torch.no_grad():
            for model in (fused, separate):
                model.blocks[1].attn.k_proj.weight.mul_(3)  # what a training step or load_state_dict does
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        if dtype is None:
            assert torch.equal(logits(fused, ids), logits(separate, ids))
        else:  # stale, the fused q/k/v run unpacked where separate's q and v keep fbgemm: ~1e-6 apart; a missed
            # change (k x 3) moves logits by ~0.1
            torch.testing.assert_close(logits(fused, ids), logits(separate, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, quantize", [("bfloat16", None), (None, "int8")])
def test_seq2seq_gets_precision_for_free_and_saves_it(tmp_path, dtype, quantize):
    from .helpers import seq2seq_lm

    lm = seq2seq_lm()
    save_checkpoint(tmp_path / "float", lm.model, lm.tokenizer)
    reference = load(tmp_path / "float", device="cpu")
    cast = load(tmp_path / "float", device="cpu", dtype=dtype, quantize=quantize)
    assert quant.precision(cast.model) == {"dtype": dtype or "float32", "quantize": quantize}
    assert all(m.weight_scale is not None for m in quant.linears(cast.model)) == (quantize == "int8")
    # encoder + decoder + cross-attention: the same kind of error as a GPT (see the tolerances above)
    greedy = dict(max_new_tokens=12, temperature=0, details=True)
    ours = cast.generate(["je suis content ."], **greedy)[0].token_ids
    assert len(ours) > 0
    save_checkpoint(tmp_path / "saved", cast.model, cast.tokenizer)
    again = load(tmp_path / "saved", device="cpu")
    assert again.generate(["je suis content ."], **greedy)[0].token_ids == ours
    state, state_again = cast.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    reference_tokens = reference.generate(["je suis content ."], **greedy)[0].token_ids
    assert ours[:3] == reference_tokens[:3]  # the wide random init makes the first choices sharp


@pytest.mark.parametrize("kind", ["tiny", "llama-tiny"])
def test_16_bit_weights_keep_float32_arithmetic_and_16_bit_keys_and_values_on_the_cpu(kind):
    from tinyformer.generation.decode import prefill

    reference = tiny_model(kind, vocab_size=64, d_model=64)
    model = quant.set_precision(copy.deepcopy(reference), "bfloat16")
    block = model.blocks[0]
    assert block.attn.q_proj.weight.dtype == model.tok_emb.weight.dtype == torch.bfloat16
    assert block.norm1.weight.dtype == torch.float32 and model.compute_dtype == torch.float32
    assert quant.precision(model) == {"dtype": "bfloat16", "quantize": None}
    with torch.no_grad():  # the reference: float32 arithmetic on the same bfloat16-rounded weights
        for m in reference.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.copy_(m.weight.bfloat16().float())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want = logits(reference, ids)
    # bfloat16 activations would be ~1e-2 off (8-bit mantissa); float32 ones differ only in summation order
    torch.testing.assert_close(logits(quant.pack(model), ids), want, rtol=0, atol=1e-4 * want.abs().max().item())
    with torch.inference_mode():
        last, cache = prefill(model, ids.tolist(), 0, room=4)
        model.cache_dtype = None  # a float32 cache, for the reference
        last32, cache32 = prefill(model, ids.tolist(), 0, room=4)
    # the cache holds the keys and values of the float32 arithmetic rounded to 16 bits (exactly in the first layer;
    # the next ones read attention over rounded keys)
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16 and cache32.k.dtype == torch.float32
    assert torch.equal(cache.k[0, :, :, :12], cache32.k[0, :, :, :12].bfloat16())
    assert torch.equal(cache.v[0, :, :, :12], cache32.v[0, :, :, :12].bfloat16())
    torch.testing.assert_close(last32, want[:, -1], rtol=0, atol=1e-4 * want.abs().max().item())
    # attention over 16-bit keys: ~1e-3 of the magnitude here; a gross misread of the cache (a layer's values lost,
    # rows swapped) moves these small models' logits by ~6-10% (measured on the int8 test's model)
    torch.testing.assert_close(last, want[:, -1], rtol=0, atol=1e-2 * want.abs().max().item())


def test_int8_weights_keep_keys_and_values_in_bfloat16():
    from tinyformer.generation.decode import prefill

    model = quant.pack(quant.set_precision(tiny_model("tiny", vocab_size=64, d_model=64), quantize="int8"))
    assert quant.cache_dtype(model) == torch.bfloat16 and quant.activation_dtype(model) == torch.float32
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        last, cache = prefill(model, ids.tolist(), 0, room=4)
        model.cache_dtype = None
        last32, cache32 = prefill(model, ids.tolist(), 0, room=4)
    assert cache.k.dtype == torch.bfloat16 and cache32.k.dtype == torch.float32
    assert torch.equal(cache.k[0, :, :, :12], cache32.k[0, :, :, :12].bfloat16())
    # rounded keys and values: up to ~1e-2 of the magnitude here (the AVX2 path, fbgemm's 7-bit activations at
    # several rows). This small random model hardly attends: a layer's values zeroed, or every row's cache read
    # from another row, moves its logits by only 6-10%, so this guards against gross misreads; the rounding itself
    # is checked exactly above and in test_kernels
    torch.testing.assert_close(last, last32, rtol=0, atol=3e-2 * last32.abs().max().item())


def _mapping_flags(address: int) -> dict:
    """/proc/self/smaps' fields for the mapping that holds `address`."""
    fields, inside = {}, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside:
            fields[head.rstrip(":")] = line.split()[1]
    return fields


def test_packed_weights_are_unchanged_and_asked_to_live_in_huge_pages(monkeypatch):
    def packed_panels(model):  # what the kernels stream: each Linear's or fused product's float weight in panels
        owners = [m._kernel for m in quant.linears(model)] + [a._qkv.kernel for a in model.modules() if hasattr(a, "_qkv")]
        return [k._panels() for k in owners if k is not None]

    model = tiny_model("tiny", vocab_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quant.pack(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], before[k]) for k in before)
    if kernels.library() is None:
        pytest.skip("no kernels.cpp here: torch's kernels pack their own copies")
    panels = packed_panels(model)
    assert len(panels) == 2 * 4 + 1  # per block: fused q/k/v, output, up, down; the head
    if not quant.HUGE_PAGES.enabled:
        pytest.skip("no transparent huge pages here (MADV_HUGEPAGE)")
    # side by side in chunks (the current one may fill up on the way), which asked the kernel for huge pages
    assert len({p.untyped_storage().data_ptr() for p in panels}) <= 2
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in thp and "THPeligible" in _mapping_flags(panels[0].data_ptr()):
        assert _mapping_flags(panels[0].data_ptr())["THPeligible"] == "1"
    # without them: ordinary tensors, one storage each
    monkeypatch.setattr(quant.HUGE_PAGES, "enabled", False)
    plain = packed_panels(quant.pack(tiny_model("tiny", vocab_size=64)))
    assert len({p.untyped_storage().data_ptr() for p in plain}) == len(plain)
