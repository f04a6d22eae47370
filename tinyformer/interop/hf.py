"""Hugging Face interop: load local GPT-2 / Llama directories into tinyformer's GPT, Marian ones into its Seq2Seq
(interop/marian.py), and export back.

Only local directories are read (never a download), and only data: safetensors files, or pytorch_model.bin through
torch.load(weights_only=True). The weight mapping is written out by hand below, one family at a time.

GPT-2 stores its linear layers as Conv1D, weight [in, out] (the transpose of nn.Linear), and fuses q, k, v into one
`c_attn`. Llama uses nn.Linear layouts and the same rotate-half RoPE as tinyformer, so its weights map one to one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import (CheckpointError, load_state_into, load_weights, read_json_object, safe_torch_load,
                          standalone)
from ..model import GPT, ConfigError, ModelConfig, weights_to_be_loaded
from ..model.quant import require_float
from ..tokenizers import HFTokenizer

ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"), "llama": ("LlamaForCausalLM", "LlamaModel")}
GPT2_ACTIVATIONS = {"gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_fast": ("gelu", "tanh"),
                    "gelu": ("gelu", "none"), "relu": ("relu", "tanh")}


# ----------------------------------------------------------------------------------------------------------- loading

def load_hf(path, device="cpu"):
    """(model in eval mode on device, tokenizer or None, config dict, source tokenizer or None) from a local
    Hugging Face directory (the source tokenizer is a seq2seq model's own; None for GPT-2/Llama)."""
    path = Path(path)
    hf = read_json_object(path / "config.json")
    model_type = hf.get("model_type")
    if model_type == "marian":
        from .marian import load_marian

        return load_marian(path, hf, device)
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported model_type {model_type!r} (architectures "
                              f"{hf.get('architectures')}); tinyformer loads gpt2, llama and marian")
    unknown = [a for a in hf.get("architectures") or [] if a not in ARCHITECTURES[model_type]]
    if unknown:
        raise CheckpointError(f"{path}: unsupported architecture {unknown[0]}; tinyformer loads "
                              f"{' or '.join(ARCHITECTURES[model_type])}")
    try:
        config = _gpt2_config(hf) if model_type == "gpt2" else _llama_config(hf)
    except ConfigError as error:
        raise CheckpointError(f"{path}/config.json cannot be represented: {error}") from None
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path}/config.json is missing or has a bad value for {error}") from None
    weights = _Weights(read_hf_weights(path), str(path))
    state = _from_gpt2(weights, config) if model_type == "gpt2" else _from_llama(weights, config, hf)
    weights.finish()
    with weights_to_be_loaded():  # every weight is loaded next
        model = GPT(config)
    load_state_into(model, state, path)
    info = {"format": "hf", "model_type": model_type, "model": config.to_dict(), "source": str(path)}
    return model.to(device).eval(), _hf_tokenizer(path, hf), info, None


def _gpt2_config(hf: dict) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ConfigError(f"activation_function {act!r} is not supported (use one of {', '.join(GPT2_ACTIVATIONS)})")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("only the standard 1/sqrt(head_dim) attention scale is supported "
                          "(scale_attn_weights must be true, scale_attn_by_inverse_layer_idx false)")
    if hf.get("add_cross_attention", False):
        raise ConfigError("add_cross_attention is not supported")
    mlp, approximate = GPT2_ACTIVATIONS[act]
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["n_embd"], n_layers=hf["n_layer"],
                       n_heads=hf["n_head"], d_ff=hf.get("n_inner"), context_length=hf["n_positions"],
                       dropout=hf.get("resid_pdrop", 0.0), positional="learned", norm="layernorm",
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=mlp, gelu_approximate=approximate,
                       bias=True, lm_head_bias=False, tie_embeddings=hf.get("tie_word_embeddings", True))


