"""Hugging Face Marian (opus-mt) interop: a local `MarianMTModel` directory into tinyformer's Seq2Seq, and back.

Marian is the original post-norm Transformer: no final layer norms, embeddings scaled by sqrt(d_model) (when
scale_embedding), sinusoidal positions with all sines before all cosines (our `sinusoidal_layout="halves"`), an
output layer tied to the target embedding plus `final_logits_bias`, and the decoder starting from
`decoder_start_token_id` (<pad> in opus-mt). transformers' generation bans the tokens of single-token
`bad_words_ids` (opus-mt configs ban <pad>) and forces `forced_eos_token_id` at the last allowed step; the loaded
model carries both as generation defaults so our tokens are transformers' tokens.

Tokenizers: `source.spm` / `target.spm` + `vocab.json` (+ `target_vocab.json` with separate vocabularies) through
sentencepiece, or a `tokenizer.json` when the directory has one (for both sides).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import CheckpointError, load_state_into, read_json_object, standalone
from ..model import ConfigError, ModelConfig, weights_to_be_loaded
from ..model.seq2seq import Seq2Seq
from ..tokenizers import HFTokenizer, SentencePieceTokenizer, TokenizerError

ARCHITECTURES = ("MarianMTModel", "MarianModel")
ACTIVATIONS = {"swish": ("silu", "tanh"), "silu": ("silu", "tanh"), "relu": ("relu", "tanh"),
               "gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh")}
LAYER_NORM_EPS = 1e-5  # transformers' Marian uses nn.LayerNorm's default
# per block: (ours, theirs) sublayers; attention projections are q/k/v/o_proj here, q/k/v/out_proj there
ENCODER = (("norm1", "self_attn_layer_norm"), ("norm2", "final_layer_norm"))
DECODER = ENCODER + (("norm_cross", "encoder_attn_layer_norm"),)
ATTENTION = (("attn", "self_attn"),)
CROSS = (("cross_attn", "encoder_attn"),)
PROJECTIONS = (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj"))
MLP = (("mlp.up", "fc1"), ("mlp.down", "fc2"))


# ----------------------------------------------------------------------------------------------------------- loading

def marian_config(hf: dict) -> ModelConfig:
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    act = hf.get("activation_function", "gelu")
    need(act in ACTIVATIONS, f"activation_function {act!r} is not supported (use one of {', '.join(ACTIVATIONS)})")
    # keys of older Marian configs that transformers 5 ignores (it always runs the layout below): a file that
    # asks for something else was not made for this architecture
    for key, expected in (("normalize_before", False), ("add_final_layer_norm", False),
                          ("normalize_embedding", False), ("static_position_embeddings", True),
                          ("add_bias_logits", False)):
        need(hf.get(key, expected) == expected,
             f"{key}={hf.get(key)} is not Marian's layout (transformers' Marian runs {key}={expected})")
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        need(hf[a] == hf[b], f"{a} {hf[a]} differs from {b} {hf[b]}; tinyformer uses one value for both stacks")
    shared = hf.get("share_encoder_decoder_embeddings", True)
    target_vocab = hf["vocab_size"] if shared else (hf.get("decoder_vocab_size") or hf["vocab_size"])
    mlp, approximate = ACTIVATIONS[act]
    return ModelConfig(
        architecture="seq2seq", vocab_size=target_vocab, d_model=hf["d_model"], n_layers=hf["decoder_layers"],
        n_encoder_layers=hf["encoder_layers"], n_heads=hf["encoder_attention_heads"], d_ff=hf["encoder_ffn_dim"],
        context_length=hf.get("max_position_embeddings", 1024), dropout=hf.get("dropout", 0.1),
        positional="sinusoidal", sinusoidal_layout="halves", norm="layernorm", norm_eps=LAYER_NORM_EPS,
        norm_position="post", final_norm=False, scale_embeddings=bool(hf.get("scale_embedding", False)), mlp=mlp,
        gelu_approximate=approximate, bias=True, lm_head_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        share_embeddings=shared, src_vocab_size=None if shared else hf["vocab_size"],
        decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id")))


def load_marian(path: Path, hf: dict, device="cpu"):
    """(model in eval mode, target tokenizer, info, source tokenizer) from a local MarianMTModel directory."""
    from .hf import _Weights, read_hf_weights

    unknown = [a for a in hf.get("architectures") or [] if a not in ARCHITECTURES]
    if unknown:
        raise CheckpointError(f"{path}: unsupported architecture {unknown[0]}; tinyformer loads MarianMTModel")
    try:
        config = marian_config(hf)
    except ConfigError as error:
        raise CheckpointError(f"{path}/config.json cannot be represented: {error}") from None
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{path}/config.json is missing or has a bad value for {error}") from None
    weights = _Weights(read_hf_weights(path), str(path))
    config = _embedding_layout(weights, config)
    state = _from_marian(weights, config)
    weights.finish()
    with weights_to_be_loaded():  # every weight is loaded next
        model = Seq2Seq(config)
    load_state_into(model, state, path)
    tokenizer, source_tokenizer = marian_tokenizers(path, hf)
    info = {"format": "hf", "model_type": "marian", "model": config.to_dict(), "source": str(path),
            "generation": _generation_defaults(path, hf)}
    return model.to(device).eval(), tokenizer, info, source_tokenizer


def _prefix(w) -> str:
    return "model." if any(k.startswith("model.") for k in w.state) else ""  # MarianMTModel or a bare MarianModel


def _embedding_layout(w, c: ModelConfig) -> ModelConfig:
    """With share_encoder_decoder_embeddings, transformers 4 ties both stacks' embeddings to `shared`; transformers 5
    does so only with tie_word_embeddings, else each stack reads its own `embed_tokens`. Follow the file: when the
    two stacks' matrices differ, they are separate embeddings (over the same vocabulary)."""
    p = _prefix(w)
    enc, dec = (w.state.get(f"{p}{stack}.embed_tokens.weight") for stack in ("encoder", "decoder"))
    if c.share_embeddings and enc is not None and dec is not None and not torch.equal(enc, dec):
        return c.replace(share_embeddings=False, src_vocab_size=c.vocab_size)
    return c


