"""GGUF export (llama.cpp, ollama, LM Studio), written with the llama.cpp project's own `gguf` package.

GPT-2-style models (learned positions, LayerNorm, tanh-GELU, biases) become llama.cpp's `gpt2` architecture, whose
attention takes q, k and v as one fused `attn_qkv` matrix; Llama-style models (RoPE, RMSNorm, SwiGLU) its `llama`
architecture. llama.cpp rotates pairs of adjacent dimensions where we (like Hugging Face) rotate the two halves of
each head, so q and k rows are permuted within each head, the permutation llama.cpp's convert_hf_to_gguf.py applies.

Tensors keep their layout: a [out, in] torch matrix is written as is (GGUF lists dimensions innermost first).
`quantize` picks the matrices' type: f32, f16 or q8_0 (blocks of 32 int8 values sharing one float16 scale);
norms and biases stay f32, as llama.cpp's converter does. A matrix whose rows are not a multiple of 32 is written
as f16 under q8_0 (the converter's fallback too).

The tokenizer is included when GGUF's byte-level BPE ("gpt2" tokenizer model) can hold it: a Hugging Face
byte-level BPE (our `bpe:N`, GPT-2's) with its merges, or our `char` tokenizer (one token per character; a merge
chain rebuilds each multi-byte character from its bytes). Anything else is written without one and said so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import CheckpointError
from ..model.quant import require_float

QUANTIZE = ("f32", "f16", "q8_0")


def gguf_family(config) -> str:
    """'gpt2' or 'llama', or a CheckpointError naming the setting llama.cpp's architectures cannot express."""
    c = config
    if getattr(c, "architecture", "gpt") != "gpt":
        raise CheckpointError(f"GGUF export: architecture {c.architecture!r} is not supported (decoder-only GPT "
                              f"and Llama models are)")
    gpt2 = dict(positional="learned", norm="layernorm", mlp="gelu", gelu_approximate="tanh", bias=True,
                lm_head_bias=False)
    llama = dict(positional="rope", norm="rmsnorm", mlp="swiglu", bias=False, lm_head_bias=False)
    for family, needs in (("gpt2", gpt2), ("llama", llama)):
        if c.positional == needs["positional"]:
            wrong = [f"{k}={getattr(c, k)!r}" for k, v in needs.items() if getattr(c, k) != v]
            if family == "gpt2" and c.kv_heads != c.n_heads:
                wrong.append(f"n_kv_heads={c.kv_heads}")
            if family == "gpt2" and c.hidden_head_dim * c.n_heads != c.d_model:
                wrong.append(f"head_dim={c.head_dim}")
            if wrong:
                raise CheckpointError(f"GGUF export: a {family}-style model needs "
                                      f"{', '.join(f'{k}={v!r}' for k, v in needs.items())}; this one has "
                                      f"{', '.join(wrong)}")
            return family
    raise CheckpointError(f"GGUF export: positional {c.positional!r} has no llama.cpp architecture "
                          f"(learned -> gpt2, rope -> llama)")


