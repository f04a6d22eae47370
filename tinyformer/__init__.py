"""tinyformer: a small, hackable Transformer language-model engine."""
from .api import LanguageModel, load
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import DataError, TokenData, load_text
from .model import GPT, PRESETS, ConfigError, ModelConfig, preset
from .tokenizers import Tokenizer, TokenizerError, get_tokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "ConfigError", "PRESETS", "preset", "Tokenizer", "TokenizerError",
           "get_tokenizer", "TokenData", "load_text", "DataError", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "load", "LanguageModel"]
