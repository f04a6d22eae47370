"""Training: learning, determinism, exact resume, checkpoints, logs, and clear errors that leave checkpoints alone."""
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyformer.checkpoint import load_checkpoint, save_checkpoint
from tinyformer.data import DataError, TokenData
from tinyformer.model import GPT, ConfigError, ModelConfig
from tinyformer.tokenizers import TokenizerError
from tinyformer.train import TrainConfig, TrainError, evaluate, make_optimizer, train

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n"


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(d_model=32, n_layers=2, n_heads=2, context_length=16), **overrides})


def quick(data, **overrides) -> TrainConfig:
    return TrainConfig(**{**dict(data=str(data), batch_size=8, lr=3e-3, warmup_steps=5, max_steps=40,
                                 eval_interval=15, eval_iters=4, log_interval=1, device="cpu"), **overrides})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in metrics(out) if r["train_loss"] is not None}


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "fox.txt"
    path.write_text(TEXT * 60, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory):
    """One uninterrupted run with dropout (so the global RNG matters) that other tests compare against."""
    out = tmp_path_factory.mktemp("reference")
    summary = train(tiny(dropout=0.1), quick(text_file), out, progress=False, log=lambda s: None)
    return out, summary


def test_overfits_a_repeated_text(text_file, tmp_path):
    summary = train(tiny(), quick(text_file, max_steps=300, eval_interval=300, lr=1e-2, warmup_steps=20,
                                  batch_size=32, log_interval=10), tmp_path, progress=False, log=lambda s: None)
    assert summary["steps"] == 300 and summary["stopped"] == "max_steps"
    first = metrics(tmp_path)[0]
    vocab = json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"]
    assert first["step"] == 0 and abs(first["val_loss"] - math.log(vocab)) < 0.3  # untrained: near uniform
    # Measured 0.089. The floor is not 0: a window's first few characters cannot tell where in the sentence
    # they are (which 't' is this?), so only those positions keep some uncertainty.
    assert summary["train_loss"] < 0.15 and summary["val_loss"] < 0.15, summary


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is not available")
def test_real_text_lowers_val_loss(tmp_path):
    config = ModelConfig(d_model=64, n_layers=2, n_heads=4, context_length=64)
    summary = train(config, TrainConfig(data=str(SHAKESPEARE), batch_size=16, lr=3e-3, warmup_steps=20,
                                        max_steps=150, eval_interval=150, eval_iters=10, device="cpu"),
                    tmp_path, progress=False, log=lambda s: None)
    vocab = json.loads((tmp_path / "config.json").read_text())["model"]["vocab_size"]
    initial = metrics(tmp_path)[0]["val_loss"]
    assert abs(initial - math.log(vocab)) < 0.3  # an untrained model is near uniform
    assert summary["val_loss"] < initial - 1.2, (initial, summary)
    assert 0 < summary["val_bpb"] < initial / math.log(2)


def test_same_seed_same_run_other_seed_differs(text_file, reference, tmp_path):
    ref_out, ref_summary = reference
    train(tiny(dropout=0.1), quick(text_file), tmp_path / "again", progress=False, log=lambda s: None)
    train(tiny(dropout=0.1), quick(text_file, seed=7), tmp_path / "other", progress=False, log=lambda s: None)

    def curve(out):
        return [{k: r[k] for k in ("step", "lr", "train_loss", "val_loss", "val_bpb")} for r in metrics(out)]

    assert curve(tmp_path / "again") == curve(ref_out)
    assert len(train_losses(ref_out)) == 40
    assert curve(tmp_path / "other") != curve(ref_out)
    assert all(torch.equal(a, weights(tmp_path / "again")[k]) for k, a in weights(ref_out).items())


@pytest.mark.parametrize("log_interval", [1, 6])
def test_stop_at_then_resume_equals_uninterrupted(log_interval, text_file, reference, tmp_path):
    ref_out, ref_summary = reference
    if log_interval != 1:  # stop mid log-interval: the resumed run must carry on its running mean
        ref_out = tmp_path / "reference"
        ref_summary = train(tiny(dropout=0.1), quick(text_file, log_interval=log_interval), ref_out,
                            progress=False, log=lambda s: None)
    out = tmp_path / "run"
    first = train(tiny(dropout=0.1), quick(text_file, stop_at=17, log_interval=log_interval), out, progress=False,
                  log=lambda s: None)
    assert first["steps"] == 17 and first["stopped"] == "stop_at"
    assert json.loads((out / "config.json").read_text())["step"] == 17
    # The second case resumes with the very config that stopped (as a CLI re-reading the saved one does).
    resumed = train(tiny(dropout=0.1), quick(text_file, log_interval=log_interval,
                                             stop_at=None if log_interval == 1 else 17),
                    out, resume=True, progress=False, log=lambda s: None)
    assert resumed["steps"] == 40
    expected, got = train_losses(ref_out), train_losses(out)
    assert {step: got.get(step) for step in expected} == expected
    assert set(got) - set(expected) <= {17}  # the interrupted run also logged where it stopped
    assert resumed["val_loss"] == ref_summary["val_loss"]
    ref_weights, weights_now = weights(ref_out), weights(out)
    assert ref_weights.keys() == weights_now.keys()
    assert all(torch.equal(ref_weights[k], weights_now[k]) for k in ref_weights)