def _from_marian(w, c: ModelConfig) -> dict[str, torch.Tensor]:
    p, D, V = _prefix(w), c.d_model, c.vocab_size
    for name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        w.drop(p + name)  # older files store the fixed sinusoids; ours are computed (the same table)
    if c.share_embeddings:
        key = p + "shared.weight" if p + "shared.weight" in w.state else p + "encoder.embed_tokens.weight"
        s = {"tok_emb.weight": w.take(key, (V, D))}
    else:
        s = {"src_emb.weight": w.take(p + "encoder.embed_tokens.weight", (c.src_vocab_size, D)),
             "tok_emb.weight": w.take(p + "decoder.embed_tokens.weight", (V, D))}
    for copy in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        w.drop(p + copy)  # tied copies of a matrix taken above (or transformers 5's unused `shared`)
    for stack, n, norms, attentions in (("encoder", c.encoder_layers, ENCODER, ATTENTION),
                                        ("decoder", c.n_layers, DECODER, ATTENTION + CROSS)):
        for i in range(n):
            h, b = f"{p}{stack}.layers.{i}.", f"{stack}.{i}."
            for ours, theirs in norms:
                for kind in ("weight", "bias"):
                    s[f"{b}{ours}.{kind}"] = w.take(f"{h}{theirs}.{kind}", (D,))
            pairs = [(f"{a}.{x}", f"{t}.{y}", (D, D)) for a, t in attentions for x, y in PROJECTIONS]
            pairs += [(ours, theirs, shape) for (ours, theirs), shape in zip(MLP, ((c.ff_dim, D), (D, c.ff_dim)))]
            for ours, theirs, shape in pairs:
                s[f"{b}{ours}.weight"] = w.take(f"{h}{theirs}.weight", shape)
                s[f"{b}{ours}.bias"] = w.take(f"{h}{theirs}.bias", shape[:1])
    s["lm_head.bias"] = w.take("final_logits_bias", (1, V))[0] if "final_logits_bias" in w.state else torch.zeros(V)
    if c.tie_embeddings:
        w.drop("lm_head.weight")
    else:
        s["lm_head.weight"] = w.take("lm_head.weight", (V, D))
    return s