def _rope_theta(hf: dict) -> float:
    """RoPE base, refusing any scaling: transformers 5 keeps it in rope_parameters, older configs at the top level."""
    theta = hf.get("rope_theta", 10000.0)
    for key in ("rope_parameters", "rope_scaling"):
        params = hf.get(key)
        if not params:
            continue
        if not isinstance(params, dict):
            raise ConfigError(f"{key} {params!r} is not a dict")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise ConfigError(f"{key} rope_type {kind!r} is not supported (only default RoPE without scaling)")
        theta = params.get("rope_theta", theta)
    return float(theta)


def _llama_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (Llama's SwiGLU needs silu)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim and head_dim * heads != hf["hidden_size"] else None,
        d_ff=hf["intermediate_size"], context_length=hf.get("max_position_embeddings", 2048), dropout=0.0,
        positional="rope", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        # One `bias` flag covers every linear layer in a block; if only attention or only the MLP has biases in
        # the file, the other side gets zero biases (exactly equivalent). RMSNorm has no bias either way.
        bias=bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False)), lm_head_bias=False,
        tie_embeddings=hf.get("tie_word_embeddings", False), rope_theta=_rope_theta(hf))


def read_hf_weights(directory) -> dict[str, torch.Tensor]:
    """All tensors of a HF directory: model.safetensors, sharded safetensors (index.json) or pytorch_model.bin."""
    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        return load_weights(directory / "model.safetensors")[0]
    for index_name, read in (("model.safetensors.index.json", lambda p: load_weights(p)[0]),
                             ("pytorch_model.bin.index.json", _torch_load)):
        if (directory / index_name).is_file():
            weight_map = read_json_object(directory / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{directory / index_name} has no weight_map")
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(read(directory / shard))
            return state
    if (directory / "pytorch_model.bin").is_file():
        return _torch_load(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory}: no weights found (model.safetensors, model.safetensors.index.json "
                          f"or pytorch_model.bin)")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    state = safe_torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


class _Weights:
    """The file's tensors, handed out by name with a shape check; whatever is left over at the end is an error."""

    IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # old non-persistent buffers

    def __init__(self, state: dict[str, torch.Tensor], source: str):
        self.state, self.source = dict(state), source

    def take(self, name: str, shape: tuple) -> torch.Tensor:
        if name not in self.state:
            raise CheckpointError(f"{self.source}: missing weight {name}")
        tensor = self.state.pop(name)
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: weight {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(shape)}")
        return tensor.float()

    def drop(self, name: str) -> None:
        self.state.pop(name, None)

    def finish(self) -> None:
        left = sorted(k for k in self.state if not k.endswith(self.IGNORED))
        if left:
            raise CheckpointError(f"{self.source}: unexpected weight(s) {', '.join(left[:5])}"
                                  f"{' ...' if len(left) > 5 else ''}")


def _prefix(weights: _Weights, prefix: str) -> str:
    """GPT2LMHeadModel saves `transformer.h.0...`, a bare GPT2Model `h.0...` (same for Llama's `model.`)."""
    return prefix if any(k.startswith(prefix) for k in weights.state) else ""


def _from_gpt2(w: _Weights, c: ModelConfig) -> dict[str, torch.Tensor]:
    p, D, F = _prefix(w, "transformer."), c.d_model, c.ff_dim
    s = {"tok_emb.weight": w.take(p + "wte.weight", (c.vocab_size, D)),
         "pos_emb.weight": w.take(p + "wpe.weight", (c.context_length, D))}
    for i in range(c.n_layers):
        h, b = f"{p}h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            s[b + ours + ".weight"] = w.take(h + theirs + ".weight", (D,))
            s[b + ours + ".bias"] = w.take(h + theirs + ".bias", (D,))
        # Conv1D weight is [in, out]: transpose to nn.Linear's [out, in]; c_attn's outputs are q | k | v.
        qkv_w = w.take(h + "attn.c_attn.weight", (D, 3 * D)).t()
        qkv_b = w.take(h + "attn.c_attn.bias", (3 * D,))
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            s[f"{b}attn.{name}.weight"] = qkv_w[j * D:(j + 1) * D].contiguous()
            s[f"{b}attn.{name}.bias"] = qkv_b[j * D:(j + 1) * D].contiguous()
        for ours, theirs, shape in (("attn.o_proj", "attn.c_proj", (D, D)), ("mlp.up", "mlp.c_fc", (D, F)),
                                    ("mlp.down", "mlp.c_proj", (F, D))):
            s[f"{b}{ours}.weight"] = w.take(f"{h}{theirs}.weight", shape).t().contiguous()
            s[f"{b}{ours}.bias"] = w.take(f"{h}{theirs}.bias", shape[1:])
    s["norm.weight"] = w.take(p + "ln_f.weight", (D,))
    s["norm.bias"] = w.take(p + "ln_f.bias", (D,))
    _lm_head(w, c, s)
    return s


def _from_llama(w: _Weights, c: ModelConfig, hf: dict) -> dict[str, torch.Tensor]:
    p, D, F = _prefix(w, "model."), c.d_model, c.ff_dim
    q_dim, kv_dim = c.n_heads * c.hidden_head_dim, c.kv_heads * c.hidden_head_dim
    s = {"tok_emb.weight": w.take(p + "embed_tokens.weight", (c.vocab_size, D))}
    linears = {"attn": (hf.get("attention_bias", False), [("q_proj", "self_attn.q_proj", q_dim, D),
                                                          ("k_proj", "self_attn.k_proj", kv_dim, D),
                                                          ("v_proj", "self_attn.v_proj", kv_dim, D),
                                                          ("o_proj", "self_attn.o_proj", D, q_dim)]),
               "mlp": (hf.get("mlp_bias", False), [("up", "mlp.up_proj", F, D), ("gate", "mlp.gate_proj", F, D),
                                                   ("down", "mlp.down_proj", D, F)])}
    for i in range(c.n_layers):
        h, b = f"{p}layers.{i}.", f"blocks.{i}."
        s[b + "norm1.weight"] = w.take(h + "input_layernorm.weight", (D,))
        s[b + "norm2.weight"] = w.take(h + "post_attention_layernorm.weight", (D,))
        for module, (has_bias, layers) in linears.items():
            for ours, theirs, out_dim, in_dim in layers:
                s[f"{b}{module}.{ours}.weight"] = w.take(f"{h}{theirs}.weight", (out_dim, in_dim))
                if has_bias:
                    s[f"{b}{module}.{ours}.bias"] = w.take(f"{h}{theirs}.bias", (out_dim,))
                elif c.bias:  # the other side has biases, so ours exists: zero is exactly "no bias"
                    s[f"{b}{module}.{ours}.bias"] = torch.zeros(out_dim)
    s["norm.weight"] = w.take(p + "norm.weight", (D,))
    _lm_head(w, c, s)
    return s


def _lm_head(w: _Weights, c: ModelConfig, s: dict) -> None:
    if c.tie_embeddings:
        w.drop("lm_head.weight")  # a tied head is the embedding; some files store a copy anyway
    else:
        s["lm_head.weight"] = w.take("lm_head.weight", (c.vocab_size, c.d_model))


def _hf_tokenizer(path: Path, hf: dict):
    """The directory's tokenizer.json with its bos/eos/pad names, or None when there is none."""
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(file))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise CheckpointError(f"{file} cannot be read: {error}") from None
    names = {}
    for role in ("bos", "eos", "pad"):  # lowest priority first: config ids, special_tokens_map, tokenizer_config
        token_id = hf.get(f"{role}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if isinstance(token_id, int):
            names[role] = tok.id_to_token(token_id)
    for extra in ("special_tokens_map.json", "tokenizer_config.json"):
        data = read_json_object(path / extra) if (path / extra).is_file() else {}
        for role in ("bos", "eos", "pad"):
            value = data.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[role] = value
    return HFTokenizer(tok, "hf", names.get("bos"), names.get("eos"), names.get("pad"))


# ----------------------------------------------------------------------------------------------------------- export

def hf_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama', or a CheckpointError naming the setting that has no Hugging Face equivalent."""
    c = config
    if c.positional == "sinusoidal":
        problems = [("positional 'sinusoidal'", "has no Hugging Face equivalent (GPT-2 uses learned, Llama rope)")]
    elif c.positional == "learned":  # GPT-2
        problems = [(f"norm {c.norm!r}", "with learned positions has no equivalent (GPT-2 uses layernorm)")
                    if c.norm != "layernorm" else None,
                    (f"mlp {c.mlp!r}", "with learned positions has no equivalent (GPT-2 uses gelu or relu)")
                    if c.mlp not in ("gelu", "relu") else None,
                    ("bias=False", "has no equivalent in GPT-2 (every GPT-2 layer has biases)") if not c.bias else None,
                    (f"n_kv_heads {c.kv_heads}", "has no equivalent in GPT-2 (no grouped-query attention)")
                    if c.kv_heads != c.n_heads else None,
                    (f"head_dim {c.head_dim}", "has no equivalent in GPT-2 (its head size is d_model / n_heads)")
                    if c.hidden_head_dim * c.n_heads != c.d_model else None]
    else:  # rope: Llama
        problems = [(f"norm {c.norm!r}", "with rope has no equivalent (Llama uses rmsnorm)")
                    if c.norm != "rmsnorm" else None,
                    (f"mlp {c.mlp!r}", "with rope has no equivalent (Llama uses swiglu)")
                    if c.mlp != "swiglu" else None,
                    (f"n_heads {c.n_heads}", f"does not divide d_model {c.d_model}, which transformers' Llama requires")
                    if c.d_model % c.n_heads else None]
    if c.lm_head_bias:
        problems.append(("lm_head_bias=True", "has no equivalent in GPT-2 or Llama"))
    problems = [p for p in problems if p]
    if problems:
        setting, why = problems[0]
        raise CheckpointError(f"cannot export to Hugging Face: {setting} {why}")
    return "gpt2" if c.positional == "learned" else "llama"


def export_hf(model, tokenizer, out_dir, source_tokenizer=None, generation: dict | None = None) -> list[str]:
    """Write config.json + model.safetensors (+ tokenizer files) that transformers' AutoModelForCausalLM loads (a
    seq2seq model: MarianMTModel; `source_tokenizer` and the `generation` defaults go with it).

    Returns notes about what could not be written (e.g. a tiktoken tokenizer has no tokenizer.json).
    """
    from ..checkpoint import is_checkpoint

    require_float(model, "Hugging Face export")
    c = model.config
    out_dir = Path(out_dir)
    if is_checkpoint(out_dir):
        raise CheckpointError(f"{out_dir} holds a tinyformer checkpoint; export to another directory")
    if c.architecture == "seq2seq":
        from .marian import export_marian

        writers, notes = export_marian(model, tokenizer, source_tokenizer or tokenizer, out_dir, generation)
        _write_atomically(out_dir, writers)
        return notes
    family = hf_family(c)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = next(iter(state.values())).dtype
    hf_config, tensors = (_to_gpt2 if family == "gpt2" else _to_llama)(c, state)
    notes = []
    ids = {}  # written even when None, or transformers fills in GPT-2's 50256 and warns it is out of range
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id", None)
        ids[f"{role}_token_id"] = token_id if token_id is not None and 0 <= token_id < c.vocab_size else None
    hf_config.update(ids, dtype=str(dtype).removeprefix("torch."), tie_word_embeddings=c.tie_embeddings,
                     use_cache=True)
    tensors = {k: standalone(v) for k, v in tensors.items()}

    writers = {"model.safetensors": lambda p: save_file(tensors, str(p), metadata={"format": "pt"})}
    if isinstance(tokenizer, HFTokenizer):
        names = {role: tokenizer.tok.id_to_token(getattr(tokenizer, f"{role}_id")) for role in ("bos", "eos", "pad")}
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.context_length,
                      **{f"{role}_token": name for role, name in names.items() if name is not None}}
        writers["tokenizer.json"] = lambda p: tokenizer.tok.save(str(p))
        writers["tokenizer_config.json"] = lambda p: _write_json(p, tok_config)
    elif tokenizer is not None:
        notes.append(f"tokenizer {tokenizer.spec!r} has no Hugging Face tokenizer.json; none written "
                     f"(token ids are unchanged; encode text with tinyformer's tokenizer)")
    else:
        notes.append("no tokenizer given; none written")
    writers["config.json"] = lambda p: _write_json(p, hf_config)  # last: a directory with config.json is complete
    _write_atomically(out_dir, writers)
    return notes


