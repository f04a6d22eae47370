"""Safe long runs: SIGTERM checkpoints and resumes exactly, one writer per out_dir, step copies, NaN stops cleanly."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyformer.checkpoint import load_checkpoint
from tinyformer.train import TrainError, lock_out_dir, train

from .test_train import TEXT, metrics, quick, snapshot, tiny, train_losses, weights

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, log=lambda s: None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "fox.txt"
    path.write_text(TEXT * 60, encoding="utf-8")
    return path


# The child trains the test suite's reference run, and at step 23 says so and waits for the parent's go-ahead:
# SIGTERM arrives while it is mid-run, holding its lock.
CHILD = """
import sys, time, pathlib, torch
torch.set_num_threads(1)
from tests.test_train import quick, tiny
from tinyformer.train import train
text, out, ready, go = sys.argv[1:5]
def log(message):
    print(message, flush=True)
    if message.startswith("step 23/"):
        pathlib.Path(ready).write_text("ready")
        deadline = time.time() + 60
        while not pathlib.Path(go).exists() and time.time() < deadline:
            time.sleep(0.02)
summary = train(tiny(dropout=0.1), quick(text), out, progress=False, log=log)
print("SUMMARY", summary["steps"], summary["stopped"], flush=True)
"""


def test_sigterm_checkpoints_refuses_a_second_writer_and_resumes_exactly(text_file, tmp_path):
    reference = tmp_path / "reference"
    train(tiny(dropout=0.1), quick(text_file), reference, **QUIET)  # uninterrupted
    out, ready, go = tmp_path / "run", tmp_path / "ready", tmp_path / "go"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(text_file), str(out), str(ready), str(go)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not ready.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert ready.exists(), child.communicate()
        before = snapshot(out)
        for second_writer in (dict(resume=True), dict(overwrite=True)):  # another process on the same --out
            with pytest.raises(TrainError, match=r"is in use: another training process holds .*\.lock") as raised:
                train(tiny(dropout=0.1), quick(text_file), out, **second_writer, **QUIET)
            assert "\n" not in str(raised.value)
        assert snapshot(out) == before  # the refused writer touched nothing
        child.send_signal(signal.SIGTERM)
        go.write_text("go")
        stdout, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, stderr
    assert "(continue with --resume)" in stdout and "SUMMARY 23 interrupt" in stdout, stdout
    assert json.loads((out / "config.json").read_text())["step"] == 23
    resumed = train(None, None, out, resume=True, **QUIET)
    assert resumed["steps"] == 40
    assert train_losses(out) == train_losses(reference)
    assert all(torch.equal(a, weights(out)[k]) for k, a in weights(reference).items())  # bit-identical


def test_lock_is_released_after_a_run_and_by_an_error(text_file, tmp_path):
    with lock_out_dir(tmp_path / "run"):
        with pytest.raises(TrainError, match="is in use"):
            train(tiny(), quick(text_file, max_steps=2), tmp_path / "run", overwrite=True, **QUIET)
    train(tiny(), quick(text_file, max_steps=2), tmp_path / "run", overwrite=True, **QUIET)  # free again
    with pytest.raises(TrainError, match="already holds a checkpoint"):
        train(tiny(), quick(text_file, max_steps=2), tmp_path / "run", **QUIET)
    with lock_out_dir(tmp_path / "run"):  # neither the finished run nor the refused one kept it
        pass


def test_save_interval_keeps_the_last_step_copies_and_each_resumes_exactly(text_file, tmp_path):
    out = tmp_path / "run"
    train(tiny(dropout=0.1), quick(text_file, save_interval=4, keep_last=2), out, **QUIET)
    copies = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert copies == ["step-000036", "step-000040"]  # saves at 0, 4, 8, 12, 15 (eval), 16, ..., 36, 40 (end)
    final = out / "checkpoints" / "step-000040"
    model, _, config = load_checkpoint(final)
    assert config["step"] == 40
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights(out).items())
    # A step copy is a whole checkpoint: resuming it replays steps 37..40 exactly.
    resumed = train(None, None, out / "checkpoints" / "step-000036", resume=True, **QUIET)
    assert resumed["steps"] == 40
    assert all(torch.equal(a, weights(out / "checkpoints" / "step-000036")[k]) for k, a in weights(out).items())
    assert train_losses(out / "checkpoints" / "step-000036") == train_losses(out)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    out = tmp_path / "run"
    # lr 1e30 sends every weight to ~1e30 in one step; the next forward pass overflows to NaN. Checkpoints are
    # asked for at every step, so a trainer that saved before checking would write the bad weights.
    with pytest.raises(TrainError) as raised:
        train(tiny(), quick(text_file, lr=1e30, warmup_steps=0, save_interval=1), out, **QUIET)
    message = str(raised.value)
    assert "diverged at step" in message and "last good checkpoint (step" in message and "\n" not in message
    step = json.loads((out / "config.json").read_text())["step"]
    assert f"(step {step})" in message and step <= 1
    assert all(torch.isfinite(w).all() for w in weights(out).values())
    assert all(r["val_loss"] is None or math.isfinite(r["val_loss"]) for r in metrics(out))
    with pytest.raises(TrainError, match="diverged"):  # the kept checkpoint resumes (and diverges again)
        train(None, None, out, resume=True, **QUIET)


def test_metrics_record_tokens_memory_bpb_and_plot_overlays_runs(text_file, tmp_path, capsys):
    from tinyformer.cli import main

    for name, lr in (("slow", 1e-3), ("fast", 3e-3)):
        train(tiny(), quick(text_file, lr=lr, max_steps=10, eval_interval=5, log_interval=5), tmp_path / name,
              **QUIET)
    records = metrics(tmp_path / "fast")
    assert [r["tokens"] for r in records] == [0, 5 * 8 * 16, 10 * 8 * 16]  # step x batch x context
    assert all(r["peak_rss_mb"] > 10 for r in records)
    assert all(r["lr"] > 0 for r in records) and records[-1]["tokens_per_s"] > 0
    # ASCII text, one character per token: bits per byte is the loss in bits.
    assert records[-1]["val_bpb"] == pytest.approx(records[-1]["val_loss"] / math.log(2), rel=1e-12)
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "slow"), str(tmp_path / "fast"), "--x", "tokens", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"tinyformer plot: error: {tmp_path} is not a training run: no metrics.jsonl in it"
    assert not (tmp_path / "bad.png").exists()
