"""Hugging Face Marian interop: random MarianMTModel directories built locally with transformers (never downloaded)
load into tinyformer's Seq2Seq with transformers' logits and tokens (greedy and beam); Marian's sentencepiece
tokenizer encodes as transformers' MarianTokenizer; seq2seq checkpoints export back to a MarianMTModel directory."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")
from transformers import MarianConfig, MarianMTModel, MarianTokenizer  # noqa: E402

import tinyformer  # noqa: E402
from tinyformer import CheckpointError  # noqa: E402
from tinyformer.checkpoint import save_checkpoint  # noqa: E402
from tinyformer.interop import convert  # noqa: E402
from tinyformer.interop.hf import export_hf, load_hf  # noqa: E402
from tinyformer.tokenizers import SentencePieceTokenizer  # noqa: E402

from .helpers import assert_close_scaled, seq2seq_lm  # noqa: E402

transformers.logging.disable_progress_bar()
logging.getLogger("transformers").setLevel(logging.ERROR)

# d_model / heads / layers / ffn / activation / scaling / vocabularies differ between cases; "bin" is a weights-only
# pytorch_model.bin instead of model.safetensors
CASES = {
    "swish-scaled": dict(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2,
                         decoder_layers=3, encoder_ffn_dim=64, decoder_ffn_dim=64, activation_function="swish",
                         scale_embedding=True),
    "gelu-unscaled-bin": dict(d_model=24, encoder_attention_heads=3, decoder_attention_heads=3, encoder_layers=3,
                              decoder_layers=1, encoder_ffn_dim=40, decoder_ffn_dim=40, activation_function="gelu",
                              scale_embedding=False),
    "relu-separate-vocab": dict(d_model=16, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=1,
                                decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48, activation_function="relu",
                                scale_embedding=True, share_encoder_decoder_embeddings=False, decoder_vocab_size=75),
    "untied-head": dict(d_model=32, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=2,
                        decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32, activation_function="swish",
                        scale_embedding=True, tie_word_embeddings=False),
}
VOCAB, PAD, EOS = 60, 59, 0


def marian(seed, **config):
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=PAD, decoder_start_token_id=PAD,
                eos_token_id=EOS, forced_eos_token_id=EOS, dropout=0.0, init_std=0.3)
    model = MarianMTModel(MarianConfig(**{**base, **config})).eval()
    with torch.no_grad():  # a non-zero output bias, so a dropped final_logits_bias shows
        model.final_logits_bias.normal_(0, 1.0)
    return model


def save(model, directory, as_bin=False):
    if as_bin:
        directory.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        torch.save(state, directory / "pytorch_model.bin")  # every tied copy, as old opus-mt files hold them
    else:
        model.save_pretrained(directory)


def sources(seed, vocab, lengths=(7, 4, 9)):
    """Right-padded sources ending with <eos>, and their mask."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, vocab - 1, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]
    ids = torch.full((len(rows), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return rows, ids, mask


def hf_tokens(output, start=PAD):
    """transformers' generate output -> per row the tokens after the start token, up to (not including) <eos>."""
    rows = []
    for row in output.tolist():
        assert row[0] == start
        row = row[1:]
        rows.append(row[:row.index(EOS)] if EOS in row else row)
    return rows


@pytest.mark.parametrize("case", list(CASES))
def test_marian_matches_transformers(tmp_path, case):
    theirs = marian(40 + list(CASES).index(case), **CASES[case])
    save(theirs, tmp_path, as_bin=case.endswith("bin"))
    lm = tinyformer.load(tmp_path, device="cpu")
    assert lm.is_seq2seq and lm.model.config.decoder_start_id == PAD
    target_vocab = CASES[case].get("decoder_vocab_size", VOCAB)
    _, ids, mask = sources(1, VOCAB)
    decoder_ids = torch.randint(1, target_vocab, (3, 6), generator=torch.Generator().manual_seed(2))
    decoder_ids[:, 0] = PAD if target_vocab > PAD else 1
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = lm.model(decoder_ids, source_ids=ids, source_mask=mask)
    assert expected.std() > 0.5, "logits too flat to test anything"
    # seen: < 2e-6 relative; a missing final_logits_bias, embedding scale, position layout or a swapped norm moves
    # logits by 1e-1 relative or more
    assert_close_scaled(got, expected, rel=1e-5)
    if target_vocab <= PAD:
        return  # a decoder vocabulary without <pad> cannot start from it; the logits above cover this layout
    rows, ids, mask = sources(3, VOCAB, lengths=(6, 10, 3, 8))
    for beams in (1, 4):
        out = theirs.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False, max_new_tokens=12)
        ours = lm.generate(rows, max_new_tokens=12, num_beams=beams, temperature=0)
        assert ours == hf_tokens(out), f"num_beams={beams}"
        assert any(len(r) == 11 for r in ours)  # some row ran to the limit, so the forced <eos> was exercised


def test_suppressed_pad_and_forced_eos_follow_the_config(tmp_path):
    theirs = marian(50, **CASES["swish-scaled"])
    # bias <pad> to win every step: only bad_words_ids keeps it out, as in opus-mt configs
    with torch.no_grad():
        theirs.final_logits_bias[0, PAD] = 50.0
    theirs.generation_config.bad_words_ids = [[PAD]]  # read from generation_config.json here
    theirs.save_pretrained(tmp_path)
    lm = tinyformer.load(tmp_path, device="cpu")
    assert lm.generation_defaults == {"stop_token_ids": [EOS], "suppress_token_ids": [PAD], "forced_eos_token_id": EOS}
    rows, ids, mask = sources(4, VOCAB)
    for beams in (1, 3):
        out = theirs.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False, max_new_tokens=9)
        ours = lm.generate(rows, max_new_tokens=9, num_beams=beams, temperature=0)
        assert ours == hf_tokens(out) and not any(PAD in r for r in ours)
    # without the ban <pad> wins: the processor is what keeps it out
    assert lm.generate(rows[0], max_new_tokens=3, temperature=0, suppress_token_ids=[])[0] == PAD