def _generation_defaults(path: Path, hf: dict) -> dict:
    """What transformers' generate() reads from config.json / generation_config.json and we must match: generation
    ends at eos_token_id, single tokens in bad_words_ids are never generated, forced_eos_token_id ends a text cut by
    the length limit."""
    settings = dict(hf)
    if (path / "generation_config.json").is_file():
        settings.update(read_json_object(path / "generation_config.json"))
    defaults = {}
    eos = settings.get("eos_token_id")
    if isinstance(eos, int):  # the tokenizer's <eos> too when it has one; this also serves token-id prompts
        defaults["stop_token_ids"] = [eos]
    bad = settings.get("bad_words_ids") or []
    if any(len(words) != 1 for words in bad):
        raise CheckpointError(f"{path}: bad_words_ids {bad} bans multi-token sequences; tinyformer bans single tokens")
    if bad:
        defaults["suppress_token_ids"] = sorted({words[0] for words in bad})
    forced = settings.get("forced_eos_token_id")
    forced = forced[0] if isinstance(forced, list) and len(forced) == 1 else forced
    if forced is not None:
        if not isinstance(forced, int):
            raise CheckpointError(f"{path}: forced_eos_token_id {forced!r} is not one token id")
        defaults["forced_eos_token_id"] = forced
    return defaults


