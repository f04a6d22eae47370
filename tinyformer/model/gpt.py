"""Decoder-only GPT: embeddings + positions, N pre-norm blocks, final norm, LM head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import Block, Linear, Rotary, make_norm, sinusoidal_table
from .quant import pack


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.positional == "learned":
            self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        elif config.positional == "sinusoidal":
            self.register_buffer("sin_table", sinusoidal_table(config.context_length, config.d_model), persistent=False)
        self.rotary = Rotary(config.hidden_head_dim, config.rope_theta) if config.positional == "rope" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: scale residual projections by depth so the residual stream stays O(1)
            for proj in (block.attn.o_proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def absolute_positions(self) -> bool:
        """True when positions are added at the input, so a window that slides must be recomputed, not rolled."""
        return self.config.positional != "rope"

    def pack_for_inference(self) -> "GPT":
        """Lay weights out for fast CPU decoding (see layers.Linear); values, names and shapes are unchanged."""
        return pack(self)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, last_only: bool = False,
                record_attention: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only).

        attention_mask [B, T] marks real tokens (1) and padding (0) among the new tokens; with a cache,
        earlier tokens' validity is remembered by the cache. Positions count real tokens only.
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

        x = self.tok_emb(input_ids)
        rope = None
        if self.config.positional == "learned":
            x = x + self.pos_emb(position_ids)
        elif self.config.positional == "sinusoidal":
            x = x + self.sin_table[position_ids].to(x.dtype)
        else:
            rope = self.rotary(position_ids, x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, mask, cache, record_attention)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))


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