def test_ctrl_c_checkpoints_and_resume_with_saved_configs_continues_exactly(text_file, reference, tmp_path):
    ref_out, _ = reference

    def interrupt_at_step_23(message):
        if message.startswith("step 23/"):
            os.kill(os.getpid(), signal.SIGINT)

    summary = train(tiny(dropout=0.1), quick(text_file), tmp_path, progress=False, log=interrupt_at_step_23)
    assert summary["interrupted"] and summary["steps"] in (23, 24)
    resumed = train(None, None, tmp_path, resume=True, progress=False, log=lambda s: None)  # the saved configs
    assert resumed["steps"] == 40 and not resumed["interrupted"]
    assert train_losses(tmp_path) == train_losses(ref_out)
    assert all(torch.equal(a, weights(tmp_path)[k]) for k, a in weights(ref_out).items())


def test_time_budget_sets_a_horizon_that_resume_keeps(text_file, tmp_path, monkeypatch):
    monkeypatch.setattr("tinyformer.train.MEASURE_FRACTION", 0.0)  # time only MEASURE_STEPS steps: known by step 12
    config = quick(text_file, max_steps=None, time_budget=3.0, stop_at=12, eval_interval=1000)
    first = train(tiny(), config, tmp_path, progress=False, log=lambda s: None)
    horizon = first["max_steps"]
    assert first["stopped"] == "stop_at" and horizon > 12
    resumed = train(tiny(), quick(text_file, max_steps=None, time_budget=3.0, eval_interval=1000), tmp_path,
                    resume=True, progress=False, log=lambda s: None)
    assert resumed["max_steps"] == horizon
    assert resumed["stopped"] in ("max_steps", "time_budget")
    assert resumed["seconds"] < 3.0 + 2.0


def test_time_budget_holds_lr_through_the_stable_phase_then_decays(text_file, tmp_path):
    """Warmup-stable-decay under a time budget: lr holds its peak through the stable phase (half of the 1 s budget,
    timed to fix the horizon) and decays monotonically after it."""
    config = quick(text_file, max_steps=None, time_budget=1.0, eval_interval=10**6, warmup_steps=2, decay="linear",
                   min_lr=0.0, cooldown=0.5)
    summary = train(tiny(), config, tmp_path, progress=False, log=lambda s: None)
    records = [r for r in metrics(tmp_path) if r["train_loss"] is not None and r["step"] > 2]
    decayed = [r for r in records if r["lr"] < config.lr]
    assert summary["max_steps"] is not None and decayed and decayed[-1] is records[-1]
    assert all(r["elapsed"] >= 0.5 for r in decayed)  # no decay before half the budget
    assert [r["lr"] for r in decayed] == sorted((r["lr"] for r in decayed), reverse=True)