def marian_tokenizers(path: Path, hf: dict):
    """(target tokenizer, source tokenizer): tokenizer.json for both sides, else the sentencepiece files."""
    from .hf import _hf_tokenizer

    if (path / "tokenizer.json").is_file():
        tok = _hf_tokenizer(path, hf)
        return tok, tok
    if not (path / "source.spm").is_file():
        return None, None
    settings = read_json_object(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    names = {}
    for role in ("eos", "pad", "unk"):
        value = settings.get(f"{role}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names[role] = value
    separate = settings.get("separate_vocabs", False)
    try:
        source = SentencePieceTokenizer.from_files(path / "source.spm", path / "vocab.json", **names)
        target = SentencePieceTokenizer.from_files(path / "target.spm",
                                                   path / ("target_vocab.json" if separate else "vocab.json"), **names)
    except TokenizerError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return target, source


# ----------------------------------------------------------------------------------------------------------- export

def check_marian(c: ModelConfig) -> None:
    """A CheckpointError naming the first setting Marian cannot hold."""
    problems = [
        (c.positional != "sinusoidal", f"positional {c.positional!r} (Marian has sinusoidal positions)"),
        (c.positional == "sinusoidal" and c.sinusoidal_layout != "halves",
         f"sinusoidal_layout {c.sinusoidal_layout!r} (Marian's sinusoids are in 'halves')"),
        (c.norm_position != "post", f"norm_position {c.norm_position!r} (Marian is post-norm)"),
        (c.norm != "layernorm", f"norm {c.norm!r} (Marian uses layernorm)"),
        (c.norm_eps != LAYER_NORM_EPS, f"norm_eps {c.norm_eps} (Marian's layer norms use {LAYER_NORM_EPS})"),
        (c.final_norm, "final_norm=True (Marian has no final layer norms)"),
        (c.mlp == "swiglu", "mlp 'swiglu' (Marian has a plain two-layer MLP)"),
        (not c.bias, "bias=False (every Marian layer has biases)"),
        (c.kv_heads != c.n_heads, f"n_kv_heads {c.kv_heads} (Marian has no grouped-query attention)"),
        (c.hidden_head_dim * c.n_heads != c.d_model, f"head_dim {c.head_dim} (Marian's is d_model / n_heads)"),
    ]
    for bad, setting in problems:
        if bad:
            raise CheckpointError(f"cannot export to Marian: {setting}")


def export_marian(model: Seq2Seq, tokenizer, source_tokenizer, out_dir: Path, generation: dict | None = None):
    """(writers for the directory's files, notes): config.json + model.safetensors + tokenizer files."""
    from safetensors.torch import save_file

    from .hf import _write_json

    c = model.config
    check_marian(c)
    s = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    t = {}
    if c.share_embeddings:
        t["model.shared.weight"] = s["tok_emb.weight"]
    else:
        t["model.encoder.embed_tokens.weight"] = s["src_emb.weight"]
        t["model.decoder.embed_tokens.weight"] = s["tok_emb.weight"]
    for stack, n, norms, attentions in (("encoder", c.encoder_layers, ENCODER, ATTENTION),
                                        ("decoder", c.n_layers, DECODER, ATTENTION + CROSS)):
        for i in range(n):
            h, b = f"model.{stack}.layers.{i}.", f"{stack}.{i}."
            pairs = list(norms) + [(f"{a}.{x}", f"{t_}.{y}") for a, t_ in attentions for x, y in PROJECTIONS] + list(MLP)
            for ours, theirs in pairs:
                for kind in ("weight", "bias"):
                    t[f"{h}{theirs}.{kind}"] = s[f"{b}{ours}.{kind}"]
    bias = s.get("lm_head.bias")
    t["final_logits_bias"] = (bias if bias is not None else torch.zeros(c.vocab_size)).reshape(1, -1)
    if not c.tie_embeddings:
        t["lm_head.weight"] = s["lm_head.weight"]
    t = {k: standalone(v) for k, v in t.items()}

    generation = generation or {}
    pad = tokenizer.pad_id if tokenizer is not None else 0
    eos = tokenizer.eos_id if tokenizer is not None else 0
    start = c.decoder_start_id if c.decoder_start_id is not None else (tokenizer.bos_id if tokenizer else pad)
    act = {"silu": "swish", "relu": "relu"}.get(c.mlp, "gelu_new" if c.gelu_approximate == "tanh" else "gelu")
    dtype = str(next(iter(t.values())).dtype).removeprefix("torch.")
    config = {"architectures": ["MarianMTModel"], "model_type": "marian", "vocab_size": c.source_vocab_size,
              "decoder_vocab_size": c.vocab_size, "share_encoder_decoder_embeddings": c.share_embeddings,
              "tie_word_embeddings": c.tie_embeddings, "d_model": c.d_model, "encoder_layers": c.encoder_layers,
              "decoder_layers": c.n_layers, "encoder_attention_heads": c.n_heads,
              "decoder_attention_heads": c.n_heads, "encoder_ffn_dim": c.ff_dim, "decoder_ffn_dim": c.ff_dim,
              "activation_function": act, "max_position_embeddings": c.context_length,
              "scale_embedding": c.scale_embeddings, "dropout": c.dropout, "attention_dropout": 0.0,
              "activation_dropout": 0.0, "pad_token_id": pad, "eos_token_id": eos, "decoder_start_token_id": start,
              # our generate() forces and bans only what the checkpoint says; tell transformers the same
              "forced_eos_token_id": generation.get("forced_eos_token_id"),
              "is_encoder_decoder": True, "dtype": dtype, "use_cache": True}
    if generation.get("suppress_token_ids"):
        config["bad_words_ids"] = [[i] for i in generation["suppress_token_ids"]]
    notes = []
    writers = {"model.safetensors": lambda p: save_file(t, str(p), metadata={"format": "pt"})}
    if isinstance(tokenizer, SentencePieceTokenizer) and isinstance(source_tokenizer, SentencePieceTokenizer):
        separate = source_tokenizer.vocab != tokenizer.vocab
        writers["source.spm"] = lambda p: p.write_bytes(source_tokenizer.proto)
        writers["target.spm"] = lambda p: p.write_bytes(tokenizer.proto)
        writers["vocab.json"] = lambda p: _write_json(p, source_tokenizer.vocab)
        if separate:
            writers["target_vocab.json"] = lambda p: _write_json(p, tokenizer.vocab)
        names = {f"{role}_token": tokenizer.pieces[getattr(tokenizer, f"{role}_id")] for role in ("eos", "pad", "unk")}
        writers["tokenizer_config.json"] = lambda p: _write_json(p, {"tokenizer_class": "MarianTokenizer",
                                                                     "separate_vocabs": separate, **names,
                                                                     "model_max_length": c.context_length})
    elif isinstance(tokenizer, HFTokenizer) and source_tokenizer in (None, tokenizer):
        names = {role: tokenizer.tok.id_to_token(getattr(tokenizer, f"{role}_id")) for role in ("eos", "pad")}
        writers["tokenizer.json"] = lambda p: tokenizer.tok.save(str(p))
        writers["tokenizer_config.json"] = lambda p: _write_json(p, {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": c.context_length,
            **{f"{role}_token": name for role, name in names.items() if name is not None}})
    else:
        kinds = sorted({getattr(tok, "spec", "none") for tok in (tokenizer, source_tokenizer) if tok is not None})
        notes.append(f"tokenizer {', '.join(kinds)} has no Marian tokenizer files; none written "
                     f"(token ids are unchanged; encode text with tinyformer's tokenizer)")
    writers["config.json"] = lambda p: _write_json(p, config)  # last: a directory with config.json is complete
    return writers, notes
