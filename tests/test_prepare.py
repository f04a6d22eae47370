"""`tinyformer prepare`: parallel chunked tokenization into memory-mapped files, and training from them."""
import json

import numpy as np
import pytest
import torch

from tinyformer.cli import main
from tinyformer.data import DataError, TokenData, load_prepared, prepare
from tinyformer.tokenizers import load_tokenizer
from tinyformer.train import train

from .test_train import TEXT, quick, tiny

QUIET = dict(progress=False, log=None)


@pytest.fixture
def corpus(tmp_path):
    lines = [f"{i}: {TEXT.strip()} {'é' * (i % 3)}\n" for i in range(400)]  # ~40 KB, some 2-byte characters
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("spec", ["char", "bpe:300"])
def test_prepare_in_chunks_equals_encoding_whole(spec, corpus, tmp_path):
    header = prepare(corpus, spec, tmp_path / "prep", chunk_bytes=2048, workers=2, progress=False)  # ~20 chunks
    text = corpus.read_text("utf-8")
    raw = corpus.read_bytes()
    cut = header["split_at_byte"]
    assert raw[cut - 1:cut] == b"\n" and abs(cut - 0.9 * len(raw)) < 200  # the held-out tail starts at a line
    tokenizer = load_tokenizer(tmp_path / "prep", header["tokenizer"])
    train_ids = np.fromfile(tmp_path / "prep" / "train.bin", dtype=header["dtype"])
    val_ids = np.fromfile(tmp_path / "prep" / "val.bin", dtype=header["dtype"])
    assert header["dtype"] == "uint16"
    # Byte-level BPE pre-splits at the newline ending each chunk, so even BPE ids match encoding the text whole.
    assert train_ids.tolist() == tokenizer.encode(raw[:cut].decode("utf-8"))
    assert val_ids.tolist() == tokenizer.encode(raw[cut:].decode("utf-8"))
    assert header["train_tokens"] == len(train_ids) and header["val_bytes"] == len(raw) - cut
    assert tokenizer.decode(train_ids.tolist()) + tokenizer.decode(val_ids.tolist()) == text


def test_train_reads_the_memory_mapped_corpus(corpus, tmp_path, capsys):
    assert main(["prepare", "--data", str(corpus), "--out", str(tmp_path / "prep"), "--quiet", "--workers", "1"]) == 0
    assert "held-out tokens (uint16)" in capsys.readouterr().out
    data, _, _ = load_prepared(tmp_path / "prep", 16)
    assert isinstance(data.train, np.memmap)  # not loaded: windows are read from the file
    x, y = data.batch("train", 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.long
    summary = train(tiny(), quick(tmp_path / "prep", max_steps=30, eval_interval=30), tmp_path / "run", **QUIET)
    initial = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["val_loss"]
    assert summary["val_loss"] < initial - 0.5  # it learns (2.82 measured after 30 steps)
    resumed = train(None, None, tmp_path / "run", resume=True, **QUIET)  # the saved path is the prepared directory
    assert resumed["steps"] == 30


def test_prepare_bad_input_is_one_line(tmp_path, capsys):
    assert main(["prepare", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "p")]) == 1
    assert capsys.readouterr().err.strip() == (f"tinyformer prepare: error: prepare takes one text file "
                                               f"(concatenate several first); {tmp_path / 'nope.txt'} is not a file")
    with pytest.raises(DataError, match="not a valid prepared corpus"):
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "prepared.json").write_text("{}")
        load_prepared(tmp_path / "broken", 16)
