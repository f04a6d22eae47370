"""Weight precision for inference: float32, 16-bit or int8 weights, and the CPU kernel that multiplies by each.

`set_precision(model, dtype, quantize)` works on any module built from `layers.Linear` (GPT, seq2seq): `dtype`
stores the matrices and embeddings in it (on the CPU the arithmetic stays float32; elsewhere the model is cast
like `model.to(dtype)`); `quantize="int8"` then stores every Linear's weight as int8 with one float32 scale per
output row (symmetric, scale = max |w| / 127). Embeddings keep `dtype`. The weights
stay ordinary tensors in the state dict (`X.weight` int8 + `X.weight_scale`), so a quantized model is saved and
loaded like any other (safetensors).

The kernel per precision was chosen by timing the candidates on GPT-2-124M's 49 weight matrices, one token's worth
(ms for all 49 at 1 row / 8 rows; 2-core AMD EPYC VM with AVX2 but no AVX-512, torch 2.13, one thread so that
OpenMP wake-ups, which cost ~12 ms each on this VM, do not hide the kernels; issue 9 has an AVX-512 machine's):
- float32: column-major F.linear 19.4 / 88.8, oneDNN pre-packed 23.0 / 55.8; now our own kernel at any number of
  rows (kernels.cpp's panel_linear, see FloatKernel), which beats both (and the row-by-row kernel it replaced).
- bfloat16 / float16: fbgemm's float16 kernel (`linear_dynamic_fp16`: weights packed as float16, float32
  accumulation) 16.4 / 33.9. F.linear in bfloat16 is 10-20x slower than float32 without AVX-512, and oneDNN refuses
  to pre-pack bfloat16 there; on the AVX-512 machine fbgemm float16 still beat pre-packed bfloat16 (8.0 vs 8.9 ms).
  Every bfloat16 weight is exactly a float16 value unless |w| < 6e-5 (float16 subnormals: absolute error < 6e-8).
  Now the same kernel of ours as float32 on a 16-bit copy in panels (bfloat16 -> float32 is a shift, float16 ->
  float32 one F16C instruction, both exact), at any number of rows: exact for every bfloat16 weight, and faster
  than fbgemm from 1 to 32 rows (kernels.cpp gives the figures).
- int8: fbgemm's dynamically quantized linear (`quantized.linear_dynamic`: activations quantized per call to
  uint8, int8 weights, int32 accumulation) 11.9 / 22.6. Slower: `aten._weight_int8pack_mm` (plain tensors,
  weight-only) 19.6 / 68.3 with bfloat16 activations; with float32 ones, and torchao 0.18's int8 configs, were
  50-70x slower than fbgemm at one row in a (busy) two-thread run. fbgemm is reached through torch's
  quantized-tensor API, deprecated in 2.13 with no CPU successor yet, so its deprecation warning is silenced where
  we build the packed weight, and `_weight_int8pack_mm` runs wherever fbgemm is missing or autograd is on. At one
  row our own kernel (kernels.cpp, see Int8Kernel) beats fbgemm with two threads: 5.4 vs 6.1 and 7.7 vs 10.1 ms
  in two runs.
"""
from __future__ import annotations

import mmap
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZATIONS = ("int8",)


class PrecisionError(ValueError):
    """An unsupported dtype / quantization / device combination; the message names it and what is allowed."""


