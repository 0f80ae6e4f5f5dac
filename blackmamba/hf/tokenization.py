"""The tokenizer ``AutoTokenizer`` gives a BlackMamba checkpoint folder that carries no transformers tokenizer
files: the folder's own ``tokenizer.json``, else the GPT-NeoX-20B tokenizer of the released models (from
:mod:`blackmamba.tokenizer`, no hub access), as every other command of this package chooses it.

``<|endoftext|>`` (id 0 in both) is BOS, EOS and padding, and padding goes on the left, as generation from a
recurrent state needs. A folder written by transformers (with ``tokenizer_config.json``) loads as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from blackmamba.tokenizer import eos_token_id, load_tokenizer

from .configuration_blackmamba import BlackMambaHFConfig

EOS = "<|endoftext|>"


class BlackMambaTokenizer(PreTrainedTokenizerFast):
    """A fast tokenizer over the checkpoint's ``tokenizer.json`` or GPT-NeoX-20B (see the module docstring)."""

    padding_side = "left"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir() or (path / "tokenizer_config.json").is_file():
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        config = BlackMambaHFConfig.from_pretrained(path)
        return cls.for_tokenizer(load_tokenizer(path, config.vocab_size), name_or_path=str(path))

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> BlackMambaTokenizer:
        """Wrap a ``tokenizers.Tokenizer`` (as :mod:`blackmamba.tokenizer` returns them)."""
        specials = {}
        if eos_token_id(tokenizer) is not None:
            specials = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}
        return cls(tokenizer_object=tokenizer, padding_side="left", **specials, **kwargs)


__all__ = ["BlackMambaTokenizer"]
