"""Fixtures for the transformers bridge: a tiny random model with a small BPE tokenizer, saved in each layout."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import blackmamba  # noqa: E402
import blackmamba.hf  # noqa: E402, F401  (registers with the Auto classes)
from blackmamba.tokenizer import train_bpe  # noqa: E402

from ..helpers import tiny_model  # noqa: E402

TEXT = "the cat sat on the mat and the dog sat on the log; a bird sang to the cat and the dog. " * 8
VOCAB = 320  # the byte-level BPE below has 300 tokens; ids 300..319 are the embedding's padding rows
TOKENS = 300


@pytest.fixture(scope="package")
def tokenizer():
    return train_bpe([TEXT], TOKENS)


@pytest.fixture(scope="package")
def model():
    return tiny_model(3, vocab_size=VOCAB, tokenizer_vocab_size=TOKENS)


@pytest.fixture(scope="package")
def dirs(model, tokenizer, tmp_path_factory):
    """The model in our layout, the released layout and as transformers writes it (with tokenizer files)."""
    root = tmp_path_factory.mktemp("hf")
    blackmamba.save_pretrained(model, root / "ours", tokenizer=tokenizer)
    blackmamba.save_released(model, root / "released", tokenizer=tokenizer)
    blackmamba.hf.export(root / "ours", root / "hf")
    return {"ours": root / "ours", "released": root / "released", "hf": root / "hf"}
