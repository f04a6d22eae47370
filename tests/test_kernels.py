"""kernels.cpp's int8 product against an exact float64 reference of its own arithmetic, its float32 and 16-bit
products and its decode-step attention against float64, batch invariance, the Int8Kernel's and FloatKernel's
choices between them and torch's kernels, decoding through them against SDPA, and bad input."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from tinyformer.model import kernels, quant

from .helpers import tiny_model

buildable = kernels.supported() and (shutil.which("c++") or shutil.which("g++"))
needs_kernels = pytest.mark.skipif(not buildable, reason="needs an x86-64 CPU with AVX2 and a C++ compiler")


@pytest.fixture(scope="module")
def library():
    return kernels.library()


def int8_weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g)
    return quant.quantize_int8(weight)


def reference(x, q, scale, bias):
    """What the kernel computes, in float64: activations quantized per block of 32 (round half to even, the
    last block zero-padded), exact products, the weight's row scale, the bias."""
    k = x.shape[1]
    padded = F.pad(x.double(), (0, -k % 32)).view(x.shape[0], -1, 32)
    step = padded.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(padded / torch.where(step > 0, step, torch.ones_like(step))) * step
    y = xq.view(x.shape[0], -1)[:, :k] @ q.double().t() * scale.double()
    return y if bias is None else y + bias.double()


@needs_kernels
def test_kernels_build_where_a_compiler_and_avx2_exist(library):
    assert library is not None and hasattr(library, "int8_linear") and hasattr(library, "panel_linear")


@pytest.fixture(params=[False, True], ids=["avx2", "vnni"])
def vnni(request, library):
    """Each int8 kernel kernels.cpp has: AVX2 on every x86-64 CPU it builds on, AVX-512 VNNI where the CPU has it."""
    if request.param and not library.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    return request.param


@needs_kernels
@pytest.mark.parametrize("m, n, k, with_bias", [(1, 40, 64, True), (1, 768, 768, False), (3, 33, 70, True),
                                                (5, 17, 33, False), (70, 24, 96, True), (2, 31, 64, True),
                                                (1, 30, 48, False), (1, 3, 40, True), (8, 45, 100, True)])
def test_int8_product_equals_its_exact_arithmetic(library, vnni, m, n, k, with_bias):
    q, scale = int8_weight(n, k, seed=m + n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g) * 3
    x[0, : min(k, 32)] = 0  # a block of zeros has scale 0
    bias = torch.randn(n, generator=g) if with_bias else None
    y = library.int8_linear(x, quant.int8_groups(q), scale, bias, None, vnni)
    expected = reference(x, q, scale, bias)
    # float32 block sums and accumulation: ~1e-7 of the magnitude; a wrong block, sign or scale is >= 1e-2
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    float_product = x @ (q.float() * scale[:, None]).t() + (0 if bias is None else bias)
    assert ((y - float_product).norm() / float_product.norm()) < 0.01  # 8-bit activations per block


@needs_kernels
def test_each_row_equals_its_result_alone(library, vnni):
    q, scale = int8_weight(51, 96, seed=1)  # 12 groups of 4 rows and 3 more
    x = torch.randn(11, 96, generator=torch.Generator().manual_seed(2))
    groups = quant.int8_groups(q)
    together = library.int8_linear(x, groups, scale, None, None, vnni)
    alone = torch.cat([library.int8_linear(x[i:i + 1].contiguous(), groups, scale, None, None, vnni)
                       for i in range(11)])
    assert torch.equal(together, alone)


@needs_kernels
@pytest.mark.parametrize("m, n, k", [(1, 40, 64), (1, 50, 3072), (3, 33, 70), (4, 7, 96), (8, 768, 768),
                                     (13, 2304, 96), (16, 100, 200)])
def test_the_vnni_kernel_stores_the_avx2_kernels_bits(library, m, n, k):
    # the same int32 in each lane (vpdpbusd's 4 products = maddubs + madd's), the same float steps after it: a
    # slip in the +128 correction, a lane or a weight row would change values by >= 1e-3 of their magnitude
    if not library.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    q, scale = int8_weight(n, k, seed=m * n + k)
    g = torch.Generator().manual_seed(m + k)
    x, bias, residual = torch.randn(m, k, generator=g), torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    x[-1, -min(k, 40):] = 0
    groups = quant.int8_groups(q)
    for b, r in [(bias, residual), (None, None), (bias, None)]:
        avx2 = library.int8_linear(x, groups, scale, b, r, False)
        assert torch.equal(library.int8_linear(x, groups, scale, b, r, True), avx2)


@needs_kernels
def test_the_vnni_kernel_is_refused_where_the_cpu_has_none(library, monkeypatch):
    if library.has_vnni():
        pytest.skip("this CPU has AVX-512 VNNI")
    q, scale = int8_weight(8, 64, seed=0)
    with pytest.raises(RuntimeError, match="vnni: this CPU has no AVX-512 VNNI"):
        library.int8_linear(torch.randn(1, 64), quant.int8_groups(q), scale, None, None, True)


@needs_kernels
def test_bad_input_is_refused_with_the_shape_it_needs(library):
    q, scale = int8_weight(8, 64, seed=0)
    with pytest.raises(RuntimeError, match="x has 96 features, w 64"):
        library.int8_linear(torch.randn(1, 96), quant.int8_groups(q), scale, None)
    with pytest.raises(RuntimeError, match=r"w: contiguous int8 \[N, K padded to a multiple of 32\]"):
        library.int8_linear(torch.randn(1, 48), q[:, :48].contiguous(), scale, None)


@needs_kernels
@pytest.mark.skipif(not quant._FBGEMM, reason="needs fbgemm")
def test_int8_kernel_uses_ours_for_one_row_and_fbgemm_for_many(library):
    q, scale = int8_weight(64, 96, seed=3)
    bias = torch.randn(64)
    kernel = quant.Int8Kernel(q, scale, bias)
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(4))  # 18 rows: more than ours take
    one = kernel(x[:1, :1])
    alone = library.int8_linear(x[0, :1].contiguous(), quant.int8_groups(q), scale, bias)
    assert torch.equal(one.view(1, 64), alone)
    several = kernel(x)
    assert several.shape == (2, 9, 64)
    fbgemm = torch.ops.quantized.linear_dynamic(x.view(18, 96), kernel.packed, True)
    assert torch.allclose(several, fbgemm.view(2, 9, 64))
    float_product = x @ (q.float() * scale[:, None]).t() + bias
    ours_error = ((one - float_product[:1, :1]).norm() / float_product[:1, :1].norm()).item()
    fbgemm_error = ((several - float_product).norm() / float_product.norm()).item()
    assert ours_error < 0.01 and fbgemm_error < 0.05