def check_precision(dtype: str | None, quantize: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise PrecisionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise PrecisionError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)} (or none)")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ~= q * scale[:, None], q in [-127, 127], scale float32 [rows]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def linears(model: nn.Module):
    from .layers import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def set_precision(model: nn.Module, dtype: str | None = None, quantize: str | None = None) -> nn.Module:
    """Cast the model to `dtype` and/or quantize its Linear weights, in place; `None` keeps what it has.

    On the CPU a 16-bit dtype stores the matrices and embeddings in 16 bits and keeps the arithmetic in float32
    (norms, biases and activations stay float32, model.compute_dtype = float32), as llama.cpp and CTranslate2 do
    on CPUs: the 16-bit matrix kernels compute in float32 anyway, and a CPU without native bfloat16 (AVX2,
    AVX-512 without BF16) emulates bfloat16 attention and norms (measured on GPT-2-124M: 4.4 ms of a 17.5 ms step
    outside the matrix products, against 2.7 in float32; the whole step ~7% faster in 6 alternating runs). The KV
    cache holds keys and values in the 16-bit dtype (model.cache_dtype), as llama.cpp's f16 cache does: half the
    bytes a decode step's attention reads (GPT-2-124M bfloat16 at batch 8: ~2.2 ms of a ~9.5 ms step in float32),
    widened exactly as they are read; int8 weights get a bfloat16 cache too. Elsewhere (a GPU) the whole model is
    cast."""
    check_precision(dtype, quantize)
    layers = linears(model)
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if quantize and not on_cpu:
        raise PrecisionError("quantize='int8' runs on the CPU only (fbgemm kernels); load with device='cpu'")
    if dtype is not None:
        scales = [(m, m.weight_scale) for m in layers if m.weight_scale is not None]
        target = DTYPES[dtype]
        if on_cpu and target != torch.float32:
            model.float()
            for m in model.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.is_floating_point():
                    m.weight.data = m.weight.data.to(target)  # a tied head is the embedding's tensor: cast once
            model.compute_dtype, model.cache_dtype = torch.float32, target
        else:
            model.to(target)  # casts floating tensors only: int8 weights stay int8
            model.compute_dtype = model.cache_dtype = None
        for m, scale in scales:  # a scale rounded to 16 bits would shift its whole row by up to 0.4%
            m.weight_scale = scale.float()
    if quantize == "int8":
        for m in layers:
            m.quantize_int8()
        # keys and values in 16 bits beside 8-bit weights, as llama.cpp's f16 cache beside q8_0: GPT-2-124M int8 at
        # batch 8 decodes 1.08x faster (6 of 6 alternating pairs), held-out loss unchanged (benchmarks/quality.py)
        model.cache_dtype = getattr(model, "cache_dtype", None) or torch.bfloat16
    return model


def activation_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations take: model.compute_dtype when set_precision chose one, else the weights' (a model cast
    whole)."""
    return getattr(model, "compute_dtype", None) or next(p.dtype for p in model.parameters() if p.is_floating_point())


def cache_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the KV cache's keys and values: model.cache_dtype when set_precision chose one (16-bit or int8
    weights on the CPU: bfloat16 or the weights' 16 bits), else the activations'."""
    return getattr(model, "cache_dtype", None) or activation_dtype(model)


def pack(model: nn.Module) -> nn.Module:
    """Build every Linear's fast kernel (see layers.Linear.pack), then let modules fuse their Linears (e.g.
    Attention's q, k, v); values, names and shapes are unchanged."""
    from .layers import Linear

    for m in linears(model):
        m.pack()
    for m in reversed(list(model.modules())):  # inner modules first: a Block uses its attention's fused q/k/v
        if hasattr(m, "pack") and not isinstance(m, Linear):
            m.pack()
    return model


def precision(model: nn.Module) -> dict:
    """{"dtype": name of the floating weights' dtype, "quantize": "int8" or None} as saved in config.json."""
    stored = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))] + list(model.parameters())
    floating = next((p.dtype for p in stored if p.is_floating_point()), torch.float32)
    name = next(k for k, v in DTYPES.items() if v == floating)
    return {"dtype": name, "quantize": "int8" if any(m.weight_scale is not None for m in linears(model)) else None}


