"""Decoder-only GPT: embeddings + positions, N blocks, final norm, LM head."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import Block, Embedding, Linear, TransformerModel, make_norm


class GPT(TransformerModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = Embedding(config.vocab_size, config.d_model)
        self._init_positions(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        self._init_weights(self.blocks)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def decoder_blocks(self) -> nn.ModuleList:
        return self.blocks

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, last_only: bool = False,
                record_attention: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ([B, 1, V] with last_only); see run_decoder."""
        return self.run_decoder(self.tok_emb, self.blocks, self.norm, input_ids, position_ids, attention_mask,
                                cache, last_only, record_attention)
