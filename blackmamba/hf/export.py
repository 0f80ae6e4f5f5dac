"""Write a transformers folder (weights, config with ``auto_map``, modeling files, tokenizer, model card) from
any BlackMamba checkpoint: the released layout, ours, or a transformers folder.

The folder is built beside the destination and swapped in with one rename (:mod:`blackmamba.atomic_dir`), so
a crash leaves either the previous version or the new one. A destination holding files that an export does
not write is refused unless ``overwrite``.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import string
from pathlib import Path

import torch
import transformers

from .. import __version__, atomic_dir
from ..errors import BlackMambaError
from .modeling_blackmamba import BlackMambaForCausalLM, native_checkpoint_dir
from .tokenization import BlackMambaTokenizer

CARD_TEMPLATE = Path(__file__).with_name("MODEL_CARD.md")
# What an export writes: the names its destination may hold for it to be replaced without ``overwrite``.
EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "configuration_blackmamba.py",
        "modeling_blackmamba.py",
        "cache_blackmamba.py",
        "README.md",
    }
)
_SHARD = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")


class ExportError(BlackMambaError, RuntimeError):
    """The export cannot write its destination; the message says why."""


def _owned(name: str) -> bool:
    return name in EXPORT_FILES or _SHARD.fullmatch(name) is not None


def model_card(model: BlackMambaForCausalLM, name: str, source: str, layout: str, tokenizer: str) -> str:
    """The filled-in model card (``MODEL_CARD.md``) for ``model``."""
    native = model.native
    c = native.config
    pattern = c.layer_pattern
    return string.Template(CARD_TEMPLATE.read_text()).substitute(
        name=name,
        source=source,
        layout=layout,
        blackmamba_version=__version__,
        transformers_version=transformers.__version__,
        date=datetime.date.today().isoformat(),
        dtype=str(native.dtype).removeprefix("torch."),
        parameters=f"{native.num_parameters():,}",
        active=f"{native.num_parameters(active=True):,}",
        n_layers=c.n_layers,
        n_mamba=pattern.count("mamba"),
        n_moe=pattern.count("moe"),
        d_model=c.d_model,
        d_state=c.d_state,
        d_conv=c.d_conv,
        expand=c.expand,
        dt_rank=c.dt_rank,
        n_experts=c.n_experts,
        d_ff=c.d_ff,
        moe_activation=c.moe_activation,
        vocab_size=f"{c.vocab_size:,}",
        tokenizer_vocab=f"{c.tokenizer_vocab_size or c.vocab_size:,}",
        tokenizer=tokenizer,
        max_seq_len=f"{c.max_seq_len:,}",
    )


def _check_target(target: Path, overwrite: bool) -> None:
    if os.path.islink(target) or (os.path.lexists(target) and not target.is_dir()):
        raise ExportError(f"{target} exists and is not a folder; refusing to replace it")
    if target.is_dir() and not overwrite and not atomic_dir.is_owned(target, _owned):
        raise ExportError(
            f"{target} holds files that an export does not write; choose an empty or new destination, "
            "or pass overwrite=True"
        )


def export(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: torch.dtype | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the transformers folder ``dst`` for the checkpoint ``src`` (weights in ``dtype``, the stored one by
    default; ``name`` for the model card, the folder's name by default). Returns ``dst``."""
    target = Path(dst)
    _check_target(target, overwrite)
    layout = "transformers" if native_checkpoint_dir(src) is None else _layout(Path(src))
    model = BlackMambaForCausalLM.from_pretrained(src, dtype=dtype)
    tokenizer = BlackMambaTokenizer.from_pretrained(src)
    tokenizer_name = "its own tokenizer.json" if (Path(src) / "tokenizer.json").is_file() else "GPT-NeoX-20B"
    card = model_card(model, name or target.name, str(src), layout, tokenizer_name)
    atomic_dir.make_parents(target.parent)
    tmp = atomic_dir.temp_dir(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card)
        for file in tmp.iterdir():
            fd = os.open(file, os.O_RDONLY)
            try:
                atomic_dir.sync_file(fd)
            finally:
                os.close(fd)
        atomic_dir.sync_dir(tmp)
        _check_target(target, overwrite)  # again: something may have appeared while the weights were written
        old = atomic_dir.swap_in(tmp, target)
        atomic_dir.release(tmp)
        atomic_dir.sync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        atomic_dir.release(tmp)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        atomic_dir.release(old)
    return target


def _layout(path: Path) -> str:
    return (
        "released" if (path / "pytorch_model.bin").is_file() and not (path / "model.safetensors").is_file() else "ours"
    )


__all__ = ["EXPORT_FILES", "ExportError", "export", "model_card"]