@needs_kernels
@pytest.mark.skipif(not quant._FBGEMM, reason="needs fbgemm")
def test_with_vnni_the_int8_kernel_takes_up_to_16_rows(library, monkeypatch):
    if not kernels.int8_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    q, scale = int8_weight(64, 96, seed=3)
    kernel = quant.Int8Kernel(q, scale, None)
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(4))
    ours = library.int8_linear(x, quant.int8_groups(q), scale, None, None, True)
    assert torch.equal(kernel(x[:16]), ours[:16]) and torch.equal(kernel(x[:1]), ours[:1])
    assert torch.allclose(kernel(x), torch.ops.quantized.linear_dynamic(x, kernel.packed, True))  # 17+ rows: fbgemm
    assert not torch.equal(kernel(x)[:16], ours[:16])
    monkeypatch.setenv("TINYFORMER_KERNELS", "avx2")  # the AVX2 kernel: one row only
    assert quant.Int8Kernel(q, scale, None).own_matrix()[1] == 1


def panel_product(library, x, w, bias=None, *residual, width=8):
    packed = quant.amx_panels(w) if width == kernels.AMX_LAYOUT else quant.panels(w, width)
    return library.panel_linear(x, packed, width, bias, *residual)


@pytest.fixture(params=[8, 16, kernels.AMX_LAYOUT], ids=["avx2", "avx512", "amx"])
def width(request, library):
    """Each panel layout kernels.cpp has: 8 on every x86-64 CPU with AVX2, 16 where AVX-512 runs, 32 (bfloat16
    weights only) where AMX runs."""
    if request.param == kernels.AMX_LAYOUT and not library.has_amx():
        pytest.skip("this CPU has no AMX")
    if request.param not in library.panel_widths() + [kernels.AMX_LAYOUT]:
        pytest.skip("this CPU has no AVX-512")
    return request.param


def only_bfloat16_on_amx(width, dtype):
    if width == kernels.AMX_LAYOUT and dtype != torch.bfloat16:
        pytest.skip("AMX panels hold bfloat16 weights")


def test_int8_groups_hold_4_rows_side_by_side_block_by_block():
    q = torch.arange(7 * 64).view(7, 64).to(torch.int8)  # q[n, k] = 64n + k (mod 256)
    groups = quant.int8_groups(q[:, :40])  # padded to 64 columns with zeros
    padded = F.pad(q[:, :40], (0, 24))
    expected = [padded[n, 32 * b + i] for b in range(2) for n in range(4) for i in range(32)]  # rows 0-3
    expected += [padded[n, 32 * b + i] for b in range(2) for n in range(4, 7) for i in range(32)]  # the last 3
    assert groups.shape == (7, 64) and groups.flatten().tolist() == torch.stack(expected).tolist()


def test_panels_hold_each_output_feature_k_major_in_groups_of_8():
    w = torch.arange(11 * 3).view(11, 3)  # w[n, k] = 3n + k
    expected = [3 * n + k for group in range(1) for k in range(3) for n in range(8)]  # panel 0: features 0-7
    expected += [3 * n + k for k in range(3) for n in range(8, 11)]  # the last 3 features, k-major
    assert quant.panels(w).tolist() == expected
    wide = [3 * n + k for k in range(3) for n in range(11)]  # no whole panel of 16: all 11 features k-major
    assert quant.panels(w, 16).tolist() == wide
    w = torch.arange(17 * 2).view(17, 2)
    assert quant.panels(w, 16).tolist() == [2 * n + k for k in range(2) for n in range(16)] + [32, 33]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k, with_bias", [(1, 40, 64, True), (1, 300, 768, False), (3, 33, 70, True),
                                                (4, 17, 15, False), (6, 5, 9, True), (70, 24, 96, True),
                                                (130, 27, 32, False), (2, 179, 64, True), (4, 160, 32, False),
                                                (5, 83, 40, True)])
def test_float_product_equals_float64(library, width, dtype, m, n, k, with_bias):
    only_bfloat16_on_amx(width, dtype)
    g = torch.Generator().manual_seed(m + n + k)
    x, w = torch.randn(m, k, generator=g) * 3, torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if with_bias else None
    y = panel_product(library, x, w, bias, width=width)
    # 16-bit weights widen exactly, so only float32 rounding remains: ~1e-6 of the magnitude over k <= 768 terms
    # (AMX: ~3e-6, the activations carried in 16 bits); a misplaced weight, a lost tail feature (n % 8) or bias is
    # >= 1e-2
    expected = x.double() @ w.double().t() + (0 if bias is None else bias.double())
    assert y.shape == (m, n) and (y.double() - expected).abs().max() <= 2e-5 * expected.abs().max()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_rows_equal_their_results_alone_at_any_batch_and_thread_count(library, width, dtype):
    only_bfloat16_on_amx(width, dtype)
    g = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(137, 80, generator=g), torch.randn(51, 80, generator=g).to(dtype), torch.randn(51, generator=g)
    together = panel_product(library, x, w, bias, width=width)
    alone = torch.cat([panel_product(library, x[i:i + 1].contiguous(), w, bias, width=width) for i in range(137)])
    assert torch.equal(together, alone)
    for rows in (2, 5, 9, 64, 65):
        assert torch.equal(panel_product(library, x[:rows].contiguous(), w, bias, width=width), together[:rows])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(panel_product(library, x, w, bias, width=width), together)
    finally:
        torch.set_num_threads(threads)
    # each output is the same FMA chain over k whatever the width, so AVX2 and AVX-512 give the same bits; AMX
    # sums bfloat16 products in its own order
    avx2 = panel_product(library, x, w, bias, width=8)
    if width == kernels.AMX_LAYOUT:
        torch.testing.assert_close(together, avx2, rtol=0, atol=2e-5 * avx2.abs().max().item())
    else:
        assert torch.equal(avx2, together)


