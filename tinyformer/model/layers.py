"""The building blocks shared by every architecture: norms, positions, attention, feed-forward, block."""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig
from .quant import FusedLinears, int8_linear, make_kernel, pack, quantize_int8


# False while building a model whose every weight is about to be loaded (weights_to_be_loaded)
_initialise = contextvars.ContextVar("tinyformer_initialise", default=True)


@contextlib.contextmanager
def weights_to_be_loaded():
    """Models built inside skip their random initialisation, for loaders that fill every weight next
    (checkpoint.load_state_into refuses a state missing any): it was 0.35 s of the 0.53 s that loading an opus-mt-sized
    Marian model took. Per thread and task (a context variable), so a model built elsewhere meanwhile is unaffected."""
    token = _initialise.set(False)
    try:
        yield
    finally:
        _initialise.reset(token)


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random initialisation under weights_to_be_loaded."""

    def reset_parameters(self) -> None:
        if _initialise.get():
            super().reset_parameters()


class Linear(nn.Linear):
    """nn.Linear that can pre-pack its weight for fast CPU inference, and hold it as int8.

    A decode step is a matrix-vector product per weight, so speed is set by how the weight is laid out and which
    kernel reads it. `pack()` builds the fastest kernel for its precision (quant.make_kernel: our own kernels.cpp for
    float32 and 16-bit weights at any number of rows, on a copy repacked in panels, and for int8 at one row, on a
    copy repacked in groups of rows; fbgemm int8 for more rows), which keeps the weight laid out as it reads it. The kernel is used
    only without autograd and only while the weight is unchanged (its version counter); state_dict, training and
    every other path see an ordinary nn.Linear. `quantize_int8()` replaces the weight by int8 values and a per-row
    `weight_scale` (quant.quantize_int8); such a layer is for inference only.
    """

    _kernel = None
    _packed_version: tuple | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None)  # set by quantize_int8; a None buffer is not in state_dict

    def reset_parameters(self) -> None:
        if _initialise.get():  # (weights_to_be_loaded)
            super().reset_parameters()

    def pack(self) -> None:
        self._kernel = make_kernel(self.weight, self.bias, self.weight_scale)
        self._packed_version = self._weight_version()

    def quantize_int8(self) -> None:
        if self.weight_scale is not None:
            return
        q, scale = quantize_int8(self.weight)
        del self.weight  # untie (an LM head tied to the embedding gets its own int8 copy)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale
        self._kernel = None

    def _weight_version(self) -> tuple:
        weight = self._parameters["weight"]  # not self.weight: Module.__getattr__ costs ~1 us, twice a call
        return weight._version, weight.data_ptr()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias, plus `residual` when given (the residual stream: the packed kernels add it as they
        store their output, one small op less a sublayer in a decode step)."""
        if self._kernel is not None and not torch.is_grad_enabled() and self._packed_version == self._weight_version():
            return self._kernel(x, residual)
        if self.weight_scale is not None:
            y = int8_linear(x, self.weight, self.weight_scale, self.bias)
        elif self.weight.dtype != x.dtype:  # 16-bit weights with float32 arithmetic (quant.set_precision, CPU)
            y = F.linear(x, self.weight.to(x.dtype), self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        return y if residual is None else residual + y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like Llama does, so bf16 runs match float32 statistics.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm calling torch.layer_norm directly: F.layer_norm's checks and its read of
    torch.backends.cudnn.enabled were ~8% of a GPT-2 decode step's time outside the matrix products here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(length: int, dim: int, layout: str = "interleaved") -> torch.Tensor:
    """The sin/cos table [length, dim] with w_i = 10000^(-2i/dim).

    interleaved (the original Transformer, the tutorial): column 2i is sin(p * w_i), column 2i+1 is cos(p * w_i),
    computed in float32 as the tutorial does. halves (Marian, fairseq): columns 0..dim/2-1 are sin(p * w_i), the rest
    cos(p * w_i), computed in float64 as transformers' Marian does, then rounded.
    """
    dtype = torch.float32 if layout == "interleaved" else torch.float64
    position = torch.arange(length, dtype=dtype).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=dtype) * (-math.log(10000.0) / dim))
    angles = position * inv_freq
    if layout == "interleaved":
        table = torch.zeros(length, dim)
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles)
        return table
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1).float()


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form, as in Llama)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq  # [B, T, head_dim/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, T, head_dim]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads. Self-attention writes its keys and values into the KV cache;
    cross-attention (cross=True) attends to `memory`, the encoder's output, whose keys and values the cache
    projects once per layer and shares between the beams of one source."""

    def __init__(self, config: ModelConfig, layer_index: int, cross: bool = False):
        super().__init__()
        self.layer_index, self.cross = layer_index, cross
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.hidden_head_dim
        self.q_proj = Linear(config.d_model, self.n_heads * self.head_dim, bias=config.bias)
        self.k_proj = Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.last_weights: torch.Tensor | None = None  # filled when record_attention is on
        self._qkv: FusedLinears | None = None
        self._decode_kernel = None  # kernels.cpp's op for a decode step's attention, set by pack
        self._attend_kernel = None  # kernels.cpp's attention without a cache (an encoder's), set by pack
        self._packed_kernel = None  # the same on packed tokens (layers.Unpadded), set by pack
        self._fused_decode_kernel = None  # the same on the fused q/k/v product (self-attention)

    def pack(self) -> None:
        """After the Linears are packed (quant.pack): self-attention's q, k and v as one product (cross-attention's
        k and v, which read the encoder's output), and a decode step's attention through kernels.cpp (see
        forward)."""
        self._qkv = FusedLinears([self.k_proj, self.v_proj] if self.cross else [self.q_proj, self.k_proj, self.v_proj])
        library = kernels.library()  # .default: the op itself; resolving the overload at each call was 13% of a
        # GPT-2 step's time outside the matrix products
        if library is not None:
            self._attend_kernel = library.decode_attention.default
            self._decode_kernel = self._attend_kernel if self.cross else library.cached_decode_attention.default
            if not self.cross and self.n_kv_heads == self.n_heads:
                self._fused_decode_kernel = library.cached_decode_attention_fused.default
                self._packed_kernel = library.packed_attention.default

    def _heads(self, product, n: int, B: int, T: int, unpadded=None):
        """n projections side by side in `product` [B, T or tokens, n x heads x head_dim] -> n views [B, heads, T,
        head_dim] (padding restored first with `unpadded`). One view of a fused product: 3 small ops a layer
        instead of 7 in a decode step."""
        if unpadded is not None:
            product = unpadded.unpack(product)
        return product.view(B, T, n, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, h: torch.Tensor, unpadded=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention's k and v [B, kv_heads, S, head_dim] of the encoder output h [B, S, d_model]; with
        `unpadded` only its real tokens are projected (the padding's keys get zeros, which the mask hides)."""
        B, S, _ = h.shape
        if unpadded is not None:
            h = unpadded.pack(h)
        fused = self._qkv.fused(h) if self._qkv is not None else None
        if fused is not None:
            return self._heads(fused, 2, B, S, unpadded)
        return tuple(self._heads(proj(h), 1, B, S, unpadded)[0] for proj in (self.k_proj, self.v_proj))

    def _fused_qkv(self, x):
        """q, k and v side by side from one product [..., 3 x heads x head_dim], or None (grouped keys, autograd, a
        weight changed)."""
        return self._qkv.fused(x) if self._qkv is not None and self.n_kv_heads == self.n_heads else None

    def _project_qkv(self, x, B: int, T: int, unpadded=None, fused=None):
        """q [B, heads, T, head_dim], k and v [B, kv_heads, T, head_dim] of self-attention (from `fused`, the
        fused product of x, when given)."""
        if fused is not None:
            return self._heads(fused, 3, B, T, unpadded)
        products = self._qkv(x) if self._qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        return tuple(self._heads(p, 1, B, T, unpadded)[0] for p in products)

    def forward(self, x, rope, mask, cache, record_attention: bool = False, memory=None, unpadded=None,
                residual=None):
        """x [B, T, d_model], or the real tokens [N, d_model] of a padded batch when `unpadded` (an Unpadded) is
        given: projections then run on the N tokens, and attention on them too through kernels.cpp (else on the
        padded [B, T] layout). `residual` (shaped like the output) is added to the output."""
        B, T = unpadded.shape if unpadded is not None else x.shape[:2]
        attn_mask, is_causal = mask
        # A decode step (one query a row) on the CPU in float32 runs through kernels.cpp: SDPA's CPU kernel spreads
        # a step's few (row, head) pairs over the threads and waits for them, and writing and viewing the cache
        # from Python costs ~10 small ops a layer. decode_attention reads the keys in place and returns the output
        # projection's input layout.
        kernel = (self._decode_kernel if T == 1 and self._decode_kernel is not None and not record_attention
                  and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() else None)
        if self.cross:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            k, v = cache.cross_kv(self.layer_index, self, memory) if cache is not None else self.project_kv(memory)
            # G decoder rows (beams) per source share its keys: fold them into the query length, [B/G, H, G*T, hd]
            G = B // k.shape[0]
            if G > 1:
                q = q.view(-1, G, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(-1, self.n_heads, G * T,
                                                                                          self.head_dim)
            if kernel is not None:
                return self.o_proj(kernel(q, k, v, attn_mask).view(B, T, -1), residual)
        else:
            fused = self._fused_qkv(x)
            if (fused is not None and kernel is not None and cache is not None and rope is None
                    and self._fused_decode_kernel is not None):  # the views of q, k and v taken in the kernel
                out = cache.attend_fused(self.layer_index, fused, attn_mask, self._fused_decode_kernel)
                return self.o_proj(out.view(B, T, -1), residual)
            if (unpadded is not None and fused is not None and self._packed_kernel is not None and cache is None
                    and rope is None and not is_causal and not record_attention and fused.dtype == torch.float32
                    and fused.device.type == "cpu" and not self.training and not torch.is_grad_enabled()):
                # an encoder's packed tokens attend to their own source's: no padded layout at all
                return self.o_proj(self._packed_kernel(fused, unpadded.starts, self.n_heads), residual)
            q, k, v = self._project_qkv(x, B, T, unpadded, fused)
            G = 1
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                if kernel is not None:
                    return self.o_proj(cache.attend(self.layer_index, q, k, v, attn_mask, kernel).view(B, T, -1),
                                       residual)
                k, v = cache.write(self.layer_index, k, v)
                if k.dtype != q.dtype:  # a 16-bit cache (quant.cache_dtype) under float32 activations
                    k, v = k.to(q.dtype), v.to(q.dtype)
        if record_attention:
            self.last_weights = _unfold(_attention_weights(q, k, attn_mask, is_causal), G, T)
        if (self._attend_kernel is not None and not is_causal and (attn_mask is None or attn_mask.shape[2] == 1)
                and q.dtype == k.dtype == torch.float32 and q.device.type == "cpu" and not self.training
                and not torch.is_grad_enabled()):
            # every query sees the same keys (an encoder's, with its source padding masked): kernels.cpp's
            # attention, already in the output projection's layout. SDPA's CPU kernel took ~0.65 ms a layer for the
            # benchmark's batch of 32 sources of 7-13 tokens (an encoder's 4th largest cost after its matrices)
            out = self._attend_kernel(q, k, v, attn_mask).view(B, T, -1)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads,
                dropout_p=self.dropout if self.training else 0.0)
            out = _unfold(out, G, T).transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out if unpadded is None else unpadded.pack(out), residual)