def require_float(model: nn.Module, what: str) -> None:
    """Refuse int8 matrices where float weights are needed (exports write their own formats' precisions)."""
    if precision(model)["quantize"]:
        raise PrecisionError(f"{what} needs float weights but this model's matrices are int8; "
                             f"start from the float checkpoint (no --quantize)")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (parameters and persistent buffers, shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


# ----------------------------------------------------------------------------------------------------- kernels

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


class FloatKernel:
    """float32, bfloat16 or float16 weights, float32 arithmetic: kernels.cpp's panel_linear on a copy of the weight
    repacked in panels of 8 output features, 16 on AVX-512 CPUs (see `panels`; bfloat16 on AMX CPUs: `amx_panels`,
    the activations carried in 16 significant bits), in huge pages, for any number of
    activation rows, so a row's result never depends on the rows beside it. Without kernels.cpp: float32 through oneDNN's pre-packed copy,
    16-bit weights through fbgemm's float16 kernel (its own float16 copy).

    Why our own: matrix-vector products by MKL, oneDNN or fbgemm read the weight at 12-22 GB/s here with two threads,
    below the ~27 GB/s the two cores read together, and at 9-128 rows oneDNN's pre-packed product reached 60-80% of
    what the panel kernel does (kernels.cpp gives the figures). A model keeps its nn.Linear weight (the state dict,
    autograd) beside the panels: twice the float32 bytes, as with oneDNN's or fbgemm's packed copy before."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.out_features = weight.shape[0]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        library = kernels.library()
        self.own = library.panel_linear.default if library is not None else None
        amx = weight.dtype == torch.bfloat16 and kernels.amx_bfloat16()
        self.width = kernels.AMX_LAYOUT if amx else kernels.panel_width()
        # the panels are made at the first product: a Linear whose product is fused with others' (FusedLinears)
        # never makes them, so no huge-page memory is spent on them
        self.panels, self.weight = None, weight.detach()
        if self.own is None:
            self.plain = _plain_product(self.weight, self.bias)

    def _panels(self) -> torch.Tensor:
        if self.panels is None:
            packed = amx_panels(self.weight) if self.width == kernels.AMX_LAYOUT else panels(self.weight, self.width)
            self.panels, self.weight = HUGE_PAGES.copy(packed), None
        return self.panels

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias, plus `residual` (the residual stream, shaped like the output) when given."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype != torch.float32:  # tested first: a no-op .float() still costs a dispatch
            flat = flat.float()
        if self.own is None:
            return _as_output(self.plain(flat), x, residual)
        if x.dtype == torch.float32:
            return self.own(flat.contiguous(), self._panels(), self.width, self.bias,
                            _contiguous(residual)).view(*x.shape[:-1], self.out_features)
        return _as_output(self.own(flat.contiguous(), self._panels(), self.width, self.bias), x, residual)

    def own_matrix(self):
        """([weight, scale, bias], the most rows) as kernels.cpp multiplies by this weight, or None."""
        return ([self._panels(), None, self.bias], 1 << 30) if self.own is not None else None


def _plain_product(weight: torch.Tensor, bias: torch.Tensor | None):
    """flat x [rows, K] float32 -> x @ weight.T + bias where kernels.cpp is missing: 16-bit weights through fbgemm's
    float16 kernel, float32 through oneDNN's pre-packed copy, else F.linear."""
    if weight.dtype != torch.float32:
        packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)
        return lambda flat: torch.ops.quantized.linear_dynamic_fp16(flat, packed)
    if _ONEDNN:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
            return lambda flat: torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):  # an unusual build: keep the plain path
            pass
    return lambda flat: F.linear(flat, weight, bias)