def test_amx_panels_hold_k_pairs_of_16_features_side_by_side():
    w = torch.arange(17 * 34, dtype=torch.float32).view(17, 34) % 251  # exact in bfloat16 (< 256)
    packed = quant.amx_panels(w)
    kp = 64  # 34 padded to a multiple of 32
    assert packed.dtype == torch.bfloat16 and packed.numel() == 17 * kp
    panel = packed[:16 * kp].view(kp // 2, 16, 2)  # [k pair][feature][k % 2]
    assert panel[0, 0].tolist() == [0, 1] and panel[0, 1].tolist() == [34, 35] and panel[1, 0].tolist() == [2, 3]
    assert panel[16, 15].tolist() == [(15 * 34 + 32) % 251, (15 * 34 + 33) % 251] and panel[17:].abs().sum() == 0
    tail = packed[16 * kp:].view(kp // 2, 1, 2)  # feature 16 alone
    assert tail[:17, 0].flatten().tolist() == [(16 * 34 + k) % 251 for k in range(34)] and tail[17:].abs().sum() == 0


@needs_kernels
def test_amx_keeps_the_activations_float32_precision_where_bfloat16_rows_would_not(library):
    if not library.has_amx():
        pytest.skip("this CPU has no AMX")
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(8, 768, generator=g), torch.randn(96, 768, generator=g).bfloat16()
    expected = x.double() @ w.double().t()
    error = (panel_product(library, x, w, width=kernels.AMX_LAYOUT).double() - expected).abs().max()
    rounded = (x.bfloat16().double() @ w.double().t() - expected).abs().max()  # hi alone, lo dropped
    assert error < rounded / 100


@needs_kernels
def test_amx_is_refused_for_other_weights_and_where_the_cpu_has_none(library):
    x, w = torch.randn(2, 64), torch.randn(16, 64)
    if not library.has_amx():
        with pytest.raises(RuntimeError, match="width: 32 is not 8"):
            library.panel_linear(x, quant.amx_panels(w), 32, None)
        return
    with pytest.raises(RuntimeError, match="w: AMX panels \\(width 32\\) are bfloat16, not Float"):
        library.panel_linear(x, quant.panels(w, 16), 32, None)
    with pytest.raises(RuntimeError, match=r"w: panels of 96-feature rows \(K padded to 32\), but its 1024 values"):
        library.panel_linear(torch.randn(2, 70), quant.amx_panels(w), 32, None)


@needs_kernels
def test_panel_product_refuses_bad_input(library):
    x, w = torch.randn(2, 96), torch.randn(48, 81)
    with pytest.raises(RuntimeError, match="w: panels of 96-feature rows, but its 3888 values are not a multiple"):
        library.panel_linear(x, quant.panels(w), 8, None)
    with pytest.raises(RuntimeError, match=r"w: float32, bfloat16 or float16 panels \(quant.panels\), a contiguous 1-D"):
        library.panel_linear(x, w, 8, None)
    with pytest.raises(RuntimeError, match=r"x: contiguous float32 \[M, K\], K > 0"):
        library.panel_linear(x.double(), quant.panels(w), 8, None)
    with pytest.raises(RuntimeError, match=r"bias: float32 \[N\]"):
        library.panel_linear(x[:, :81].contiguous(), quant.panels(w), 8, torch.randn(47))
    with pytest.raises(RuntimeError, match="width: 12 is not 8"):
        library.panel_linear(x[:, :81].contiguous(), quant.panels(w), 12, None)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float_kernel_runs_the_panels_at_any_number_of_rows(library, dtype):
    g = torch.Generator().manual_seed(8)
    weight, bias = torch.randn(64, 96, generator=g).to(dtype), torch.randn(64, generator=g)
    kernel = quant.make_kernel(weight, bias, None)
    assert isinstance(kernel, quant.FloatKernel) and kernel.panels is None  # made at the first product
    amx = dtype == torch.bfloat16 and kernels.amx_bfloat16()
    assert kernel.width == (kernels.AMX_LAYOUT if amx else kernels.panel_width())
    for shape in [(1, 1, 96), (2, 3, 96), (4, 40, 96)]:
        x = torch.randn(*shape, generator=g)
        y = kernel(x)
        assert torch.equal(y.reshape(-1, 64), panel_product(library, x.reshape(-1, 96), weight, bias,
                                                            width=kernel.width))
        assert torch.allclose(y, F.linear(x, weight.float(), bias), atol=1e-4, rtol=1e-5)
    assert kernel.weight is None and kernel.panels.dtype == dtype  # the weight is dropped once packed


@needs_kernels
@pytest.mark.parametrize("weight", ["float32", "bfloat16", "int8"])
def test_the_residual_is_added_as_the_output_is_stored(library, weight):
    g = torch.Generator().manual_seed(6)
    x, bias, residual = torch.randn(3, 64, generator=g), torch.randn(40, generator=g), torch.randn(3, 40, generator=g)
    if weight == "int8":
        q, scale = int8_weight(40, 64, 6)
        product = lambda *r: library.int8_linear(x, quant.int8_groups(q), scale, bias, *r)  # noqa: E731
    else:
        w = torch.randn(40, 64, generator=g).to(getattr(torch, weight))
        product = lambda *r: panel_product(library, x, w, bias, *r, width=kernels.panel_width())  # noqa: E731
    assert torch.equal(product(residual), residual + product())  # one rounding, as adding it afterwards
    assert torch.equal(product(None), product())
    with pytest.raises(RuntimeError, match=r"residual: contiguous float32 of 3 x 40 values, got \[3, 41\]"):
        product(torch.randn(3, 41))


@needs_kernels
def test_a_decode_step_adds_the_residual_inside_the_kernels_with_the_same_tokens(library):
    from tinyformer.generation import TokenStream
    from tinyformer.model.layers import Block

    model = tiny_model("llama-tiny", vocab_size=64).pack_for_inference()
    prompts = [[5, 9, 2, 40, 7], [3, 8]]

    def decode():
        steps = list(TokenStream(model, prompts, max_new_tokens=10, top_n=3))
        return [s.tokens for s in steps], [lp for s in steps for row in s.top for _, lp in row]

    calls = []
    own = library.panel_linear.default
    python_steps(model)  # the Python layers' residual handling (the one-call block step has it in C++)
    with pytest.MonkeyPatch.context() as patch:
        for kernel in {m._kernel for m in quant.linears(model) if m._kernel is not None}:
            patch.setattr(kernel, "own", lambda x, w, n, b, r=None: calls.append(r is not None) or own(x, w, n, b, r))
        fused = decode()

    def unfused(self, x, norm, f, *args):  # the residual added by its own op after each sublayer
        return x + f(norm(x), *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Block, "_sublayer", unfused)
        separate = decode()
    assert calls.count(True) == 10 * 2 * 2  # both layers' output projections, the prompt and every cached step
    assert fused == separate


@needs_kernels
@pytest.mark.parametrize("b, heads, kv_heads, t, s, d, masked", [(1, 12, 12, 1, 100, 64, False),
                                                                 (3, 8, 2, 1, 37, 64, True),
                                                                 (2, 4, 4, 4, 13, 72, True),
                                                                 (2, 2, 1, 1, 301, 20, True),
                                                                 (1, 3, 3, 1, 1, 64, False)])
def test_decode_attention_equals_float64_attention(library, b, heads, kv_heads, t, s, d, masked):
    g = torch.Generator().manual_seed(b + heads + s + d)
    # q as the fused q/k/v product's columns and k, v as a KV cache's first s slots: strided views, read in place
    q = torch.randn(b, t, 3, heads, d, generator=g)[:, :, 0].transpose(1, 2) * 2
    k = torch.randn(b, kv_heads, s + 7, d, generator=g)[:, :, :s] * 2
    v = torch.randn(b, kv_heads, s + 7, d, generator=g)[:, :, :s]
    mask = None
    if masked:
        mask = torch.rand(b, 1, 1, s, generator=g) > 0.4
        mask[..., -1] = True
    out = library.decode_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                              enable_gqa=heads != kv_heads).transpose(1, 2)
    # outputs are averages of values ~N(0, 1); float32 rounding gives ~1e-6, a wrong scale, mask or head >= 1e-2
    assert out.shape == (b, t, heads, d) and out.is_contiguous()
    assert (out.double() - expected).abs().max() < 2e-5


@needs_kernels
def test_decode_attention_ignores_masked_keys_bit_for_bit(library):
    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 4, 1, 64, generator=g), torch.randn(1, 4, 9, 64, generator=g), torch.randn(1, 4, 9, 64,
                                                                                                         generator=g)
    alone = library.decode_attention(q, k, v, None)
    # the same row left-padded by 6 slots of garbage (a row of a padded batch): exactly the same result
    pad = torch.randn(1, 4, 6, 64, generator=g) * 100
    mask = torch.arange(15).view(1, 1, 1, 15) >= 6
    padded = library.decode_attention(q, torch.cat((pad, k), 2), torch.cat((pad, v), 2), mask)
    assert torch.equal(padded, alone)
    with pytest.raises(RuntimeError, match=r"k and v \[1, a divisor of 4, S, 64\]"):
        library.decode_attention(q, k[:, :3], v[:, :3], None)
    with pytest.raises(RuntimeError, match=r"mask: bool \[batch, 1, length or 1, keys\]"):
        library.decode_attention(q, k, v, mask.float())