def _rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (d, d + h/2 paired) to llama.cpp's adjacent pairs (2i, 2i+1)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """Our state dict under llama.cpp's tensor names (float32, before quantization)."""
    c = model.config
    family = gguf_family(c)
    s = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    t = {"token_embd.weight": s["tok_emb.weight"], "output_norm.weight": s["norm.weight"]}
    if family == "gpt2":
        t["position_embd.weight"] = s["pos_emb.weight"]
        t["output_norm.bias"] = s["norm.bias"]
    if not c.tie_embeddings:
        t["output.weight"] = s["lm_head.weight"]
    for i in range(c.n_layers):
        b, g = f"blocks.{i}.", f"blk.{i}."
        if family == "gpt2":
            for kind in ("weight", "bias"):
                t[f"{g}attn_norm.{kind}"] = s[f"{b}norm1.{kind}"]
                t[f"{g}ffn_norm.{kind}"] = s[f"{b}norm2.{kind}"]
                t[f"{g}attn_qkv.{kind}"] = torch.cat([s[f"{b}attn.{p}_proj.{kind}"] for p in "qkv"])
                for ours, theirs in (("attn.o_proj", "attn_output"), ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
                    t[f"{g}{theirs}.{kind}"] = s[f"{b}{ours}.{kind}"]
        else:
            t[f"{g}attn_norm.weight"] = s[f"{b}norm1.weight"]
            t[f"{g}ffn_norm.weight"] = s[f"{b}norm2.weight"]
            t[f"{g}attn_q.weight"] = _rope_permute(s[f"{b}attn.q_proj.weight"], c.n_heads)
            t[f"{g}attn_k.weight"] = _rope_permute(s[f"{b}attn.k_proj.weight"], c.kv_heads)
            for ours, theirs in (("attn.v_proj", "attn_v"), ("attn.o_proj", "attn_output"), ("mlp.gate", "ffn_gate"),
                                 ("mlp.up", "ffn_up"), ("mlp.down", "ffn_down")):
                t[f"{g}{theirs}.weight"] = s[f"{b}{ours}.weight"]
    return t


def _add_metadata(writer, c, family: str, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(c.context_length)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.ff_dim)
    writer.add_head_count(c.n_heads)
    writer.add_vocab_size(c.vocab_size)
    if family == "gpt2":
        writer.add_layer_norm_eps(c.norm_eps)
    else:
        writer.add_head_count_kv(c.kv_heads)
        writer.add_layer_norm_rms_eps(c.norm_eps)
        writer.add_rope_dimension_count(c.hidden_head_dim)
        writer.add_rope_freq_base(c.rope_theta)
        writer.add_key_length(c.hidden_head_dim)
        writer.add_value_length(c.hidden_head_dim)


def _byte_level(data: bytes) -> str:
    from ..tokenizers import _BYTE_DECODER

    encoder = {b: ch for ch, b in _BYTE_DECODER.items()}
    return "".join(encoder[b] for b in data)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> str | None:
    """Write the tokenizer as GGUF byte-level BPE; return a note when it cannot be."""
    import gguf

    from ..tokenizers import CharTokenizer, HFTokenizer

    if tokenizer is None:
        writer.add_tokenizer_model("none")
        return "no tokenizer given; the GGUF file has none (llama.cpp takes token ids)"
    special = tokenizer.special_ids
    if isinstance(tokenizer, HFTokenizer):
        spec = json.loads(tokenizer.tok.to_str())
        model, pre = spec.get("model") or {}, json.dumps(spec.get("pre_tokenizer"))
        if model.get("type") != "BPE" or "ByteLevel" not in pre:
            writer.add_tokenizer_model("none")
            return (f"tokenizer {tokenizer.spec!r} is not byte-level BPE; the GGUF file has none "
                    f"(llama.cpp takes token ids)")
        tokens = [tokenizer.tok.id_to_token(i) for i in range(vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    elif isinstance(tokenizer, CharTokenizer):
        tokens, merges = [], []
        for i in range(vocab_size):
            data = tokenizer.decode([i]).encode("utf-8") if i not in special else None
            if data is None:  # a special token: its name, never produced from text
                tokens.append(tokenizer.decode([i], skip_special=False) or f"<special{i}>")
                continue
            pieces = [_byte_level(data[:1])]
            for byte in data[1:]:  # a multi-byte character: merge its bytes left to right
                merges.append(f"{pieces[-1]} {_byte_level(bytes([byte]))}")
                pieces.append(pieces[-1] + _byte_level(bytes([byte])))
            tokens.append(_byte_level(data))
        merges = list(dict.fromkeys(merges))
        if _byte_level(b"\n") not in tokens:  # llama.cpp looks the newline token up at load time
            return _no_tokenizer(writer, tokenizer, "has no newline token, which llama.cpp requires")
    else:
        return _no_tokenizer(writer, tokenizer, "cannot be written as GGUF byte-level BPE")
    if any(t is None for t in tokens) or len(set(tokens)) != len(tokens):
        return _no_tokenizer(writer, tokenizer, "does not name every id exactly once")
    # llama.cpp refuses a BPE vocabulary without merges (an ASCII-only char vocabulary, a placeholder vocabulary):
    # it gets one whose result is no token; llama.cpp spells a merged piece it cannot find byte by byte, so it
    # changes nothing.
    merges = merges or [f"{_byte_level(b'{')} {_byte_level(b'}')}"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(vocab_size)])
    writer.add_token_merges(merges)
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{role}_id", None)
        if token_id is not None and 0 <= token_id < vocab_size:
            add(token_id)
    writer.add_add_bos_token(False)  # our encode() decides; llama.cpp must not add another
    return None


def _no_tokenizer(writer, tokenizer, why: str) -> str:
    writer.add_tokenizer_model("none")
    return f"tokenizer {tokenizer.spec!r} {why}; the GGUF file has none (llama.cpp takes token ids)"


def export_gguf(model, tokenizer, path, quantize: str = "f32") -> list[str]:
    """Write `model` (GPT-2- or Llama-style, float weights) and its tokenizer to one GGUF file at `path`.

    quantize: "f32", "f16" or "q8_0" for the weight matrices. Returns notes (e.g. a tokenizer left out). The file
    is written to a temporary name and renamed into place.
    """
    import gguf

    if quantize not in QUANTIZE:
        raise CheckpointError(f"GGUF export: quantize {quantize!r} is not one of {', '.join(QUANTIZE)}")
    require_float(model, "GGUF export")
    c = model.config
    family = gguf_family(c)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quantize]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    notes = []
    try:
        writer = gguf.GGUFWriter(str(tmp), family)
        _add_metadata(writer, c, family, path.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        note = _add_tokenizer(writer, tokenizer, c.vocab_size)
        if note:
            notes.append(note)
        for name, tensor in gguf_tensors(model).items():
            data = tensor.numpy()
            if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, data.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return notes
