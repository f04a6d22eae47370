"""Encoder-decoder Transformer (Vaswani et al.; Marian): a bidirectional encoder reads the source, a causal decoder
writes the target with cross-attention to the encoder's output. Built from the same blocks as GPT.

Calls look like GPT's, on the decoder side: `model(decoder_ids, source_ids=..., source_mask=...)` -> logits over the
target vocabulary. With a KV cache, the first call encodes the source and leaves it in the cache (each decoder
layer projects it to cross-attention keys and values once); later calls pass only the new decoder tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .layers import Block, Embedding, Linear, TransformerModel, Unpadded, make_norm


class Seq2Seq(TransformerModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = Embedding(config.vocab_size, config.d_model)  # the target's, and the source's if shared
        self.src_emb = None if config.share_embeddings else Embedding(config.src_vocab_size, config.d_model)
        self._init_positions(config)
        self.encoder = nn.ModuleList(Block(config, i) for i in range(config.encoder_layers))
        self.encoder_norm = make_norm(config) if config.final_norm else nn.Identity()
        self.decoder = nn.ModuleList(Block(config, i, cross_attention=True) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        self._init_weights(list(self.encoder) + list(self.decoder))
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def decoder_blocks(self) -> nn.ModuleList:
        return self.decoder

    @property
    def source_embedding(self) -> nn.Embedding:
        return self.tok_emb if self.src_emb is None else self.src_emb

    def encode(self, source_ids: torch.Tensor, source_mask: torch.Tensor | None = None,
               record_attention: bool = False) -> tuple[torch.Tensor, tuple]:
        """source_ids [B, S] (right-padded; source_mask [B, S] is 1 on real tokens) -> (memory [B, S, D], the
        key mask every cross-attention uses)."""
        B, S = source_ids.shape
        if self.absolute_positions and S > self.config.context_length:
            raise ValueError(f"source of {S} tokens is longer than context_length {self.config.context_length}")
        mask, unpadded = (None, False), None
        if source_mask is not None and not bool(source_mask.all()):
            mask = (source_mask.bool()[:, None, None, :], False)
            if not self.training:  # (dropout draws would change with the packed shape)
                unpadded = Unpadded(source_mask.bool())
        positions = torch.arange(S, device=source_ids.device).expand(B, S)
        x, rope = self.embed(self.source_embedding, source_ids, positions)
        if unpadded is not None:
            x = unpadded.pack(x)
        for block in self.encoder:
            x = block(x, rope, mask, None, record_attention, unpadded=unpadded)
        x = self.encoder_norm(x)
        return (x if unpadded is None else unpadded.unpack(x)), mask

    def forward(self, input_ids: torch.Tensor, source_ids: torch.Tensor | None = None,
                source_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, last_only: bool = False,
                record_attention: bool = False) -> torch.Tensor:
        """Decoder tokens input_ids [B, T] -> logits [B, T, V]. The source is encoded now when given (a cache keeps
        it for the calls that follow), else taken from the cache."""
        if source_ids is not None:
            memory, memory_mask = self.encode(source_ids, source_mask, record_attention)
            if cache is not None:
                cache.set_memory(memory, memory_mask)
        elif cache is not None and cache.memory_mask is not None:
            memory, memory_mask = None, cache.memory_mask  # every layer's keys and values are in the cache
        else:
            raise ValueError("a seq2seq model needs source_ids (or a cache that holds the encoded source)")
        return self.run_decoder(self.tok_emb, self.decoder, self.norm, input_ids, position_ids, attention_mask,
                                cache, last_only, record_attention, memory, memory_mask)
