from .config import PRESETS, ConfigError, ModelConfig, preset
from .gpt import GPT

__all__ = ["GPT", "ModelConfig", "ConfigError", "PRESETS", "preset"]
