import pytest

from blackmamba.tokenizer import NEOX_SIZE, TokenizerError, load_tokenizer, neox_tokenizer, train_bpe


def test_neox_tokenizer_known_ids():
    tok = neox_tokenizer()
    assert tok.get_vocab_size() == NEOX_SIZE == 50277
    assert tok.encode("Hello, I am").ids == [12092, 13, 309, 717]
    assert tok.encode("Hello world").ids == [12092, 1533]
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.decode(tok.encode("Zyphra's BlackMamba!").ids) == "Zyphra's BlackMamba!"


def test_load_tokenizer_fallbacks(tmp_path):
    assert load_tokenizer(tmp_path, 50304).get_vocab_size() == NEOX_SIZE
    with pytest.raises(TokenizerError, match="too small"):
        load_tokenizer(tmp_path, 4096)
    tok = train_bpe(["to be or not to be, that is the question"] * 20, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path, 300).get_vocab_size() == tok.get_vocab_size()


def test_train_bpe_round_trips_text():
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate."
    tok = train_bpe([text] * 10, 300)
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.decode(tok.encode(text).ids) == text
