"""The building blocks shared by every architecture: norms, positions, attention, feed-forward, block."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .quant import FusedLinears, int8_linear, make_kernel, quantize_int8


class Linear(nn.Linear):
    """nn.Linear that can pre-pack its weight for fast CPU inference, and hold it as int8.

    A decode step is a matrix-vector product per weight, so speed is set by how the weight is laid out and which
    kernel reads it. `pack()` lays the weight out column-major and builds the fastest kernel for its precision
    (quant.make_kernel: oneDNN pre-packed float32, fbgemm float16 for 16-bit weights, fbgemm int8). The kernel is
    used only without autograd and only while the weight is unchanged (its version counter); state_dict, training
    and every other path see an ordinary nn.Linear. `quantize_int8()` replaces the weight by int8 values and a
    per-row `weight_scale` (quant.quantize_int8); such a layer is for inference only.
    """

    _kernel = None
    _packed_version: tuple | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None)  # set by quantize_int8; a None buffer is not in state_dict

    def pack(self) -> None:
        if self.weight.dtype.is_floating_point:
            with torch.no_grad():
                self.weight.data = self.weight.data.t().contiguous().t()
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
        return self.weight._version, self.weight.data_ptr()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self._kernel is not None and not torch.is_grad_enabled()
                and self._packed_version == self._weight_version()):
            return self._kernel(x)
        if self.weight_scale is not None:
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 like Llama does, so bf16 runs match float32 statistics.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Interleaved sin/cos table [length, dim]: column 2i is sin(p * w_i), column 2i+1 is cos(p * w_i)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table


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
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.hidden_head_dim
        self.q_proj = Linear(config.d_model, self.n_heads * self.head_dim, bias=config.bias)
        self.k_proj = Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.v_proj = Linear(config.d_model, self.n_kv_heads * self.head_dim, bias=config.bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.last_weights: torch.Tensor | None = None  # filled when record_attention is on
        self._qkv: FusedLinears | None = None

    def pack(self) -> None:
        """After the Linears are packed (quant.pack): q, k and v as one product."""
        self._qkv = FusedLinears([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x, rope, mask, cache, record_attention: bool = False):
        B, T, _ = x.shape
        q, k, v = self._qkv(x) if self._qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.write(self.layer_index, k, v)
        attn_mask, is_causal = mask
        if record_attention:
            self.last_weights = _attention_weights(q, k, attn_mask, is_causal)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv_heads != self.n_heads,
            dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.kind == "relu":
            return self.down(F.relu(self.up(x)))
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(config, layer_index)
        self.norm2 = make_norm(config)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, mask, cache=None, record_attention=False):
        x = x + self.dropout(self.attn(self.norm1(x), rope, mask, cache, record_attention))
        return x + self.dropout(self.mlp(self.norm2(x)))