@needs_kernels
def test_packed_attention_equals_padded_attention_bit_for_bit(library):
    g = torch.Generator().manual_seed(8)
    lengths, H, D = [5, 0, 11, 1, 8], 4, 24  # an empty source too
    qkv = torch.randn(sum(lengths), 3 * H * D, generator=g)
    starts = torch.tensor([0] + lengths).cumsum(0)
    out = library.packed_attention(qkv, starts, H)
    assert out.shape == (sum(lengths), H * D)
    for b, n in enumerate(lengths):  # each source alone, through the padded-layout kernel and in float64
        if n == 0:
            continue
        q, k, v = qkv[starts[b]:starts[b + 1]].view(n, 3, H, D).permute(1, 2, 0, 3).unsqueeze(1)
        alone = library.decode_attention(q, k, v, None)  # [1, n, H, D]
        assert torch.equal(out[starts[b]:starts[b + 1]], alone.view(n, H * D))
        expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / D ** 0.5, -1) @ v.double()
        torch.testing.assert_close(out[starts[b]:starts[b + 1]].double(),
                                   expected[0].transpose(0, 1).reshape(n, H * D), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"starts: from 0 to 25 tokens, got 0 to 24"):
        library.packed_attention(qkv, starts - torch.tensor([0, 0, 0, 0, 0, 1]), H)
    with pytest.raises(RuntimeError, match=r"qkv: contiguous float32 \[tokens, 3 x 5 x head_dim\]"):
        library.packed_attention(qkv, starts, 5)


@needs_kernels
def test_cached_decode_attention_writes_the_slot_then_attends(library):
    g = torch.Generator().manual_seed(9)
    k_cache, v_cache = torch.randn(3, 2, 4, 10, 64, generator=g), torch.randn(3, 2, 4, 10, 64, generator=g)
    q = torch.randn(2, 1, 3, 8, 64, generator=g)[:, :, 0].transpose(1, 2)  # 8 query heads share 4 kv heads
    k_new, v_new = torch.randn(2, 4, 1, 64, generator=g), torch.randn(2, 4, 1, 64, generator=g)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :2] = False
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[1, :, :, 6:7], expected_v[1, :, :, 6:7] = k_new, v_new
    out = library.cached_decode_attention(q, k_new, v_new, k_cache, v_cache, 1, 6, 7, mask)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert torch.equal(out, library.decode_attention(q, expected_k[1, :, :, :7], expected_v[1, :, :, :7], mask))
    with pytest.raises(RuntimeError, match="slot 7, read 7 outside the cache"):
        library.cached_decode_attention(q, k_new, v_new, k_cache, v_cache, 1, 7, 7, None)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_cache_rounds_as_it_writes_and_widens_exactly_as_it_reads(library, dtype):
    g = torch.Generator().manual_seed(10)
    k_cache, v_cache = torch.randn(2, 3, 4, 9, 64, generator=g).to(dtype), torch.randn(2, 3, 4, 9, 64, generator=g).to(dtype)
    q, k_new, v_new = (torch.randn(3, 4, 1, 64, generator=g) for _ in range(3))
    rows = torch.tensor([[0, 2, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 0, 0, 1, 2, 2, 2, 2, 2]])
    wide_k, wide_v = k_cache.float(), v_cache.float()
    out = library.cached_decode_attention(q, k_new, v_new, k_cache, v_cache, 1, 5, 6, None, rows)
    # the new keys and values rounded to nearest even as torch rounds them; the rest untouched
    wide_k[1, :, :, 5:6], wide_v[1, :, :, 5:6] = k_new.to(dtype).float(), v_new.to(dtype).float()
    assert torch.equal(k_cache.float(), wide_k) and torch.equal(v_cache.float(), wide_v)
    # reading 16-bit keys gives the bits of reading their float32 values
    assert torch.equal(out, library.cached_decode_attention(q, k_new.to(dtype).float(), v_new.to(dtype).float(),
                                                            wide_k.clone(), wide_v.clone(), 1, 5, 6, None, rows))
    assert torch.equal(library.decode_attention(q, k_cache[0, :, :, :7], v_cache[0, :, :, :7], None),
                       library.decode_attention(q, wide_k[0, :, :, :7], wide_v[0, :, :, :7], None))
    with pytest.raises(RuntimeError, match="caches: float32, bfloat16 or float16 alike"):
        library.cached_decode_attention(q, k_new, v_new, k_cache, v_cache.float(), 1, 5, 6, None)


