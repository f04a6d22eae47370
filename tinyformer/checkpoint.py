"""Checkpoint directories: config.json + model.safetensors + tokenizer files (+ trainer_state.pt to resume).

Every file is written to a temporary name and renamed into place, config.json last; the step is recorded in both
config.json and the safetensors header so a checkpoint torn between two saves is detected, not silently mixed.
Nothing here unpickles code: weights come from safetensors, trainer state from torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import ConfigError, ModelConfig, build_model, weights_to_be_loaded
from .model.quant import PrecisionError, check_precision, precision, set_precision
from .tokenizers import Tokenizer, TokenizerError, load_tokenizer

FORMAT = "tinyformer"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # some writers create 0600 files; a checkpoint is meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def standalone(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, contiguous and owning all of its storage (copied if need be): safetensors refuses tensors that
    share storage, and a packed model's weights lie side by side in shared chunks of huge pages (quant.HugePages)."""
    tensor = tensor.detach().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to store: standalone contiguous tensors, tied LM head left out (it is the embedding; an int8
    head is its own tensor and is kept)."""
    state = {k: standalone(v) for k, v in model.state_dict().items()}
    if ("lm_head.weight" in state and "tok_emb.weight" in state
            and model.state_dict()["lm_head.weight"].data_ptr() == model.state_dict()["tok_emb.weight"].data_ptr()):
        state.pop("lm_head.weight")
    return state


def save_checkpoint(directory, model, tokenizer: Tokenizer, *, train_config: dict | None = None,
                    trainer_state: dict | None = None, step: int = 0, extra: dict | None = None,
                    source_tokenizer: Tokenizer | None = None) -> Path:
    """Write model, tokenizer(s) and configs; a seq2seq model with its own source tokenizer keeps it in
    source_tokenizer/."""
    if tokenizer is None:
        raise CheckpointError("a checkpoint needs a tokenizer; this model has none (pass one to save_checkpoint)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "step": str(step)}
    _atomic_write(directory / "model.safetensors", lambda p: save_file(model_state(model), str(p), metadata=metadata))
    if trainer_state is not None:
        _atomic_write(directory / "trainer_state.pt", lambda p: torch.save({**trainer_state, "step": step}, p))
    tokenizer_entry = tokenizer.save(directory)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": model.config.architecture,
              "step": step, "model": model.config.to_dict(), "precision": precision(model), "tokenizer": tokenizer_entry,
              "train": train_config}
    if source_tokenizer is not None:
        (directory / "source_tokenizer").mkdir(exist_ok=True)
        config["source_tokenizer"] = source_tokenizer.save(directory / "source_tokenizer")
    config.update(extra or {})
    _atomic_write(directory / "config.json",
                  lambda p: p.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"))
    return directory


def is_checkpoint(path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text("utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_json_object(path: Path, missing: str | None = None) -> dict:
    """A JSON file that must hold an object, with one-line errors for missing, corrupted or wrong-shaped files."""
    if not path.is_file():
        raise CheckpointError(missing or f"missing {path}")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is corrupted: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is corrupted: not a JSON object")
    return data


def read_config(directory) -> dict:
    path = Path(directory) / "config.json"
    config = read_json_object(path, f"{directory} is not a checkpoint: no config.json")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tinyformer checkpoint (format {config.get('format')!r})")
    return config


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a safetensors file, turning a truncated or corrupted file into one clear error."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            return {name: handle.get_tensor(name) for name in handle.keys()}, metadata
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{path} is corrupted or truncated ({error})") from None


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load a state dict strictly, naming missing, unexpected and mis-shaped weights in one line."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source}: weights do not match the config: {'; '.join(parts)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)  # the tied head is the embedding, already loaded


def load_checkpoint(directory, device: str | torch.device = "cpu"):
    """Return (model in eval mode, tokenizer, config dict) from a tinyformer checkpoint directory, in the precision
    it was saved in (config.json "precision", absent = float32)."""
    directory = Path(directory)
    config = read_config(directory)
    try:
        model_config = ModelConfig.from_dict(config["model"])
        saved_precision = config.get("precision") or {}
        check_precision(saved_precision.get("dtype"), saved_precision.get("quantize"))
        tokenizer = load_tokenizer(directory, config["tokenizer"])

    except (KeyError, TypeError, AttributeError, ConfigError, PrecisionError, TokenizerError, OSError,
            json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory}/config.json is invalid: {error}") from None
    state, metadata = load_weights(directory / "model.safetensors")
    if metadata.get("step") is not None and metadata["step"] != str(config.get("step")):
        raise CheckpointError(f"{directory}: model.safetensors is from step {metadata['step']} but config.json "
                              f"from step {config.get('step')} (a save was interrupted)")
    with weights_to_be_loaded():  # every weight is loaded next
        model = build_model(model_config)
    model = set_precision(model, saved_precision.get("dtype"), saved_precision.get("quantize"))
    load_state_into(model, state, directory)
    model = model.to(device).eval()
    if saved_precision.get("dtype") and any(p.device.type != "cpu" for p in model.parameters()):
        set_precision(model, saved_precision["dtype"])  # off the CPU, 16-bit arithmetic too (set_precision)
    return model, tokenizer, config


def load_source_tokenizer(directory, config: dict) -> Tokenizer | None:
    """A seq2seq checkpoint's own source tokenizer (None when source and target share one)."""
    if not config.get("source_tokenizer"):
        return None
    try:
        return load_tokenizer(Path(directory) / "source_tokenizer", config["source_tokenizer"])
    except (KeyError, TypeError, TokenizerError, OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory}/config.json has an invalid source_tokenizer: {error}") from None


def safe_torch_load(path: Path):
    """torch.load(weights_only=True) with one-line errors: a pickle that would run code is refused unexecuted."""
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global outside plain tensors/containers before calling it: nothing ran.
        raise CheckpointError(f"{path}: refusing to load, not a weights-only PyTorch file or corrupted "
                              f"({_unpickling_reason(error)}); nothing in it was executed") from None
    except Exception as error:  # noqa: BLE001 - garbage input fails in many ways (KeyError, EOFError, ...)
        raise CheckpointError(f"{path} is corrupted or truncated ({_unpickling_reason(error)})") from None


def _unpickling_reason(error: Exception) -> str:
    """torch's message is a paragraph: keep the line that says which global or opcode was refused."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def load_trainer_state(directory) -> dict:
    path = Path(directory) / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no trainer_state.pt to resume from")
    return safe_torch_load(path)
