"""Every command accepts what tinyformer can load: a tutorial .ckpt, a converted checkpoint, an exported HF dir."""
import json

from tinyformer import LanguageModel, get_tokenizer, save_checkpoint
from tinyformer.cli import main

from .helpers import tiny_model
from .test_book_format import write_book


def _json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_book_ckpt_runs_in_every_command_and_converts_exactly(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    write_book(ckpt, V=20000, L=16)  # cl100k ids of plain English text stay below 20000
    options = ["--prompt", "Hello world", "--temperature", "0", "--max-new-tokens", "24", "--json"]
    original = _json(capsys, "generate", str(ckpt), *options)
    assert len(original["token_ids"]) == 24  # past the 16-token context: the window slides
    info = _json(capsys, "inspect", str(ckpt), "--json")
    assert info["model"]["positional"] == "sinusoidal" and info["tokenizer"] == "cl100k_base"
    _json(capsys, "convert", str(ckpt), str(tmp_path / "native"), "--json")
    assert _json(capsys, "generate", str(tmp_path / "native"), *options)["token_ids"] == original["token_ids"]


def test_exported_hf_directory_runs_and_matches(tmp_path, capsys):
    tokenizer = get_tokenizer("bpe:300", "the quick brown fox jumps over the lazy dog. " * 50)
    lm = LanguageModel(tiny_model("llama-tiny", vocab_size=tokenizer.vocab_size), tokenizer)
    save_checkpoint(tmp_path / "ours", lm.model, tokenizer)
    _json(capsys, "export", str(tmp_path / "ours"), str(tmp_path / "hf"), "--json")
    options = ["--prompt", "the quick", "--temperature", "0", "--max-new-tokens", "12", "--json"]
    ours = _json(capsys, "generate", str(tmp_path / "ours"), *options)
    theirs = _json(capsys, "generate", str(tmp_path / "hf"), *options)
    assert ours["token_ids"] == theirs["token_ids"] and ours["text"] == theirs["text"]
    info = _json(capsys, "inspect", str(tmp_path / "hf"), "--json")
    assert info["parameters"] == lm.model.num_parameters()


def test_export_refusal_is_one_line(tmp_path, capsys):
    tokenizer = get_tokenizer("char", "abc")
    save_checkpoint(tmp_path / "book", tiny_model("book", vocab_size=tokenizer.vocab_size), tokenizer)
    assert main(["export", str(tmp_path / "book"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert "sinusoidal" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