@needs_kernels
def test_cached_decode_attention_on_the_fused_product_equals_it_on_q_k_v(library):
    g = torch.Generator().manual_seed(10)
    caches = [torch.randn(2, 3, 4, 9, 16, generator=g) for _ in range(2)]
    qkv = torch.randn(3, 1, 3 * 4 * 16, generator=g)
    q, k, v = qkv.view(3, 1, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
    rows = torch.tensor([[2, 0, 1, 1, 0, 0, 0, 0, 0], [0, 1, 2, 2, 1, 1, 1, 1, 1], [1, 1, 0, 2, 2, 2, 2, 2, 2]])
    split = [c.clone() for c in caches]
    fused = library.cached_decode_attention_fused(qkv, *caches, 1, 4, 5, None, rows)
    assert torch.equal(fused, library.cached_decode_attention(q, k, v, *split, 1, 4, 5, None, rows))
    assert torch.equal(caches[0], split[0]) and torch.equal(caches[1], split[1])
    with pytest.raises(RuntimeError, match=r"qkv: contiguous float32 \[3, 1, 3 x 4 x 16\]"):
        library.cached_decode_attention_fused(qkv[..., :-16], *caches, 1, 4, 5, None, rows)


@needs_kernels
def test_cached_decode_attention_reads_each_slot_from_the_row_the_table_names(library):
    g = torch.Generator().manual_seed(11)
    k_cache, v_cache = torch.randn(2, 3, 2, 8, 32, generator=g), torch.randn(2, 3, 2, 8, 32, generator=g)
    q = torch.randn(3, 4, 1, 32, generator=g)
    k_new, v_new = torch.randn(3, 2, 1, 32, generator=g), torch.randn(3, 2, 1, 32, generator=g)
    rows = torch.tensor([[2, 2, 0, 1, 1, 1, 1, 1], [0, 1, 2, 0, 1, 2, 1, 2], [1, 0, 0, 0, 2, 2, 2, 2]])
    rows[:, 5] = torch.arange(3)  # this step's slot: every row writes its own
    out = library.cached_decode_attention(q, k_new, v_new, k_cache, v_cache, 1, 5, 6, None, rows)
    # the same cache with each row's slots gathered into the row itself
    slots = torch.arange(6).expand(3, 6)
    gathered_k = k_cache[1][rows[:, :6], :, slots].permute(0, 2, 1, 3)  # [3, 6, kv heads, 32] -> [3, 2, 6, 32]
    gathered_v = v_cache[1][rows[:, :6], :, slots].permute(0, 2, 1, 3)
    assert torch.equal(k_cache[1, :, :, 5:6], k_new)  # written into each row's own slot
    assert torch.equal(out, library.decode_attention(q, gathered_k, gathered_v, None))
    assert not torch.equal(out, library.decode_attention(q, k_cache[1, :, :, :6], v_cache[1, :, :, :6], None))
    with pytest.raises(RuntimeError, match=r"rows\[1, 2\] = 3 is not a cache row"):
        library.cached_decode_attention(q, k_new, v_new, k_cache, v_cache, 1, 5, 6, None, rows.index_put_(
            (torch.tensor([1]), torch.tensor([2])), torch.tensor(3)))


def test_a_cache_reordered_by_its_row_table_gathers_into_the_copied_layout():
    from tinyformer.generation.cache import KVCache

    config = tiny_model("tiny", vocab_size=64).config
    g = torch.Generator().manual_seed(12)

    def filled():
        torch.manual_seed(3)
        cache = KVCache(config, 4, 6)
        cache.k.normal_(generator=g.manual_seed(1))
        cache.v.normal_(generator=g.manual_seed(2))
        cache.length = 4
        return cache

    copied, by_table = filled(), filled()
    by_table._attended = True  # as after a step through kernels.cpp
    k_before = by_table.k.clone()
    for order in ([2, 2, 0, 1], [3, 1, 1, 0]):
        copied.select(torch.tensor(order))
        by_table.select(torch.tensor(order))
    assert torch.equal(by_table.k, k_before)  # nothing moved; the table says where each slot is
    assert by_table.rows[:, :4].tolist() == [[1] * 4, [2] * 4, [2] * 4, [2] * 4]
    kept = torch.tensor([3, 0])  # rows leaving the batch: the table is gathered first
    copied.select(kept)
    by_table.select(kept)
    assert by_table.rows is None
    assert torch.equal(by_table.k[:, :, :, :4], copied.k[:, :, :, :4])
    assert torch.equal(by_table.v[:, :, :, :4], copied.v[:, :, :, :4])


@needs_kernels
@pytest.mark.parametrize("kind", ["tiny", "llama-tiny"])
def test_beam_search_reorders_the_cache_by_its_row_table(library, kind):
    from tinyformer.generation import beam_search_batch
    from tinyformer.generation.cache import KVCache

    model = tiny_model(kind, vocab_size=64).pack_for_inference()
    prompts = [[5, 9, 2, 40, 7], [3, 8]]
    options = dict(num_beams=3, max_new_tokens=10, eos_ids=[0], length_penalty=1.0, num_return_sequences=3)
    tables = []
    select = KVCache.select
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVCache, "select", lambda cache, *a, **k: select(cache, *a, **k) or tables.append(cache.rows))
        ours = beam_search_batch(model, prompts, **options)
    sdpa_steps(model)  # every step through SDPA: the cache reordered by copying its keys
    copied = beam_search_batch(model, prompts, **options)
    assert len(tables) == 9 and all(t is not None for t in tables[1:])  # the table from the second reorder on
    assert [[b.tokens for b in r] for r in ours] == [[b.tokens for b in r] for r in copied]
    torch.testing.assert_close([b.logprob for r in ours for b in r], [b.logprob for r in copied for b in r],
                               rtol=0, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("kind", ["tiny", "llama-tiny"])
def test_decoding_through_the_attention_kernels_equals_sdpa(library, kind):
    from tinyformer.generation import TokenStream
    from tinyformer.generation.cache import KVCache

    model = tiny_model(kind, vocab_size=64).pack_for_inference()
    prompts = [[5, 9, 2, 40, 7], [3, 8], [60, 1, 2, 3, 4, 5, 6, 7]]  # left-padded into one batch

    def decode():
        steps = list(TokenStream(model, prompts, max_new_tokens=12, top_n=3))
        return [s.tokens for s in steps], torch.tensor([[lp for _, lp in row] for s in steps for row in s.top])

    calls = []
    attend, attend_fused = KVCache.attend, KVCache.attend_fused
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(KVCache, "attend", lambda *args: calls.append("split") or attend(*args))
        patch.setattr(KVCache, "attend_fused", lambda *args: calls.append("fused") or attend_fused(*args))
        python_steps(model)
        ours, our_logprobs = decode()
    sdpa_steps(model)
    sdpa, sdpa_logprobs = decode()
    # every cached step of both layers went through the kernel: on the fused q/k/v product where keys have as many
    # heads as queries and no rotary positions apply, else on q, k and v
    assert calls == ["fused" if kind == "tiny" else "split"] * (11 * 2)
    assert ours == sdpa
    torch.testing.assert_close(our_logprobs, sdpa_logprobs, rtol=0, atol=1e-5)


def python_steps(model) -> None:
    """Decode steps through the blocks' Python layers (the one-call step of the blocks, DecodeStack, off)."""
    model._decode_stack = None


def sdpa_steps(model) -> None:
    """Decode steps through Python's layers and SDPA (no kernels.cpp attention either)."""
    from tinyformer.model.layers import Attention

    python_steps(model)
    for attention in model.modules():
        if isinstance(attention, Attention):
            attention._decode_kernel = None


def count_layer_steps(patch) -> list:
    """Patch KVCache.decode_stack to record the layer index of every block step it takes in one call."""
    from tinyformer.generation.cache import KVCache

    calls, decode_stack = [], KVCache.decode_stack
    patch.setattr(KVCache, "decode_stack",
                  lambda cache, stack, *a: calls.extend(range(len(stack.blocks))) or decode_stack(cache, stack, *a))
    return calls


def perturb_vectors(model, prefix: str = "") -> None:
    """Norms and biases (under `prefix`) away from 1 and 0, so a swapped or dropped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.startswith(prefix):
                p.add_(0.3 * torch.randn_like(p))


def stream(model, prompts, **options):
    """Greedy tokens and every step's top-3 log-probabilities."""
    from tinyformer.generation import TokenStream

    steps = list(TokenStream(model, prompts, top_n=3, **options))
    return [s.tokens for s in steps], torch.tensor([[lp for _, lp in row] for s in steps for row in s.top])


def both_ways(model, decode):
    """decode() with the blocks' one-call steps (and the layers that took them), then through the Python layers."""
    with pytest.MonkeyPatch.context() as patch:
        calls = count_layer_steps(patch)
        ours = decode()
    python_steps(model)
    return calls, ours, decode()


@needs_kernels
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("kind, overrides", [("tiny", {}), ("tiny", dict(mlp="swiglu", bias=True)),
                                             ("tiny", dict(mlp="relu", norm_position="post")), ("tiny", dict(mlp="silu")),
                                             ("tiny", dict(gelu_approximate="none")), ("llama-tiny", {}),
                                             ("llama-tiny", dict(positional="learned")), ("llama-tiny", dict(n_kv_heads=4))])
def test_a_blocks_decode_step_in_one_call_equals_its_python_layers_bit_for_bit(library, weights, kind, overrides):
    # llama-tiny: RMSNorm, rotary positions, grouped keys (2 of 4 heads), SwiGLU
    options = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}[weights]
    model = quant.pack(quant.set_precision(tiny_model(kind, vocab_size=64, **overrides), **options))
    perturb_vectors(model)
    model.pack_for_inference()
    # without VNNI int8 runs its few-row steps through fbgemm, so its batch is one prompt; float weights (and int8
    # with VNNI) take several rows
    one = weights == "int8" and not kernels.int8_vnni()
    prompts = [[5, 9, 2, 40, 7]] if one else [[5, 9, 2, 40, 7], [3, 8], [60, 1, 2, 3, 4, 5, 6, 7]]
    calls, (ours, our_logprobs), (theirs, their_logprobs) = both_ways(
        model, lambda: stream(model, prompts, max_new_tokens=12))
    assert calls == [0, 1] * 11  # every cached step of both blocks in one call each
    assert ours == theirs
    assert torch.equal(our_logprobs, their_logprobs)