def _to_gpt2(c: ModelConfig, s: dict) -> tuple[dict, dict]:
    t = {"transformer.wte.weight": s["tok_emb.weight"], "transformer.wpe.weight": s["pos_emb.weight"]}
    for i in range(c.n_layers):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            t[h + theirs + ".weight"], t[h + theirs + ".bias"] = s[b + ours + ".weight"], s[b + ours + ".bias"]
        qkv = [f"{b}attn.{n}_proj" for n in "qkv"]
        t[h + "attn.c_attn.weight"] = torch.cat([s[n + ".weight"] for n in qkv]).t()  # Conv1D: [in, out]
        t[h + "attn.c_attn.bias"] = torch.cat([s[n + ".bias"] for n in qkv])
        for ours, theirs in (("attn.o_proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            t[f"{h}{theirs}.weight"] = s[f"{b}{ours}.weight"].t()
            t[f"{h}{theirs}.bias"] = s[f"{b}{ours}.bias"]
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = s["norm.weight"], s["norm.bias"]
    if not c.tie_embeddings:
        t["lm_head.weight"] = s["lm_head.weight"]
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.context_length, "n_embd": c.d_model, "n_layer": c.n_layers, "n_head": c.n_heads,
              "n_inner": c.ff_dim, "layer_norm_epsilon": c.norm_eps,
              "activation_function": "relu" if c.mlp == "relu" else
              ("gelu_new" if c.gelu_approximate == "tanh" else "gelu"),
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout}
    return config, t


def _to_llama(c: ModelConfig, s: dict) -> tuple[dict, dict]:
    t = {"model.embed_tokens.weight": s["tok_emb.weight"], "model.norm.weight": s["norm.weight"]}
    names = {"norm1": "input_layernorm", "norm2": "post_attention_layernorm", "attn.q_proj": "self_attn.q_proj",
             "attn.k_proj": "self_attn.k_proj", "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
             "mlp.up": "mlp.up_proj", "mlp.gate": "mlp.gate_proj", "mlp.down": "mlp.down_proj"}
    for name, tensor in s.items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            t[f"model.layers.{i}.{names[module]}.{kind}"] = tensor
    if not c.tie_embeddings:
        t["lm_head.weight"] = s["lm_head.weight"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": c.d_model, "intermediate_size": c.ff_dim, "num_hidden_layers": c.n_layers,
              "num_attention_heads": c.n_heads, "num_key_value_heads": c.kv_heads, "head_dim": c.hidden_head_dim,
              "hidden_act": "silu", "max_position_embeddings": c.context_length, "rms_norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta,  # where transformers 4.x reads it; 5.x reads rope_parameters
              "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
              "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": c.dropout}
    return config, t


def _write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_atomically(out_dir: Path, writers: dict) -> None:
    """Write every file into a sibling temp directory, then rename it into place (file by file, config.json last,
    when out_dir already exists). A crash leaves either the old directory or a complete new one, never a mix."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, write in writers.items():
            write(tmp / name)
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return
        for name in writers:  # dict order: config.json was added last
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
