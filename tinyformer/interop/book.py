"""The Transformer-from-scratch tutorial's `model.ckpt` (see shared/formats/book-checkpoint.md), loaded unchanged.

The tutorial's model is a plain pre-norm GPT: interleaved sinusoidal positions, LayerNorm (eps 1e-5), per-head
q/k/v linears without bias, ReLU MLP of width 4D, untied LM head with bias. tinyformer's `book` preset is the same
network; the only work is renaming weights and stacking the per-head matrices.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_state_into, safe_torch_load
from ..model import GPT, ConfigError, ModelConfig, weights_to_be_loaded
from ..tokenizers import TiktokenTokenizer

# Token ids >= V (cl100k ids above the tutorial text's largest) are refused by tinyformer.generation's
# check_token_ids before the model sees them; GPT.forward itself does not check.
SHAPING = ("d_model", "num_heads", "num_blocks", "context_length", "max_token_value", "dropout")


def load_book(path, device="cpu"):
    """(model in eval mode on device, cl100k_base tokenizer, config dict) from the tutorial's .ckpt file."""
    path = Path(path)
    data = safe_torch_load(path)
    if not isinstance(data, dict) or set(data) != {"model_state_dict", "h_params"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a tutorial checkpoint: expected exactly the keys h_params and "
                              f"model_state_dict, found {keys}")
    h, state = data["h_params"], data["model_state_dict"]
    if not isinstance(h, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: h_params and model_state_dict must both be dicts")
    missing = [k for k in SHAPING if k not in h]
    if missing:
        raise CheckpointError(f"{path}: h_params lacks {', '.join(missing)}")
    try:
        config = ModelConfig(vocab_size=h["max_token_value"], d_model=h["d_model"], n_layers=h["num_blocks"],
                             n_heads=h["num_heads"], context_length=h["context_length"], dropout=h["dropout"],
                             positional="sinusoidal", norm="layernorm", norm_eps=1e-5, mlp="relu", d_ff=None,
                             bias=True, lm_head_bias=True, tie_embeddings=False)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{path}: h_params cannot build a model: {error}") from None
    with weights_to_be_loaded():  # every weight is loaded next
        model = GPT(config)
    load_state_into(model, book_to_tinyformer(state, config, path), path)
    info = {"format": "book", "model": config.to_dict(), "source": str(path), "h_params": dict(h)}
    return model.to(device).eval(), TiktokenTokenizer("cl100k_base"), info


def book_to_tinyformer(state: dict, config: ModelConfig, source) -> dict[str, torch.Tensor]:
    """Rename the tutorial's weights to tinyformer's; anything missing or left over is an error naming it."""
    state = {k: v for k, v in state.items() if not k.endswith(".mask")}  # causal-mask buffers: recomputed by us

    def take(name):
        if name not in state:
            raise CheckpointError(f"{source}: missing weight {name}")
        return state.pop(name).float()

    N, H, D = config.n_layers, config.n_heads, config.d_model
    out = {"tok_emb.weight": take("token_embedding_lookup_table.weight")}
    for b in range(N):
        src, dst = f"transformer_blocks.{b}.", f"blocks.{b}."
        for ours, theirs in (("norm1", "ln1"), ("norm2", "ln2"), ("attn.o_proj", "mha.projection_layer"),
                             ("mlp.up", "ffn.ffn.0"), ("mlp.down", "ffn.ffn.2")):
            out[f"{dst}{ours}.weight"] = take(f"{src}{theirs}.weight")
            out[f"{dst}{ours}.bias"] = take(f"{src}{theirs}.bias")
        for proj in "qkv":
            # Head h's rows become rows h*hs..(h+1)*hs-1: the order in which the tutorial concatenates outputs.
            out[f"{dst}attn.{proj}_proj.weight"] = torch.cat(
                [take(f"{src}mha.heads.{h}.W{proj}.weight") for h in range(H)])
            # The tutorial's q/k/v have no bias but our `bias=True` gives them one (it also covers the norms and
            # the other linears, which do have biases): zero is exactly "no bias".
            out[f"{dst}attn.{proj}_proj.bias"] = torch.zeros(D)
    out["norm.weight"] = take(f"transformer_blocks.{N}.weight")
    out["norm.bias"] = take(f"transformer_blocks.{N}.bias")
    out["lm_head.weight"] = take("model_out_linear_layer.weight")
    out["lm_head.bias"] = take("model_out_linear_layer.bias")
    if state:
        left = sorted(state)
        raise CheckpointError(f"{source}: unexpected weight(s) {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}"
                              f" for num_blocks={N}, num_heads={H}")
    return out  # shapes are checked by load_state_into, naming our weight and both shapes
