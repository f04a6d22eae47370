import json

import pytest
import torch

from tinyformer import CheckpointError, load, load_checkpoint, save_checkpoint

from .helpers import char_lm


@pytest.fixture(params=["tiny", "llama-tiny", "book"])
def saved(request, tmp_path):
    lm = char_lm(request.param)
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer, step=7)
    return lm, tmp_path / "ckpt"


def test_save_load_gives_bit_identical_logits(saved):
    lm, path = saved
    model, tokenizer, config = load_checkpoint(path)
    ids = torch.tensor([lm.tokenizer.encode("Speak, speak.")])
    assert torch.equal(model(ids), lm.model(ids))
    assert config["step"] == 7 and tokenizer.encode("农夫") == lm.tokenizer.encode("农夫")
    assert json.loads((path / "config.json").read_text())["model"] == lm.model.config.to_dict()


def test_tied_head_is_stored_once_and_reloaded_tied(saved):
    lm, path = saved
    model, _, _ = load_checkpoint(path)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight


def test_load_api_returns_a_language_model(saved):
    lm, path = saved
    loaded = load(path, device="cpu")
    assert loaded.generate("All:", max_new_tokens=5, temperature=0) == lm.generate("All:", max_new_tokens=5,
                                                                                   temperature=0)


def test_truncated_weights_are_a_clear_error(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(path)


def test_garbage_config_is_a_clear_error(saved):
    _, path = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupted"):
        load_checkpoint(path)


def test_weights_from_another_save_are_detected(saved, tmp_path):
    lm, path = saved
    save_checkpoint(tmp_path / "other", lm.model, lm.tokenizer, step=8)
    (path / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="interrupted"):
        load_checkpoint(path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


def test_save_leaves_no_temporary_files(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["char_vocab.json", "config.json", "model.safetensors"]


def test_a_model_whose_weights_are_loaded_next_is_built_without_random_initialisation(saved):
    import threading

    from tinyformer.model import ModelConfig, build_model, weights_to_be_loaded

    config = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, context_length=16)
    state = torch.get_rng_state()
    with weights_to_be_loaded():
        build_model(config)
        assert torch.equal(torch.get_rng_state(), state)  # no random draws: nothing initialised
        other = []  # a thread building meanwhile is not affected (a context variable)
        thread = threading.Thread(target=lambda: other.append(build_model(config)))
        thread.start()
        thread.join()
        assert not torch.equal(torch.get_rng_state(), state)
    state = torch.get_rng_state()
    build_model(config)
    assert not torch.equal(torch.get_rng_state(), state)  # outside, models are initialised as before
    model, _, _ = load_checkpoint(saved[1])  # and a loaded one still holds finite weights (bit-equal: above)
    assert all(torch.isfinite(p).all() for p in model.parameters())