def test_checkpoint_reproduces_the_trained_model(text_file, tmp_path):
    config = tiny(positional="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False, bias=False, dropout=0.1)
    train_config = quick(text_file, max_steps=20)
    summary = train(config, train_config, tmp_path / "run", progress=False, log=lambda s: None)
    model, tokenizer, saved = load_checkpoint(tmp_path / "run")
    assert saved["train"]["max_steps"] == 20 and saved["model"]["positional"] == "rope"
    data = TokenData.from_text(text_file.read_text(), tokenizer, 0.1, config.context_length)
    assert evaluate(model, data, 8, 4, train_config.seed, "cpu") == summary["val_loss"]  # bit-exact
    save_checkpoint(tmp_path / "copy", model, tokenizer)
    again, _, _ = load_checkpoint(tmp_path / "copy")
    x = torch.tensor([tokenizer.encode(TEXT[:16])])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_only_linear_weights_decay_and_tied_head_counts_once():
    for config in (tiny(vocab_size=50), tiny(vocab_size=50, tie_embeddings=False)):
        model = GPT(config)
        decay, no_decay = make_optimizer(model, TrainConfig(), torch.device("cpu")).param_groups
        ids = {id(p) for p in decay["params"]} | {id(p) for p in no_decay["params"]}
        assert len(ids) == len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
        assert all(p.dim() == 2 for p in decay["params"]) and all(p is not model.tok_emb.weight
                                                                   for p in decay["params"])
        assert any(p is model.tok_emb.weight for p in no_decay["params"])
        assert any(p is model.lm_head.weight for p in decay["params"]) == (not config.tie_embeddings)


def test_metrics_and_loss_plot(reference):
    out, summary = reference
    records = metrics(out)
    assert {"step", "lr", "train_loss", "val_loss", "val_bpb", "tokens_per_s", "elapsed"} <= set(records[0])
    assert [r["step"] for r in records if r["val_loss"] is not None] == [0, 15, 30, 40]
    assert records[-1]["val_loss"] == summary["val_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["tokens_per_s"] > 0 and summary["checkpoint"] == str(out)


@pytest.fixture
def existing(text_file, tmp_path):
    out = tmp_path / "existing"
    train(tiny(), quick(text_file, max_steps=3), out, progress=False, log=lambda s: None)
    return out


@pytest.mark.parametrize("case, error, words", [
    ("missing data", DataError, ["nope.txt", "does not exist"]),
    ("empty data", DataError, ["empty.txt", "empty"]),
    ("tiny data", DataError, ["data too small"]),
    ("unknown tokenizer", TokenizerError, ["'wordpiece'", "char"]),
    ("unknown preset", ConfigError, ["'huge'", "tiny"]),
    ("batch_size 0", TrainError, ["batch_size must be a positive integer, got 0"]),
    ("negative lr", TrainError, ["lr must be a positive number, got -0.001"]),
    ("no checkpoint to resume", TrainError, ["holds no checkpoint"]),
    ("checkpoint without resume", TrainError, ["already holds a checkpoint (step 3)", "--resume"]),
    ("resume another model", TrainError, ["d_model 64", "saved 32"]),
    ("resume other settings", TrainError, ["lr 0.01", "saved 0.003"]),
    ("resume changed data", TrainError, ["changed since the checkpoint"]),
])
def test_bad_input_is_a_clear_error_and_leaves_checkpoint_alone(case, error, words, existing, text_file, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "small.txt").write_text("short")
    (tmp_path / "empty_dir").mkdir()
    before = snapshot(existing)
    run = dict(progress=False, log=lambda s: None)
    with pytest.raises(error) as raised:
        if case == "missing data":
            train(tiny(), quick(tmp_path / "nope.txt"), existing, overwrite=True, **run)
        elif case == "empty data":
            train(tiny(), quick(tmp_path / "empty.txt"), existing, overwrite=True, **run)
        elif case == "tiny data":
            train(tiny(), quick(tmp_path / "small.txt"), existing, overwrite=True, **run)
        elif case == "unknown tokenizer":
            train(tiny(), quick(text_file, tokenizer="wordpiece"), existing, overwrite=True, **run)
        elif case == "unknown preset":
            train("huge", quick(text_file), existing, overwrite=True, **run)
        elif case == "batch_size 0":
            train(tiny(), quick(text_file, batch_size=0), existing, overwrite=True, **run)
        elif case == "negative lr":
            train(tiny(), quick(text_file, lr=-1e-3), existing, overwrite=True, **run)
        elif case == "no checkpoint to resume":
            train(tiny(), quick(text_file), tmp_path / "empty_dir", resume=True, **run)
        elif case == "checkpoint without resume":
            train(tiny(), quick(text_file), existing, **run)
        elif case == "resume another model":
            train(tiny(d_model=64), quick(text_file, max_steps=3), existing, resume=True, **run)
        elif case == "resume other settings":
            train(tiny(), quick(text_file, max_steps=3, lr=1e-2), existing, resume=True, **run)
        elif case == "resume changed data":
            text_file.write_text(TEXT * 61)
            try:
                train(tiny(), quick(text_file, max_steps=3), existing, resume=True, **run)
            finally:
                text_file.write_text(TEXT * 60)
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert snapshot(existing) == before
    assert list((tmp_path / "empty_dir").iterdir()) == []


def test_overwrite_replaces_an_existing_run(existing, text_file):
    summary = train(tiny(), quick(text_file, max_steps=5), existing, overwrite=True, progress=False,
                    log=lambda s: None)
    assert summary["steps"] == 5 and metrics(existing)[-1]["step"] == 5 and len(train_losses(existing)) == 5