class Unpadded:
    """The real tokens of a padded batch, valid: bool [B, S], packed into one [tokens, ...] tensor, so that the
    position-wise work of a layer (projections, feed-forward, norms, residuals) skips the padding and only attention
    sees the padded layout (CTranslate2's Padder does the same; kernels.cpp's packed attention not even that). The
    sources of a translation batch differ in length: in the benchmark's batch of 32 sources of 7-13 tokens, 23% of
    the encoder's rows were padding."""

    def __init__(self, valid: torch.Tensor):
        self.shape = valid.shape
        self.index = valid.reshape(-1).nonzero().squeeze(1)
        # where each source's tokens start among the packed ones (and the end): kernels.cpp's packed attention
        self.starts = F.pad(valid.sum(1).cumsum(0), (1, 0))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [tokens, ...]"""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, ...] -> [B, S, ...], zeros at the padding."""
        out = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:])
        return out.index_copy_(0, self.index, x).view(*self.shape, *x.shape[1:])


def _unfold(x: torch.Tensor, G: int, T: int) -> torch.Tensor:
    """[B/G, H, G*T, ...] -> [B, H, T, ...]: undo the folding of G rows into the query length."""
    if G == 1:
        return x
    Bs, H = x.shape[:2]
    return x.view(Bs, H, G, T, *x.shape[3:]).transpose(1, 2).reshape(Bs * G, H, T, *x.shape[3:])