@needs_kernels
@pytest.mark.parametrize("overrides", [{}, dict(norm_position="post", final_norm=False, mlp="silu")])
def test_a_seq2seq_decoder_blocks_step_in_one_call_equals_its_python_layers_greedy_and_beam(library, overrides):
    from .helpers import seq2seq_lm

    lm = seq2seq_lm(seed=2, **overrides)
    perturb_vectors(lm.model, "decoder")
    lm.model.pack_for_inference()
    sources = ["je suis content .", "il est grand", "农夫山泉 là !"]

    def decode():
        greedy = lm.generate(sources, max_new_tokens=12, temperature=0, logprobs=0, details=True)
        beams = lm.generate(sources[0], max_new_tokens=10, num_beams=4, num_return_sequences=4, details=True)
        return ([g.token_ids for g in greedy], [g.logprobs for g in greedy],
                [beams.token_ids] + [a.token_ids for a in beams.alternatives], beams.score)

    calls, ours, theirs = both_ways(lm.model, decode)
    assert len(calls) > 2 * 18 and set(calls) == {0, 1}  # greedy at 3 rows and beam 4 at 4 rows, both layers
    assert ours == theirs  # tokens, log-probabilities and the beam's score exactly
    assert len(set(map(tuple, ours[0]))) > 1


@needs_kernels
def test_from_16_rows_a_thread_each_thread_steps_its_own_sources_with_the_same_bits(library):
    # 36 sources greedy and 9 x 4 beams: the rows split across 2 threads at a source's boundary, each thread stepping
    # its part of the batch, the caches, the masks, the cross-attention keys and beam search's row table
    from tinyformer.model.quant import set_precision

    from .helpers import seq2seq_lm

    lm = seq2seq_lm(seed=3)
    set_precision(lm.model, dtype="bfloat16")  # 16 rows x 2 FLOPs a 2-byte weight: split wherever its cache is
    perturb_vectors(lm.model, "decoder")
    lm.model.pack_for_inference()
    words = ["je", "suis", "content", "il", "est", "grand", "nous", "sommes", "là", "农夫山泉", "!", "."]
    sources = [" ".join(words[(i * 7 + j) % len(words)] for j in range(1 + i % 5)) for i in range(36)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lm.model._decode_stack.kernel.splits(36) and not lm.model._decode_stack.kernel.splits(31)

        def decode():
            greedy = lm.generate(sources, max_new_tokens=10, temperature=0, logprobs=0, details=True)
            beams = lm.generate(sources[:9], max_new_tokens=8, num_beams=4, num_return_sequences=2, details=True)
            return ([g.token_ids for g in greedy], [g.logprobs for g in greedy],
                    [[b.token_ids] + [a.token_ids for a in b.alternatives] for b in beams], [b.score for b in beams])

        calls, ours, theirs = both_ways(lm.model, decode)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) > 2 * 16 and set(calls) == {0, 1}
    assert ours == theirs  # tokens, log-probabilities and the beams' scores exactly
    assert len(set(map(tuple, ours[0]))) > 10
    assert lm.generate(sources[5], max_new_tokens=10, temperature=0, details=True).token_ids == ours[0][5]  # alone


