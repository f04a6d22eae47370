"""The tinyformer command end to end, in-process: train -> generate -> inspect -> eval, and bad input."""
import json

import pytest
import torch

from tinyformer.cli import main

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", "--data", str(data), "--preset", "tiny", "--d-model", "32", "--n-layers", "2",
                     "--context-length", "32", "--batch-size", "8", "--max-steps", "30", "--eval-interval", "15",
                     "--eval-iters", "2", "--warmup-steps", "5", "--out", str(out), "--json"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return data, out


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for command in ("train", "generate", "inspect", "eval", "export", "convert"):
        assert command in out


def test_train_flags_cover_every_config_field(capsys):
    from dataclasses import fields

    from tinyformer.model import ModelConfig
    from tinyformer.train import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for f in list(fields(ModelConfig)) + list(fields(TrainConfig)):
        if f.name != "vocab_size":
            assert "--" + f.name.replace("_", "-") in out


def test_train_wrote_a_checkpoint_with_its_settings(trained):
    _, out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["d_model"] == 32 and config["train"]["max_steps"] == 30 and config["step"] == 30
    assert (out / "metrics.jsonl").is_file() and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_generate_json(trained, capsys):
    _, out = trained
    code, stdout, _ = _run(capsys, "generate", str(out), "--prompt", "To be", "--max-new-tokens", "12",
                           "--temperature", "0", "--json", "--logprobs", "2")
    result = json.loads(stdout)
    assert code == 0 and len(result["token_ids"]) == 12 and len(result["logprobs"]) == 12
    assert len(result["top_logprobs"][0]) == 2


def test_generate_stream_prints_prompt_and_text(trained, capsys):
    _, out = trained
    code, stdout, _ = _run(capsys, "generate", str(out), "--prompt", "To be", "--max-new-tokens", "10",
                           "--temperature", "0", "--stream")
    _, plain, _ = _run(capsys, "generate", str(out), "--prompt", "To be", "--max-new-tokens", "10",
                       "--temperature", "0")
    assert code == 0 and stdout == plain and stdout.startswith("To be")


def test_generate_trace_prints_a_table(trained, capsys):
    _, out = trained
    code, stdout, _ = _run(capsys, "generate", str(out), "--prompt", "To", "--max-new-tokens", "3",
                           "--temperature", "0", "--trace")
    assert code == 0 and "top candidates" in stdout and len(stdout.splitlines()) >= 6


def test_inspect_counts_parameters(trained, capsys):
    _, out = trained
    code, stdout, _ = _run(capsys, "inspect", str(out), "--json", "--cache-batch", "2", "--cache-length", "10")
    info = json.loads(stdout)
    assert code == 0 and sum(info["modules"].values()) == info["parameters"]
    assert info["state_dict"]["tok_emb.weight"] == [info["model"]["vocab_size"], 32]
    assert info["kv_cache"]["bytes"] == 2 * 2 * 4 * 8 * 10 * 2 * 4


def test_eval_reports_bits_per_byte(trained, capsys):
    data, out = trained
    code, stdout, _ = _run(capsys, "eval", str(out), "--data", str(data), "--json")
    info = json.loads(stdout)
    assert code == 0 and info["tokens"] > 1000 and 0 < info["bits_per_byte"] < 8


@pytest.mark.parametrize("argv, message", [
    (["generate", "{out}", "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "{out}", "--prompt", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "{out}", "--prompt", "x", "--top-k", "-1"], "top_k"),
    (["generate", "{out}", "--prompt", "x", "--max-new-tokens", "-1"], "max_new_tokens"),
    (["generate", "{out}", "--prompt", ""], "prompt 0 is empty"),
    (["generate", "{root}/missing", "--prompt", "x"], "does not exist"),
    (["train", "--data", "{root}/missing.txt", "--out", "{root}/new"], "does not exist"),
    (["train", "--data", "{root}/empty.txt", "--out", "{root}/new"], "empty"),
    (["train", "--preset", "huge", "--out", "{root}/new"], "unknown preset 'huge'"),
    (["train", "--tokenizer", "words", "--out", "{root}/new"], "unknown tokenizer 'words'"),
    (["train", "--data", "{data}", "--out", "{out}"], "already holds a checkpoint"),
])
def test_bad_input_is_one_clear_line_and_leaves_the_checkpoint_alone(trained, capsys, argv, message):
    data, out = trained
    root = out.parent
    (root / "empty.txt").write_text("")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = [a.format(out=out, root=root, data=data) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and message in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_corrupted_checkpoint_is_one_clear_line(trained, capsys, tmp_path):
    _, out = trained
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in out.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    weights = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[:100])
    code, _, err = _run(capsys, "generate", str(broken), "--prompt", "x")
    assert code == 1 and "corrupted or truncated" in err and len(err.strip().splitlines()) == 1


def test_generate_from_token_ids(trained, capsys):
    _, out = trained
    code, stdout, _ = _run(capsys, "generate", str(out), "--prompt", "To be", "--max-new-tokens", "6",
                           "--temperature", "0", "--json")
    by_text = json.loads(stdout)
    from tinyformer import load

    ids = ",".join(map(str, load(out, device="cpu").tokenizer.encode("To be")))
    code, stdout, _ = _run(capsys, "generate", str(out), "--prompt-ids", ids, "--max-new-tokens", "6",
                           "--temperature", "0", "--json")
    by_ids = json.loads(stdout)
    assert code == 0 and by_ids["token_ids"] == by_text["token_ids"] and by_ids["text"] is None
    code, _, err = _run(capsys, "generate", str(out), "--prompt-ids", "1,x")
    assert code == 1 and "comma-separated integers" in err
