from .config import PRESETS, ConfigError, ModelConfig, preset
from .gpt import GPT
from .layers import weights_to_be_loaded
from .seq2seq import Seq2Seq



def build_model(config: ModelConfig):
    """The model a config describes: GPT or Seq2Seq, by config.architecture."""
    return Seq2Seq(config) if config.architecture == "seq2seq" else GPT(config)


__all__ = ["GPT", "Seq2Seq", "build_model", "weights_to_be_loaded", "ModelConfig", "ConfigError", "PRESETS", "preset"]