@needs_kernels
def test_a_rolling_window_steps_in_one_call_as_through_its_python_layers(library):
    model = tiny_model("llama-tiny", vocab_size=64, context_length=16).pack_for_inference()
    perturb_vectors(model)
    # 40 tokens through a cache of 16 slots: it wraps twice
    calls, (ours, our_logprobs), (theirs, their_logprobs) = both_ways(
        model, lambda: stream(model, [[5, 9, 2, 40, 7]], max_new_tokens=40, window="roll"))
    assert calls == [0, 1] * 39
    assert ours == theirs and torch.equal(our_logprobs, their_logprobs)


@needs_kernels
def test_blocks_whose_weight_changed_after_packing_step_through_python(library):
    from tinyformer.generation import TokenStream

    model = tiny_model("tiny", vocab_size=64).pack_for_inference()
    with torch.no_grad():
        model.blocks[1].mlp.up.weight.mul_(1.5)

    def decode():
        return [s.tokens for s in TokenStream(model, [[5, 9, 2, 40, 7]], max_new_tokens=6)]

    with pytest.MonkeyPatch.context() as patch:
        calls = count_layer_steps(patch)
        ours = decode()
    assert calls == []  # the blocks run their Python layers, which see the new weight
    fresh = tiny_model("tiny", vocab_size=64)
    with torch.no_grad():
        fresh.blocks[1].mlp.up.weight.mul_(1.5)
    assert ours == [s.tokens for s in TokenStream(fresh, [[5, 9, 2, 40, 7]], max_new_tokens=6)]


@needs_kernels
def test_a_generation_checks_the_packed_weights_once_not_every_step(library):
    from tinyformer.generation import TokenStream
    from tinyformer.model.layers import DecodeStack, Linear

    model = tiny_model("tiny", vocab_size=64).pack_for_inference()
    checks, inside = [], []
    version, takes = Linear._weight_version, DecodeStack.takes

    def counted_takes(self, *args):
        before = len(checks)
        result = takes(self, *args)
        inside.append(len(checks) - before)  # weight versions read by this step's check
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Linear, "_weight_version", lambda self: checks.append(1) or version(self))
        patch.setattr(DecodeStack, "takes", counted_takes)
        for _ in range(2):  # a new generation (a new cache) checks again
            assert len([s for s in TokenStream(model, [[5, 9, 2, 40, 7]], max_new_tokens=6)]) == 6
    linears = len(model._decode_stack.linears)
    assert inside == [0, linears, 0, 0, 0, 0] * 2  # the prompt (5 tokens) is no decode step
    with torch.no_grad():
        model.blocks[1].mlp.up.weight.mul_(1.5)  # between generations: the next one sees it and steps through Python
    with pytest.MonkeyPatch.context() as patch:
        calls = count_layer_steps(patch)
        list(TokenStream(model, [[5, 9, 2, 40, 7]], max_new_tokens=6))
    assert calls == []


@needs_kernels
def test_a_decoder_layer_refuses_bad_input_in_one_line(library):
    model = tiny_model("tiny", vocab_size=64).pack_for_inference()
    block = model.blocks[0]
    k = torch.zeros(4, 1, 4, 8, 32)
    step = block._decode_layer.step
    with pytest.raises(RuntimeError, match=r"x: contiguous float32 \[batch, 1, d_model\], got \[1, 2, 128\]"):
        step(torch.zeros(1, 2, 128), k, k.clone(), 0, 0, 1, None, None, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="this layer has no cross-attention"):
        step(torch.zeros(1, 1, 128), k, k.clone(), 0, 0, 1, None, None, k[0], k[0], None, None, None)
    with pytest.raises(RuntimeError, match=r"cross_k, cross_v: one per layer \(2\) or none"):
        model._decode_stack.step(torch.zeros(1, 1, 128), k, k.clone(), 0, 1, None, None, [k[0]], [k[0]], None, None,
                                 None)
    norms = [block.norm1.weight, block.norm1.bias, None, None, block.norm2.weight, block.norm2.bias]
    matrices = [block.attn._qkv.kernel.weight, None, None] + [None] * 18
    with pytest.raises(RuntimeError, match="activation tanh is not one of relu, gelu, gelu_tanh, silu, swiglu"):
        torch.classes.tinyformer.DecoderLayer(norms, matrices, 4, 4, 32, False, False, "tanh", 1e-5, 8, False, False)
    with pytest.raises(RuntimeError, match="DecoderLayer: 4 heads in groups of 3"):
        torch.classes.tinyformer.DecoderLayer(norms, matrices, 4, 3, 32, False, False, "gelu", 1e-5, 8, False, False)
    with pytest.raises(RuntimeError, match="DecoderLayer: panel width 4 is not one this CPU reads"):
        torch.classes.tinyformer.DecoderLayer(norms, matrices, 4, 4, 32, False, False, "gelu", 1e-5, 4, False, False)
    if not library.has_amx():
        with pytest.raises(RuntimeError, match=r"DecoderLayer: this CPU has no AMX \(bfloat16\)"):
            torch.classes.tinyformer.DecoderLayer(norms, matrices, 4, 4, 32, False, False, "gelu", 1e-5, 8, False, True)


@needs_kernels
def test_argmax_rows_answers_as_torch_argmax_on_ties_infinities_and_nans(library):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(7, 50257, generator=g)
    x[1, [30000, 7, 40000]] = 9.0  # a tie: the first index wins
    x[2] = float("-inf")
    x[3, [40000, 12345]] = float("nan")  # the first NaN, whatever the largest number
    x[4, -1] = 50.0  # in the tail past the last whole vector of 8
    x[5, :] = 0.0
    x[5, [100, 3]] = -0.0  # zeros of both signs tie
    x[6, [5, 50256]] = float("inf")
    assert x.argmax(-1).tolist() == [int(x[0].argmax()), 7, 0, 12345, 50256, 0, 5]
    assert torch.equal(library.argmax_rows(x), x.argmax(-1))
    for width in (1, 7, 8, 9, 17):
        small = torch.randn(2, 3, width, generator=g)
        assert torch.equal(library.argmax_rows(small), small.argmax(-1))  # [2, 3]: every dimension but the last
    assert torch.equal(kernels.argmax(x.t()), x.t().argmax(-1))  # not contiguous: torch's own
    with pytest.raises(RuntimeError, match=r"x: contiguous float32 \[..., values > 0\], got \[3, 0\]"):
        library.argmax_rows(torch.zeros(3, 0))