def _as_output(y: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """A float32 kernel's [rows, out] result shaped and typed like x, plus the residual stream when given."""
    y = y.view(*x.shape[:-1], y.shape[-1])
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if residual is None else residual + y


def _contiguous(residual: torch.Tensor | None) -> torch.Tensor | None:
    """The residual stream as kernels.cpp adds it to its output: contiguous float32 values, in any shape."""
    return residual if residual is None or residual.is_contiguous() else residual.contiguous()


def panels(weight: torch.Tensor, width: int = 8) -> torch.Tensor:
    """weight [N, K] in the order kernels.cpp's panel_linear reads it, as a 1-D tensor: the output features in
    panels of `width` (8 for AVX2, 16 for AVX-512: kernels.panel_width), each panel's K x width values k-major, then
    the last N % width features k-major as well."""
    n, k = weight.shape
    whole = n // width * width
    body = weight[:whole].reshape(n // width, width, k).transpose(1, 2)
    return torch.cat([body.reshape(-1), weight[whole:].t().reshape(-1)])


def amx_panels(weight: torch.Tensor) -> torch.Tensor:
    """bfloat16 weight [N, K] in the order kernels.cpp's AMX kernel reads it (panel_linear width 32), as a 1-D tensor
    of N x Kp values, K padded with zeros to Kp, a multiple of 32: the output features in panels of 16, each panel
    [Kp / 2][16][2] (each feature's k pair side by side), then the last N % 16 features as [Kp / 2][N % 16][2]."""
    n, k = weight.shape
    kp = -(-k // 32) * 32
    padded = F.pad(weight.to(torch.bfloat16), (0, kp - k))
    whole = n // 16 * 16
    body = padded[:whole].reshape(n // 16, 16, kp // 2, 2).transpose(1, 2)
    tail = padded[whole:].reshape(n - whole, kp // 2, 2).transpose(0, 1)
    return torch.cat([body.reshape(-1), tail.reshape(-1)])


def int8_groups(q: torch.Tensor) -> torch.Tensor:
    """int8 weight q [N, K] in the order kernels.cpp's int8_linear reads it, [N, K padded to a multiple of 32]: the
    rows in groups of 4 (the last group holds N % 4), each group's rows side by side block by block
    ([blocks of 32][rows][32]), so one stream through memory carries 4 rows where 4 row-major rows, 768 bytes apart
    in GPT-2, left the hardware prefetcher 4 short streams."""
    q = F.pad(q, (0, -q.shape[1] % 32))
    n, k = q.shape
    whole = n // 4 * 4
    body = q[:whole].reshape(n // 4, 4, k // 32, 32).transpose(1, 2)
    tail = q[whole:].reshape(n - whole, k // 32, 32).transpose(0, 1)
    return torch.cat([body.reshape(-1), tail.reshape(-1)]).view(n, k)


class HugePages:
    """Memory for the weights a decode step streams, in 2 MB pages where Linux allows it (transparent huge pages in
    "madvise" mode, the common default, give them only to memory that asks: MADV_HUGEPAGE on a private anonymous
    mapping). With 4 KB pages the hardware prefetcher stops at every page boundary and each page costs a TLB miss:
    the 37 matrices of an opus-mt-sized decoder step (104 MB, float_linear at one row) streamed 1.11-1.19x faster
    from huge pages here (33-36 of 40 alternating pairs, three runs). Tensors are carved one after another out of
    chunks of at least CHUNK bytes; a chunk is unmapped when the last tensor in it is freed. Elsewhere (no
    MADV_HUGEPAGE, or `enabled` False) copy() is a plain contiguous copy."""

    CHUNK = 64 << 20
    PAGE = 2 << 20

    def __init__(self):
        self.enabled = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE")
        self._chunk, self._used = None, 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t in huge pages."""
        if not self.enabled:
            return t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            self._chunk, self._used = self._map(max(self.CHUNK, -(-nbytes // self.PAGE) * self.PAGE)), 0
        if self._chunk is None:
            return t.contiguous()
        out = self._chunk[self._used:self._used + nbytes].view(t.dtype).view(t.shape)
        self._used += -(-nbytes // 64) * 64  # the next tensor starts on a cache line
        return out.copy_(t)

    def _map(self, nbytes: int) -> torch.Tensor | None:
        try:
            area = mmap.mmap(-1, nbytes + self.PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            area.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):  # a kernel without transparent huge pages: ordinary memory
            self.enabled = False
            return None
        with warnings.catch_warnings():  # frombuffer warns that an mmap is writable; we own it
            warnings.simplefilter("ignore")
            raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive as long as any view of it
        start = -raw.data_ptr() % self.PAGE  # huge pages come only to 2 MB-aligned ranges
        return raw[start:start + nbytes]


HUGE_PAGES = HugePages()


class Int8Kernel:
    """int8 weights: one activation row (a batch-1 decode step) through kernels.cpp, several through fbgemm (up to
    16 rows through kernels.cpp too where the CPU has AVX-512 VNNI).

    kernels.cpp quantizes each activation row per block of 32 values and streams the weight at ~23 GB/s (memory
    reads ~27): GPT-2-124M's 49 matrices for one token in 5.4-7.7 ms against fbgemm's 6.1-10.1 (2 threads, this VM;
    the decode step ~13% faster), with a third of fbgemm's error against the float product (held-out loss of a
    trained model +0.01% against float32, fbgemm +0.05%). From a few rows on fbgemm's kernel wins (8 rows: 10-13 vs
    17-19 ms; a 32-token prompt 37-48 vs 63-89 ms; benchmarks/decode_profile.py --int8-kernels): it quantizes
    activations to 7 bits with one scale for the whole call and sums in int32 over the whole row, about half the
    instructions per weight. fbgemm stores its own packed copy of the weight; kernels.cpp reads a copy in groups
    of 4 rows (`int8_groups`), in huge pages, made at the first one-row product (so a model holds its int8 bytes
    twice besides fbgemm's copy, as float models hold their panels beside the weight).

    On CPUs with AVX-512 VNNI kernels.cpp's VNNI kernel (the same bits) takes up to VNNI_ROWS rows: GPT-2-124M's 49
    matrices at 1 / 2 / 4 / 8 / 16 rows in 2.15 / 2.22 / 3.18 / 5.84 / 11.5 ms against fbgemm's 4.22 / 4.70 / 6.23
    / 8.15 / 9.94 (the AVX2 kernel 2.81 / 4.02 / 7.62 / 13.9 / 26.1). fbgemm wins alone from ~12 rows, but a batch
    of up to 16 then takes the one-call block step: GPT-2 int8 decodes at batch 12 / 16 1.12x / 1.04x faster than
    with fbgemm beyond 8 rows (alternating pairs, 6 and 8 of 8).

    fbgemm's reduce_range=True keeps activations to 7 bits: its AVX2 inner product adds pairs of uint8 x int8
    products in saturating int16, and 2 x 255 x 127 would overflow it."""

    VNNI_ROWS = 16

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        self.out_features = q.shape[0]
        self.bias = None if bias is None else bias.detach().float().contiguous()
        library = kernels.library()
        self.one_row = None
        self.groups, self.weight = None, q.detach()  # the groups are made at the first product (see FloatKernel)
        self.vnni = kernels.int8_vnni()
        if library is not None:
            self.one_row = library.int8_linear.default
            self.scale = scale.float().contiguous()
        self.packed = None
        if _FBGEMM:
            zero = torch.zeros(q.shape[0], dtype=torch.long)
            with warnings.catch_warnings():  # the quantized-tensor API's deprecation: see the module docstring
                warnings.simplefilter("ignore")
                qweight = torch._make_per_channel_quantized_tensor(q.cpu().contiguous(), scale.double().cpu(), zero, 0)
                self.packed = torch.ops.quantized.linear_prepack(qweight, self.bias)

    def _groups(self) -> torch.Tensor:
        if self.groups is None:
            self.groups, self.weight = HUGE_PAGES.copy(int8_groups(self.weight)), None
        return self.groups

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype != torch.float32:  # tested first: a no-op .float() still costs a dispatch, 49 times a step
            flat = flat.float()
        if self.one_row is not None and (flat.shape[0] <= self.own_rows or self.packed is None):
            if x.dtype == torch.float32:
                return self.one_row(flat.contiguous(), self._groups(), self.scale, self.bias,
                                    _contiguous(residual), self.vnni).view(*x.shape[:-1], self.out_features)
            y = self.one_row(flat.contiguous(), self._groups(), self.scale, self.bias, None, self.vnni)
        else:
            y = torch.ops.quantized.linear_dynamic(flat, self.packed, True)
        return _as_output(y, x, residual)

    def own_matrix(self):
        """([weight, scale, bias], the most rows) as kernels.cpp multiplies by this weight, or None."""
        if self.one_row is None:
            return None
        return [self._groups(), self.scale, self.bias], (self.own_rows if self.packed is not None else 1 << 30)

    @property
    def own_rows(self) -> int:
        """The most activation rows kernels.cpp multiplies (beyond, fbgemm): one on AVX2, up to 16 with VNNI."""
        return self.VNNI_ROWS if self.vnni else 1


class FusedLinears:
    """Linears that read the same input run as one matrix product: one kernel call and (int8) one activation
    quantization instead of several; in a GPT-2-124M decode step this saves 24 of 49 matrix calls. Each output
    column is the same dot product as in its own layer. Used only while no weight changed; else each layer runs."""

    def __init__(self, layers):
        self.layers, self.sizes = list(layers), [layer.out_features for layer in layers]
        weights = [layer.weight.detach() for layer in self.layers]
        biases = [layer.bias.detach() if layer.bias is not None else torch.zeros(n, dtype=w.dtype, device=w.device)
                  for layer, w, n in zip(self.layers, weights, self.sizes)]
        scales = [layer.weight_scale for layer in self.layers]
        self.kernel = None
        if len({(w.dtype, w.device) for w in weights}) == 1 and (all(s is None for s in scales)
                                                                 or all(s is not None for s in scales)):
            weight = torch.cat(weights)
            has_bias = any(layer.bias is not None for layer in self.layers)
            self.kernel = make_kernel(weight, torch.cat(biases) if has_bias else None,
                                      torch.cat(scales) if scales[0] is not None else None)
        self.versions = self._versions()
        if self.kernel is not None:
            for layer in self.layers:  # their own kernels would only ever run when the fused one is stale too
                layer._kernel = None

    def _versions(self) -> list:
        return [layer._weight_version() for layer in self.layers]

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layers' outputs side by side in one tensor [..., sum of sizes], or None when the fused kernel may
        not run (autograd on, a weight changed)."""
        if self.kernel is None or torch.is_grad_enabled() or self._versions() != self.versions:
            return None
        return self.kernel(x)

    def __call__(self, x: torch.Tensor):
        y = self.fused(x)
        return [layer(x) for layer in self.layers] if y is None else y.split(self.sizes, dim=-1)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The plain-tensor int8 product, used where fbgemm is missing or autograd is on: weight-only int8."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.ops.aten._weight_int8pack_mm(flat, q, scale.to(flat.dtype))
    y = y.view(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def make_kernel(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None):
    """The fastest CPU kernel for this weight's precision, or None to keep the plain path (see the docstring)."""
    if weight.device.type != "cpu" or (scale is not None and not _FBGEMM and kernels.library() is None):
        return None
    if scale is not None:
        return Int8Kernel(weight, scale, bias)
    if weight.dtype == torch.float32 or (weight.dtype in (torch.bfloat16, torch.float16)
                                         and (_FBGEMM or kernels.library() is not None)):
        return FloatKernel(weight, bias)
    return None