# ----------------------------------------------------------------------------------------------------- tokenizer

LINES = ["the cat sat on the mat .", "a dog ran in the park !", "we are happy here .", "il est grand et fort .",
         "nous sommes là , mes amis .", "le chat dort sur le tapis .", "je suis content de vous voir ."]


def sentencepiece_files(directory, separate=False):
    """A tiny source.spm / target.spm pair trained here and Marian's vocab.json over both (specials first and
    <pad> last, as opus-mt lays them out); with separate, target_vocab.json holds only the target pieces."""
    directory.mkdir(parents=True, exist_ok=True)
    for side, lines in (("source", LINES[3:]), ("target", LINES[:3])):
        text = directory / f"{side}.txt"
        text.write_text("\n".join(lines * 5) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(input=str(text), model_prefix=str(directory / side),
                                                 vocab_size=30, model_type="unigram", character_coverage=1.0,
                                                 hard_vocab_limit=False, minloglevel=2)
        (directory / f"{side}.model").rename(directory / f"{side}.spm")
        text.unlink()

    def pieces(side):
        sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / f"{side}.spm"))
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i) and not sp.is_unknown(i)]

    def vocab(words):
        v = {"</s>": 0, "<unk>": 1}
        for w in words:
            v.setdefault(w, len(v))
        v[">>fra<<"] = len(v)
        v["<pad>"] = len(v)
        return v

    src, tgt = pieces("source"), pieces("target")
    (directory / "vocab.json").write_text(json.dumps(vocab(src + ([] if separate else tgt))), encoding="utf-8")
    if separate:
        (directory / "target_vocab.json").write_text(json.dumps(vocab(tgt)), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer",
                                                                 "separate_vocabs": separate}), encoding="utf-8")
    return directory


TEXTS = ["the cat sat on the mat .", "le chat est là !", ">>fra<< nous sommes content", "  zebra Ünïcode 农夫  ",
         "a", "dog.park!"]


@pytest.mark.parametrize("separate", [False, True])
def test_sentencepiece_tokenizer_matches_marian_tokenizer(tmp_path, separate):
    d = sentencepiece_files(tmp_path, separate)
    theirs = MarianTokenizer(str(d / "source.spm"), str(d / "target.spm"), str(d / "vocab.json"),
                             target_vocab_file=str(d / "target_vocab.json") if separate else None,
                             separate_vocabs=separate)
    target_vocab = "target_vocab.json" if separate else "vocab.json"
    source = SentencePieceTokenizer.from_files(d / "source.spm", d / "vocab.json")
    target = SentencePieceTokenizer.from_files(d / "target.spm", d / target_vocab)
    for text in TEXTS:
        want = theirs(text).input_ids
        assert source.encode(text) + [source.eos_id] == want, text
        want_target = theirs(text_target=text).input_ids
        assert target.encode(text) + [target.eos_id] == want_target, text
        assert target.decode(want_target) == theirs.decode(want_target, skip_special_tokens=True)
    assert 1 in source.encode("zebra Q")  # unknown pieces map to <unk>, through vocab.json
    assert source.pad_id == source.bos_id == len(json.loads((d / "vocab.json").read_text())) - 1


def marian_dir(tmp_path, **config):
    d = sentencepiece_files(tmp_path / "marian")
    vocab = len(json.loads((d / "vocab.json").read_text()))
    pad = vocab - 1
    theirs = marian(60, **{**CASES["swish-scaled"], "vocab_size": vocab, "pad_token_id": pad,
                           "decoder_start_token_id": pad, **config})
    theirs.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())  # opus-mt configs ban <pad> in config.json
    (d / "config.json").write_text(json.dumps({**config, "bad_words_ids": [[pad]]}))
    return d, MarianMTModel.from_pretrained(d).eval()


