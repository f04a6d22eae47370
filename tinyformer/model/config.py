"""Model hyper-parameters: one dataclass, saved inside every checkpoint, plus named presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

ARCHITECTURES = ("gpt", "seq2seq")
POSITIONALS = ("learned", "sinusoidal", "rope")
SINUSOIDAL_LAYOUTS = ("interleaved", "halves")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLPS = ("gelu", "relu", "silu", "swiglu")


class ConfigError(ValueError):
    """A hyper-parameter that cannot build a model; the message names it and what is allowed."""


@dataclass
class ModelConfig:
    architecture: str = "gpt"  # gpt: decoder-only; seq2seq: encoder-decoder (vocab_size is the target side's)
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # < n_heads: grouped-query attention; 1: multi-query
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int | None = None  # default 4 * d_model
    context_length: int = 128
    dropout: float = 0.0
    positional: str = "learned"
    sinusoidal_layout: str = "interleaved"  # sin/cos in alternate columns, or all sin then all cos (Marian)
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre: x + f(norm(x)); post: norm(x + f(x)), the original Transformer and Marian
    final_norm: bool = True  # a norm after the last block of each stack (post-norm models such as Marian have none)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (the original Transformer, Marian)
    mlp: str = "gelu"
    gelu_approximate: str = "tanh"  # GPT-2's "gelu_new"; "none" is the exact erf GELU
    bias: bool = True  # biases in the blocks' linear layers and norms
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # seq2seq only
    n_encoder_layers: int | None = None  # default n_layers (the decoder's)
    share_embeddings: bool = True  # one vocabulary and embedding for source and target
    src_vocab_size: int | None = None  # the source vocabulary when it is not shared
    decoder_start_id: int | None = None  # the token the decoder starts from; None: the tokenizer's <bos>

    def __post_init__(self):
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layers or self.n_layers

    @property
    def source_vocab_size(self) -> int:
        return self.vocab_size if self.share_embeddings else self.src_vocab_size

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "context_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.architecture in ARCHITECTURES,
             f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        need(self.positional in POSITIONALS, f"positional {self.positional!r} is not one of {', '.join(POSITIONALS)}")
        need(self.sinusoidal_layout in SINUSOIDAL_LAYOUTS,
             f"sinusoidal_layout {self.sinusoidal_layout!r} is not one of {', '.join(SINUSOIDAL_LAYOUTS)}")
        need(self.norm_position in NORM_POSITIONS,
             f"norm_position {self.norm_position!r} is not one of {', '.join(NORM_POSITIONS)}")
        need(self.norm in NORMS, f"norm {self.norm!r} is not one of {', '.join(NORMS)}")
        need(self.mlp in MLPS, f"mlp {self.mlp!r} is not one of {', '.join(MLPS)}")
        need(self.gelu_approximate in ("tanh", "none"), f"gelu_approximate {self.gelu_approximate!r} is not 'tanh' or 'none'")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("n_encoder_layers", "src_vocab_size"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value > 0),
                 f"{name} must be a positive integer or None, got {value!r}")
        if self.architecture == "seq2seq" and not self.share_embeddings:
            need(self.src_vocab_size is not None, "share_embeddings=False needs src_vocab_size (the source vocabulary)")
        if self.head_dim is None:
            need(self.d_model % self.n_heads == 0,
                 f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        need(self.n_heads % self.kv_heads == 0,
             f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.positional == "rope":
            need(self.hidden_head_dim % 2 == 0, f"rope needs an even head dimension, got {self.hidden_head_dim}")
        if self.positional == "sinusoidal":
            need(self.d_model % 2 == 0, f"sinusoidal positions need an even d_model, got {self.d_model}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)


PRESETS: dict[str, dict] = {
    # Trains in ~2-3 minutes on two CPU cores and still writes recognisable text.
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, context_length=64, dropout=0.0,
                 positional="learned", norm="layernorm", mlp="gelu"),
    # The Transformer-from-scratch tutorial's hyper-parameters.
    "book": dict(d_model=80, n_layers=6, n_heads=4, context_length=128, dropout=0.1, positional="sinusoidal",
                 norm="layernorm", mlp="relu", bias=True, lm_head_bias=True, tie_embeddings=False),
    # The 124M GPT-2 shape (vocabulary comes from the tokenizer; GPT-2's own is 50257).
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, context_length=1024, dropout=0.0,
                 positional="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    # Encoder-decoder for translation on a laptop CPU: chosen by measurement on benchmarks/translate.py.
    "seq2seq": dict(architecture="seq2seq", d_model=128, n_layers=2, n_encoder_layers=2, n_heads=4, d_ff=512,
                    context_length=64, dropout=0.1, positional="sinusoidal", norm="layernorm", mlp="relu",
                    scale_embeddings=True, tie_embeddings=True),
    # The shape of Hugging Face's opus-mt Marian models: 6+6 post-norm layers, swish, sinusoidal halves.
    "marian": dict(architecture="seq2seq", d_model=512, n_layers=6, n_encoder_layers=6, n_heads=8, d_ff=2048,
                   context_length=512, dropout=0.1, positional="sinusoidal", sinusoidal_layout="halves",
                   norm="layernorm", norm_position="post", final_norm=False, scale_embeddings=True, mlp="silu",
                   lm_head_bias=True, tie_embeddings=True),
    # A Llama-family miniature: RoPE, RMSNorm, SwiGLU, grouped-query attention.
    "llama-tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=344, context_length=256, dropout=0.0,
                       positional="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False,
                       tie_embeddings=False),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