@needs_kernels
@pytest.mark.parametrize("group, vocab, k", [(4, 8000, 8), (1, 37, 5), (3, 21, 64), (2, 16, 1)])
def test_beam_topk_equals_log_softmax_plus_scores_then_topk(library, group, vocab, k):
    g = torch.Generator().manual_seed(14)
    sources = 5
    logits = torch.randn(sources * group, vocab, generator=g) * 4
    scores = torch.randn(sources * group, generator=g) * 3
    if group > 1:
        logits[1], scores[1] = logits[0], scores[0]  # twin beams of one source: ties, kept in index order
    scores[-1] = float("-inf")  # a dead beam (with group 1, a whole source: -inf ties in index order)
    banned = torch.tensor([vocab - 1, 3])
    logits[0, 3] = 50.0  # a banned token with the row's largest logit: never chosen, and still in the sum
    k = min(k, group * vocab)
    values, indices = library.beam_topk(logits.clone(), scores, group, k, banned)
    # the reference in float64: log_softmax over every token, the banned ones then at -inf, + scores, top-k
    logprobs = logits.double().log_softmax(-1)
    logprobs[:, banned] = float("-inf")
    totals = (logprobs + scores.double().unsqueeze(1)).view(sources, group * vocab)
    expected = torch.sort(-totals, dim=1, stable=True).indices[:, :k]
    assert indices.tolist() == expected.tolist()
    torch.testing.assert_close(values.double(), totals.gather(1, indices), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"banned id 99999 is not in \[0, "):
        library.beam_topk(logits, scores, group, k, torch.tensor([99999]))
    with pytest.raises(RuntimeError, match=r"group: 7 does not divide"):
        library.beam_topk(logits, scores, 7, 1, None)


@needs_kernels
def test_beam_topk_sends_a_source_with_a_nan_to_torch_topk(library):
    logits = torch.randn(4, 40)
    logits[2, 5] = float("nan")
    values, indices = library.beam_topk(logits, torch.zeros(4), 2, 3, None)
    assert torch.isnan(values[1, 0]) and indices[1, 0].item() == 5  # row 2 is source 1's first: at::topk ranks NaN first
    assert torch.isfinite(values[0]).all()
    # kernels.beam_topk on what kernels.cpp does not take (float64) gives torch's answer
    clean = torch.randn(4, 40, dtype=torch.float64)
    ours = kernels.beam_topk(clean.float(), torch.zeros(4), 2, 3)
    theirs = kernels.beam_topk(clean, torch.zeros(4, dtype=torch.float64), 2, 3)
    assert torch.equal(ours[1], theirs[1])


def test_topk_rows_gives_torchs_values_with_ties_in_index_order(library):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(9, 32768, generator=g).log_softmax(-1)  # beam search's [sources, beams x vocabulary]
    x[1] = torch.randint(-3, 3, (32768,), generator=g).float()  # thousands of ties at every value
    x[2] = float("-inf")
    x[2, [20000, 9, 31]] = torch.tensor([-1.0, -2.0, -1.0])  # three numbers, then -inf ties in index order
    x[3, 32767] = 10.0  # the last value wins
    x[4, [7, 4000]] = float("nan")  # torch ranks NaN first: this row goes to torch.topk
    x[5, :] = 0.0
    x[5, [100, 3]] = -0.0  # zeros of both signs tie
    x[6, [5, 50]] = float("inf")
    x[7, :3] = 5.0  # ties among the first k values, before the vectorised scan
    x[8, 32760:] = 7.0  # ties in the tail past the last whole vector of 8
    for k in (1, 3, 8, 64):
        values, indices = library.topk_rows(x, k)
        expected_values, _ = x.topk(k, dim=-1)
        assert torch.equal(values.nan_to_num(), expected_values.nan_to_num()), k
        assert torch.equal(x.gather(1, indices).nan_to_num(), values.nan_to_num()), k
        for row in (0, 1, 2, 3, 5, 6, 7, 8):  # equal values in index order, the lowest indices kept
            assert indices[row].tolist() == torch.sort(-x[row], stable=True).indices[:k].tolist(), (row, k)
    assert library.topk_rows(x, 3)[1][2].tolist() == [31, 20000, 9]
    assert library.topk_rows(x, 4)[1][2].tolist() == [31, 20000, 9, 0]
    assert torch.equal(library.topk_rows(x, 2)[1][4], x[4].topk(2).indices)  # the NaN row: torch's answer
    small = torch.randn(3, 5, generator=g)
    assert torch.equal(kernels.topk(small, 5)[0], small.topk(5).values)
    wide = torch.randn(2, 300, generator=g)
    assert torch.equal(kernels.topk(wide, 100)[0], wide.topk(100).values)  # k over 64: torch's own
    with pytest.raises(RuntimeError, match=r"k: 6 is not in \[1, min\(5, 64\)\]"):
        library.topk_rows(small, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_kernels_cpp_float_weights_go_through_torchs_products(monkeypatch, dtype):
    if dtype != torch.float32 and not quant._FBGEMM:
        pytest.skip("16-bit weights without kernels.cpp need fbgemm")
    monkeypatch.setattr(kernels, "library", lambda: None)
    g = torch.Generator().manual_seed(9)
    weight, bias = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g)
    kernel = quant.make_kernel(weight, bias, None)
    assert isinstance(kernel, quant.FloatKernel) and kernel.own is None and kernel.own_matrix() is None
    x, residual = torch.randn(2, 3, 24, generator=g), torch.randn(2, 3, 40, generator=g)
    expected = residual + F.linear(x, weight.float(), bias)
    # oneDNN in float32, fbgemm's float16 kernel (float16 weights, exact for these bfloat16 values); a lost bias
    # or residual is ~1
    torch.testing.assert_close(kernel(x, residual), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kernel(x[:1, :1]), expected[:1, :1] - residual[:1, :1], atol=1e-4, rtol=1e-4)


def test_amx_and_avx512_are_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TINYFORMER_KERNELS", "avx512")
    assert not kernels.amx_bfloat16()
    monkeypatch.setenv("TINYFORMER_KERNELS", "avx2")
    assert not kernels.amx_bfloat16() and kernels.panel_width() == 8 and not kernels.int8_vnni()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TINYFORMER_KERNELS", "0")
    assert not kernels.supported()


def test_the_ninja_package_is_found_without_an_activated_venv(monkeypatch):
    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "/usr/bin")
    assert kernels.ninja_on_path().split(":")[0] == ninja.BIN_DIR