def _attention_weights(q, k, attn_mask, is_causal) -> torch.Tensor:
    """The softmax probabilities SDPA computes, materialised for inspection only."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        T, S = scores.shape[-2:]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1).detach()


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        self.approximate = config.gelu_approximate
        self.up = Linear(config.d_model, config.ff_dim, bias=config.bias)
        if self.kind == "swiglu":
            self.gate = Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.down = Linear(config.ff_dim, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x), residual)
        if self.kind == "relu":
            return self.down(F.relu(self.up(x)), residual)
        if self.kind == "silu":
            return self.down(F.silu(self.up(x)), residual)
        return self.down(F.gelu(self.up(x), approximate=self.approximate), residual)


class Block(nn.Module):
    """A Transformer block: self-attention, cross-attention to the encoder's output (decoder blocks of seq2seq
    models only), feed-forward. Each sublayer is pre-norm, x + f(norm(x)), or post-norm, norm(x + f(x))."""

    def __init__(self, config: ModelConfig, layer_index: int, cross_attention: bool = False):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer_index)
        if cross_attention:
            self.norm_cross = make_norm(config)
            self.cross_attn = Attention(config, layer_index, cross=True)
        else:
            self.cross_attn = None
        self.norm2 = make_norm(config)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)
        self.post_norm = config.norm_position == "post"
        # the block's decode step as kernels.cpp runs it (DecoderLayer) and the most rows it takes, set by pack;
        # the model steps all its blocks' at once (DecodeStack)
        self._decode_layer, self._decode_rows = None, 0

    def pack(self) -> None:
        """After the Linears and the attention are packed: the block's decode step as kernels.cpp runs it
        (DecoderLayer: the same norms, rotations, activations and kernels in the same order, without the Python
        between them), when every part has a kernels.cpp form: LayerNorms or RMSNorms, self-attention through the
        attention kernel on the fused q/k/v product, every matrix on a kernels.cpp kernel."""
        self._decode_layer = None
        library = kernels.library()
        cross = self.cross_attn
        norms = [self.norm1, self.norm_cross if cross is not None else None, self.norm2]
        matrices = [self.attn._qkv.kernel if self.attn._qkv is not None else None, self.attn.o_proj._kernel,
                    cross.q_proj._kernel if cross is not None else None, cross.o_proj._kernel if cross is not None
                    else None, self.mlp.up._kernel, self.mlp.gate._kernel if self.mlp.kind == "swiglu" else None,
                    self.mlp.down._kernel]
        needed = [0, 1, 4, 6] + ([2, 3] if cross is not None else []) + ([5] if self.mlp.kind == "swiglu" else [])
        own = [m.own_matrix() if hasattr(m, "own_matrix") else None for m in matrices]
        kind = type(self.norm1)
        if (library is None or self.attn._decode_kernel is None or any(own[i] is None for i in needed)
                or kind not in (LayerNorm, RMSNorm) or not all(n is None or type(n) is kind for n in norms)):
            return
        activation = {"gelu": "gelu" if self.mlp.approximate == "none" else "gelu_tanh"}.get(self.mlp.kind,
                                                                                           self.mlp.kind)
        layer = torch.classes.tinyformer.DecoderLayer(
            [t for n in norms for t in ((n.weight, getattr(n, "bias", None)) if n is not None else (None, None))],
            [t for m in own for t in (m[0] if m is not None else (None, None, None))],
            self.attn.n_heads, self.attn.n_kv_heads, self.attn.head_dim, self.post_norm, kind is RMSNorm,
            activation, self.norm1.eps, kernels.panel_width(), kernels.int8_vnni(), kernels.amx_bfloat16())
        self._decode_layer = layer
        self._decode_rows = min(own[i][1] for i in needed)

    def forward(self, x, rope, mask, cache=None, record_attention=False, memory=None, memory_mask=(None, False),
                unpadded=None):
        x = self._sublayer(x, self.norm1, self.attn, rope, mask, cache, record_attention, None, unpadded)
        if self.cross_attn is not None:
            x = self._sublayer(x, self.norm_cross, self.cross_attn, None, memory_mask, cache, record_attention,
                               memory, None)
        return self._sublayer(x, self.norm2, self.mlp)

    def _sublayer(self, x, norm, f, *args):
        if self.training and self.dropout.p:
            y = self.dropout(f(x if self.post_norm else norm(x), *args))
            return norm(x + y) if self.post_norm else x + y
        # f adds the residual (its last argument) to its output projection's output, in the kernel when it has one
        if self.post_norm:
            return norm(f(x, *args, x))
        return f(norm(x), *args, x)


class DecodeStack:
    """A decoder's blocks' decode step (one new token a row, with a KV cache) as one kernels.cpp call
    (DecoderStack: each block's DecoderLayer in turn), used while every weight is the one packed, without autograd,
    in float32, up to the rows its kernels take; else the blocks run their Python layers. Same results bit for bit."""

    def __init__(self, blocks):
        self.blocks = blocks
        self.kernel = torch.classes.tinyformer.DecoderStack([b._decode_layer for b in blocks])
        self.step = self.kernel.step
        self.rows = min(b._decode_rows for b in blocks)
        self.cross = [b.cross_attn for b in blocks] if blocks[0].cross_attn is not None else []
        self.linears = [m for b in blocks for m in b.modules() if isinstance(m, Linear)]
        self.versions = [m._weight_version() for m in self.linears]

    def takes(self, blocks, x: torch.Tensor, record_attention: bool, cache) -> bool:
        if not (blocks is self.blocks and x.shape[1] == 1 and x.shape[0] <= self.rows and x.dtype == torch.float32
                and not record_attention and not blocks.training and not torch.is_grad_enabled()):
            return False
        # the weights are checked once a cache (a generation, or a server's running batch), not every step: reading
        # 42 weights' versions took 21 us, ~1% of a batch-1 translation's decoder step
        if cache.checked_stack is not self:
            if self.versions != [m._weight_version() for m in self.linears]:
                return False
            cache.checked_stack = self
        return True


class TransformerModel(nn.Module):
    """What GPT and Seq2Seq share: positions, embedding, initialisation, the decoder pass with its KV cache."""

    config: ModelConfig
    compute_dtype: torch.dtype | None = None  # the activations' dtype when it differs from the weights' (quant)
    cache_dtype: torch.dtype | None = None  # the KV cache's when it differs from the activations' (quant)
    _decode_stack: DecodeStack | None = None  # set by pack

    def _init_positions(self, config: ModelConfig) -> None:
        if config.positional == "learned":
            self.pos_emb = Embedding(config.context_length, config.d_model)
        elif config.positional == "sinusoidal":
            table = sinusoidal_table(config.context_length, config.d_model, config.sinusoidal_layout)
            self.register_buffer("sin_table", table, persistent=False)
        self.rotary = Rotary(config.hidden_head_dim, config.rope_theta) if config.positional == "rope" else None
        self.drop = nn.Dropout(config.dropout)
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embeddings else 1.0

    def _init_weights(self, blocks) -> None:
        """GPT: GPT-2's initialisation, N(0, 0.02), residual projections scaled down by depth so the residual stream
        stays O(1). Seq2seq: the original Transformer's (fairseq's), Xavier-uniform linear weights and N(0, d^-0.5)
        embeddings. Measured on a toy copy task: at N(0, 0.02) an encoder-decoder sat on a plateau for 500+ steps
        (attention stays uniform, so it never finds the alignment); with Xavier it learns it in under 100.
        """
        if not _initialise.get():  # every weight is about to be loaded (weights_to_be_loaded)
            return
        seq2seq = self.config.architecture == "seq2seq"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if seq2seq:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                std = self.config.d_model ** -0.5 if seq2seq and module is not getattr(self, "pos_emb", None) else 0.02
                nn.init.normal_(module.weight, std=std)
        if not seq2seq:
            for block in blocks:
                for proj in (block.attn.o_proj, block.mlp.down):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(blocks)))

    @property
    def absolute_positions(self) -> bool:
        """True when positions are added at the input, so a window that slides must be recomputed, not rolled."""
        return self.config.positional != "rope"

    def pack_for_inference(self):
        """Lay weights out for fast CPU decoding (quant.pack); values, names and shapes are unchanged."""
        return pack(self)

    def pack(self) -> None:
        """After the blocks are packed (quant.pack packs inner modules first): their decode steps as one call, when
        every decoder block has one."""
        blocks = self.decoder_blocks
        ready = len(blocks) > 0 and all(b._decode_layer is not None for b in blocks)
        self._decode_stack = DecodeStack(blocks) if ready else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, embedding: nn.Embedding, input_ids, position_ids):
        """Token embeddings (scaled if configured) plus absolute positions -> (x, rope cos/sin or None)."""
        x = embedding(input_ids)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        rope = None
        if self.config.positional == "learned":
            x = x + self.pos_emb(position_ids)
        elif self.config.positional == "sinusoidal":
            x = x + self.sin_table[position_ids].to(x.dtype)
        else:
            rope = self.rotary(position_ids, x.dtype)
        return self.drop(x), rope

    def run_decoder(self, embedding, blocks, final_norm, input_ids, position_ids=None, attention_mask=None,
                    cache=None, last_only=False, record_attention=False, memory=None, memory_mask=(None, False)):
        """The causal stack over input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only).

        attention_mask [B, T] marks real tokens (1) and padding (0) among the new tokens; with a cache, earlier
        tokens' validity is remembered by the cache. Positions count real tokens only.
        """
        B, T = input_ids.shape
        if cache is not None:
            mask = cache.prepare(T, attention_mask)
            if position_ids is None:
                position_ids = cache.positions(T, attention_mask)
        else:
            mask = _uncached_mask(T, attention_mask, input_ids.device)
            if position_ids is None:
                position_ids = _positions(B, T, attention_mask, input_ids.device)
        if self.absolute_positions and cache is not None and cache.length + T > self.config.context_length:
            raise ValueError(f"position {cache.length + T - 1} is beyond context_length "
                             f"{self.config.context_length}; crop the input or recompute the window")
        if self.absolute_positions and cache is None and T > self.config.context_length:
            raise ValueError(f"input of {T} tokens is longer than context_length {self.config.context_length}")
        x, rope = self.embed(embedding, input_ids, position_ids)
        stack = self._decode_stack
        if cache is not None and stack is not None and stack.takes(blocks, x, record_attention, cache):
            x = cache.decode_stack(stack, x, mask[0], memory, memory_mask[0], rope)
        else:
            for block in blocks:
                x = block(x, rope, mask, cache, record_attention, memory, memory_mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(final_norm(x))


def _positions(B: int, T: int, attention_mask, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(T, device=device).expand(B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _uncached_mask(T: int, attention_mask, device):
    """(attn_mask, is_causal) for SDPA over T tokens with optional key padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None, T > 1
    return padded_causal_mask(attention_mask.bool(), T, 0), False


def padded_causal_mask(key_valid: torch.Tensor, T: int, start: int) -> torch.Tensor:
    """Bool [B, 1, T, S]: query i (absolute slot start+i) sees key j iff j <= start+i and key j is valid.

    A padding query would see nothing and SDPA would return NaN, so every query also sees its own slot.
    """
    S = key_valid.shape[-1]
    device = key_valid.device
    query_slots = torch.arange(start, start + T, device=device).unsqueeze(1)
    key_slots = torch.arange(S, device=device).unsqueeze(0)
    mask = (key_slots <= query_slots) & key_valid[:, None, None, :]
    return mask | (key_slots == query_slots)
