"""Seq2seq through the one trainer and the CLI: a toy task learned exactly, checkpoints, resume, bad input."""
import json
import random
import re
from pathlib import Path

import pytest
import torch

import tinyformer
from tinyformer.cli import main
from tinyformer.data import PairData, load_pairs
from tinyformer.evaluation import evaluate_translation
from tinyformer.model import ModelConfig
from tinyformer.tokenizers import get_tokenizer
from tinyformer.train import TrainConfig, train

from .test_train import snapshot


def reverse_pairs(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        word = " ".join(rng.choice("abcde") for _ in range(rng.randint(2, 6)))
        lines.append(f"{word}\t{word[::-1]}\n")
    return "".join(lines)


def toy_model(**overrides) -> ModelConfig:
    base = dict(architecture="seq2seq", d_model=48, n_layers=2, n_encoder_layers=2, n_heads=4, d_ff=96,
                context_length=16, dropout=0.0, positional="sinusoidal", mlp="relu", scale_embeddings=True)
    return ModelConfig(**{**base, **overrides})


def toy_train(data, **overrides) -> TrainConfig:
    base = dict(data=str(data), tokenizer="char", max_steps=400, eval_interval=400, batch_tokens=512, lr=3e-3,
                warmup_steps=30, log_interval=50, seed=0)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def reversed_run(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("reverse")
    (root / "pairs.tsv").write_text(reverse_pairs(1000), encoding="utf-8")
    summary = train(toy_model(), toy_train(root / "pairs.tsv"), root / "run", progress=False, log=None)
    return root, summary


def test_a_reversal_task_is_learned_to_exact_match(reversed_run):
    root, summary = reversed_run
    assert summary["val_loss"] < 0.05, summary
    lm = tinyformer.load(root / "run", device="cpu")
    assert lm.is_seq2seq and json.loads((root / "run" / "config.json").read_text())["architecture"] == "seq2seq"
    pairs, _ = load_pairs(str(root / "pairs.tsv"))
    held_out = [p for i, p in enumerate(pairs) if i % 10 == 0][:60]  # val_fraction 0.1: every 10th pair
    for num_beams in (1, 3):
        result = evaluate_translation(lm, held_out, num_beams=num_beams, progress=False)
        assert result["exact_match"] == 1.0, [(s, h) for (s, _), h in zip(held_out, result["hypotheses"])][:5]
        assert result["bleu"] == pytest.approx(100.0) and result["chrf"] == pytest.approx(100.0)


def test_pad_is_ignored_in_the_loss_and_batches_are_bucketed_by_length():
    tokenizer = get_tokenizer("char", "abcdefgh \t")
    pairs = [("a" * n, "b" * (n + 1)) for n in range(1, 21)]
    data = PairData.from_pairs(pairs, tokenizer, val_fraction=0.1, context_length=32, batch_tokens=60)
    inputs, labels = data.collate([data.pairs["train"][0], data.pairs["train"][-1]])
    short = data.pairs["train"][0]
    assert inputs["source_ids"][0].tolist()[:len(short[0]) + 1] == short[0] + [tokenizer.eos_id]
    assert inputs["input_ids"][0, 0] == tokenizer.bos_id and labels[0, len(short[1])] == tokenizer.eos_id
    assert (labels[0, len(short[1]) + 1:] == -100).all()  # padding: ignored, never the pad id
    assert (inputs["source_mask"][0] == (inputs["source_ids"][0] != tokenizer.pad_id).long()).all()
    seen = []
    for bucket in data.batches["train"]:  # batches never exceed batch_tokens, padding included
        longest = max(max(len(s), len(t)) + 1 for s, t in (data.pairs["train"][i] for i in bucket))
        assert len(bucket) * longest <= 60
        seen += bucket
    assert sorted(seen) == list(range(len(data.pairs["train"])))  # every training pair in exactly one batch
    rng = random.Random(0)  # many sentences of each length: sorting by length leaves little padding
    many = [("a" * n, "b" * n) for n in (rng.randint(1, 20) for _ in range(400))]
    data = PairData.from_pairs(many, tokenizer, val_fraction=0.1, context_length=32, batch_tokens=256)
    real = padded = 0
    for i in range(50):
        _, labels = data.batch("train", torch.Generator().manual_seed(i))
        real += int((labels != -100).sum())
        padded += labels.numel()
    assert real / padded > 0.9


def test_resume_continues_exactly_and_separate_tokenizers_round_trip(tmp_path, one_thread):
    (tmp_path / "src.txt").write_text("".join(f"{w}\n" for w in ("le chat", "un chien", "la maison") * 20))
    (tmp_path / "tgt.txt").write_text("".join(f"{w}\n" for w in ("the cat", "a dog", "the house") * 20))
    cfg = toy_train(tmp_path / "src.txt", target_data=str(tmp_path / "tgt.txt"), source_tokenizer="char",
                    max_steps=12, eval_interval=6, warmup_steps=2)
    model = toy_model(dropout=0.1)  # dropout draws from the RNG: resume must restore it
    whole = train(model, cfg, tmp_path / "whole", progress=False, log=None)
    train(model, TrainConfig(**{**cfg.__dict__, "stop_at": 5}), tmp_path / "split", progress=False, log=None)
    resumed = train(None, None, tmp_path / "split", resume=True, progress=False, log=None)
    assert resumed["steps"] == whole["steps"] == 12 and resumed["val_loss"] == whole["val_loss"]
    a = tinyformer.load(tmp_path / "whole", device="cpu")
    b = tinyformer.load(tmp_path / "split", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert not a.model.config.share_embeddings and a.model.src_emb is not None
    assert a.source_tokenizer is not a.tokenizer and "l" in a.source_tokenizer.decode(a.source_tokenizer.encode("le"))
    assert a.generate("le chat", max_new_tokens=5, temperature=0) == b.generate("le chat", max_new_tokens=5,
                                                                                  temperature=0)


# ---------------------------------------------------------------- CLI
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_generate_eval_inspect_and_attention(reversed_run, capsys, tmp_path):
    root, _ = reversed_run
    ckpt = root / "run"
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "a b c", "--prompt", "d e", "--temperature", "0")
    assert code == 0 and "c b a" in out and "e d" in out
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "a b c d", "--stream", "--temperature", "0")
    assert code == 0 and out.strip().endswith("d c b a")
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "a b", "--json", "--num-beams", "3")
    item = json.loads(out)
    assert item["text"] == "b a" and item["finish_reason"] == "eos" and "score" in item
    code, out, _ = run(capsys, "generate", ckpt, "--prompt", "a b c", "--trace", "--temperature", "0", "--json")
    trace = json.loads(out)["trace"]
    assert trace[0]["token"] == "c" and trace[0]["source_attention"][0]["token"] in "abc <eos>"
    (tmp_path / "test.tsv").write_text("a b\tb a\nc d e\te d c\n", encoding="utf-8")
    code, out, _ = run(capsys, "eval", ckpt, "--data", tmp_path / "test.tsv", "--json", "--num-beams", "2")
    result = json.loads(out)
    assert code == 0 and result["exact_match"] == 1.0 and result["chrf"] > 99 and result["pairs"] == 2
    code, out, _ = run(capsys, "inspect", ckpt, "--json")
    info = json.loads(out)
    assert info["cross_attention_cache"]["bytes"] == 2 * 2 * 4 * 12 * 16 * 1 * 4  # layers, heads, hd, S, 1, fp32
    code, out, _ = run(capsys, "attention", ckpt, "--prompt", "a b c", "--out", tmp_path / "attn.png", "--json")
    maps = json.loads(out)
    assert code == 0 and maps["kind"] == "cross" and maps["layers"] == 2 and maps["keys"][-1] == "<eos>"
    assert (tmp_path / "attn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "attention", ckpt, "--prompt", "a b", "--layer", "5", "--out", tmp_path / "x.png")
    assert code == 1 and "layer 5 does not exist; this model has layers 0..1" in err


@pytest.mark.parametrize("content, message", [
    ("le chat\tthe cat\nun chien the dog\n", "line 2 has no tab"),
    ("le chat\tthe cat\n\tthe dog\n", "line 2 has an empty source side"),
    ("le chat\t \n", "line 1 has an empty target side"),
    ("le chat\tthe cat\n" + "x" * 40 + "\ty\n", "the source is 40 tokens \\+ <eos>, longer than the model's "
                                                 "context_length 16"),
])
def test_bad_parallel_data_gets_one_line(tmp_path, capsys, content, message):
    (tmp_path / "pairs.tsv").write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "train", "--arch", "seq2seq", "--data", tmp_path / "pairs.tsv", "--d-model", "16",
                       "--n-heads", "2", "--context-length", "16", "--max-steps", "1", "--out", tmp_path / "run")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_a_gpt_checkpoint_is_not_resumed_as_seq2seq(tmp_path, capsys, one_thread):
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    code, _, _ = run(capsys, "train", "--data", tmp_path / "text.txt", "--d-model", "16", "--n-heads", "2",
                     "--n-layers", "1", "--context-length", "16", "--max-steps", "2", "--eval-iters", "1",
                     "--out", tmp_path / "gpt", "--quiet")
    assert code == 0
    before = snapshot(tmp_path / "gpt")
    (tmp_path / "pairs.tsv").write_text("a\tb\n" * 20)
    code, _, err = run(capsys, "train", "--resume", "--arch", "seq2seq", "--data", tmp_path / "pairs.tsv",
                       "--out", tmp_path / "gpt")
    assert code == 1 and "it holds a gpt model, and this run asks for seq2seq" in err
    assert len(err.strip().splitlines()) == 1 and snapshot(tmp_path / "gpt") == before
    code, _, err = run(capsys, "train", "--arch", "seq2seq", "--out", tmp_path / "other")
    assert code == 1 and "a seq2seq model trains on sentence pairs: give --data pairs.tsv" in err


def test_a_served_seq2seq_checkpoint_answers_concurrent_requests(reversed_run):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import threading

    from tinyformer.server import create_app

    from .server_helpers import RunningServer

    lm = tinyformer.load(reversed_run[0] / "run", device="cpu")
    rng = random.Random(7)
    words = [" ".join(rng.choice("abcde") for _ in range(2 + i % 5)) for i in range(8)]  # 3 to 11 characters
    results = [None] * len(words)
    with RunningServer(create_app(lm, name="reverse")) as server:
        def ask(i):
            results[i] = httpx.post(server.url + "/v1/completions", timeout=30, json={
                "prompt": words[i], "max_tokens": 15, "temperature": 0}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(words))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    # the trained model reverses every source exactly: a request decoding against another's source would not
    assert [r["choices"][0]["text"] for r in results] == [w[::-1] for w in words]
    assert all(r["choices"][0]["finish_reason"] == "stop" for r in results)  # it ended with <eos>
    assert [r["usage"]["prompt_tokens"] for r in results] == [len(w) + 1 for w in words]  # characters + <eos>