def test_text_in_text_out_and_convert(tmp_path):
    d, theirs = marian_dir(tmp_path)
    lm = tinyformer.load(d, device="cpu")
    assert isinstance(lm.source_tokenizer, SentencePieceTokenizer) and lm.source_tokenizer.file_name == "source.spm"
    hf_tok = MarianTokenizer.from_pretrained(d)
    texts = ["le chat est là .", "nous sommes content"]
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    want = hf_tok.batch_decode(theirs.generate(**batch, num_beams=3, max_new_tokens=8), skip_special_tokens=True)
    assert lm.generate(texts, num_beams=3, max_new_tokens=8) == want
    greedy = lm.generate(texts, max_new_tokens=8, temperature=0)
    out = convert(d, tmp_path / "native")
    native = tinyformer.load(out, device="cpu")
    assert native.generation_defaults == lm.generation_defaults
    assert native.generate(texts, max_new_tokens=8, temperature=0) == greedy
    assert native.generate(texts, num_beams=3, max_new_tokens=8) == want


# ---------------------------------------------------------------------------------------------------------- export

def assert_exported_equal(lm, out, theirs_kwargs=None):
    theirs, info = MarianMTModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    c = lm.model.config
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, c.source_vocab_size, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    decoder_ids = torch.randint(3, c.vocab_size, (2, 5), generator=g)
    with torch.no_grad():
        expected = theirs.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = lm.model(decoder_ids, source_ids=ids, source_mask=mask)
    assert_close_scaled(got, expected, rel=1e-5)
    return theirs


@pytest.mark.parametrize("overrides", [dict(), dict(share_embeddings=False, src_vocab_size=30, tie_embeddings=False,
                                                    mlp="gelu", gelu_approximate="none")])
def test_seq2seq_checkpoint_exports_to_marian(tmp_path, overrides):
    lm = seq2seq_lm(3, **{**dict(positional="sinusoidal", sinusoidal_layout="halves", norm_position="post",
                               final_norm=False, lm_head_bias=True, mlp="silu"), **overrides})
    with torch.no_grad():
        lm.model.lm_head.bias.normal_(0, 1.0)
    save_checkpoint(tmp_path / "ckpt", lm.model, lm.tokenizer)
    assert export_hf(lm.model, lm.tokenizer, tmp_path / "out") == [
        "tokenizer char has no Marian tokenizer files; none written (token ids are unchanged; encode text with "
        "tinyformer's tokenizer)"]
    theirs = assert_exported_equal(lm, tmp_path / "out")
    # and transformers writes the same tokens we do, from the decoder start our generate() uses
    source = [lm.tokenizer.encode("je suis content .") + [lm.tokenizer.eos_id]]
    out = theirs.generate(input_ids=torch.tensor(source), num_beams=1, do_sample=False, max_new_tokens=10)
    assert out[0, 0] == lm.tokenizer.bos_id
    assert [t for t in out[0, 1:].tolist() if t != lm.tokenizer.eos_id][:10] == lm.generate(source, max_new_tokens=10,
                                                                                         temperature=0)[0]
    again = load_hf(tmp_path / "out")[0]
    assert again.config.to_dict() == {**lm.model.config.to_dict(), "decoder_start_id": lm.tokenizer.bos_id,
                                      "dropout": again.config.dropout}


def test_marian_round_trip_keeps_tokenizers_and_weights(tmp_path):
    d, _ = marian_dir(tmp_path)
    out = tmp_path / "back"
    lm = tinyformer.load(d, device="cpu")
    export_hf(lm.model, lm.tokenizer, out, source_tokenizer=lm.source_tokenizer, generation=lm.generation_defaults)
    assert {"source.spm", "target.spm", "vocab.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    original, back = load_file(d / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert json.loads((out / "config.json").read_text())["bad_words_ids"] == [[lm.tokenizer.pad_id]]
    again = tinyformer.load(out, device="cpu")
    assert again.generate("le chat", max_new_tokens=6, num_beams=2) == lm.generate("le chat", max_new_tokens=6,
                                                                                  num_beams=2)
    assert MarianTokenizer.from_pretrained(out)("le chat").input_ids == lm.source_tokenizer.encode("le chat") + [0]


@pytest.mark.parametrize("setting, message", [
    (dict(norm_position="pre"), "norm_position 'pre'"),
    (dict(positional="rope"), "positional 'rope'"),
    (dict(sinusoidal_layout="interleaved"), "sinusoidal_layout 'interleaved'"),
    (dict(norm="rmsnorm"), "norm 'rmsnorm'"),
    (dict(mlp="swiglu"), "mlp 'swiglu'"),
    (dict(positional="learned"), "positional 'learned'"),
    (dict(final_norm=True), "final_norm=True"),
])
def test_export_refuses_what_marian_cannot_hold(tmp_path, setting, message):
    base = dict(positional="sinusoidal", sinusoidal_layout="halves", norm_position="post", final_norm=False)
    lm = seq2seq_lm(0, **{**base, **setting})
    with pytest.raises(CheckpointError, match=f"^cannot export to Marian: {message}"):
        export_hf(lm.model, lm.tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_marian_configs_that_do_not_map_are_refused(tmp_path):
    theirs = marian(0, **CASES["swish-scaled"])
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in ((dict(decoder_ffn_dim=16), "encoder_ffn_dim 64 differs from decoder_ffn_dim 16"),
                            (dict(normalize_before=True), "normalize_before=True is not Marian's layout"),
                            (dict(activation_function="tanh"), "activation_function 'tanh' is not supported")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            tinyformer.load(tmp_path, device="cpu")
