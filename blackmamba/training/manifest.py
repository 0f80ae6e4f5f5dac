"""The dataset manifest (``manifest.json``): its schema, and the checks every reader runs before trusting it.

A manifest is read as untrusted input. Every field ``prepare`` writes must be present with its type; shard
paths must resolve inside the dataset folder (no ``../``, no absolute path, no symlink out of it); each shard
must exist as a regular file of exactly ``tokens * itemsize`` bytes. Any failure is one :class:`DataError`
naming the file and the field. ``max_token_id`` (per split and per shard) is optional: manifests written
before it existed lack it, and readers compute it from the shards instead.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BlackMambaError

MANIFEST = "manifest.json"
FORMAT = "blackmamba-tokens-v1"
DTYPES = ("uint16", "uint32")
MAX_MANIFEST_BYTES = 512 * 2**20


class DataError(BlackMambaError, ValueError):
    """Bad data input: the message names the source or file."""


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``; DataError naming the file when it is missing, too large or not JSON."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise DataError(f"{path} is {st.st_size:,} bytes, more than a manifest can be ({MAX_MANIFEST_BYTES:,})")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path.parent} has no {path.name}: run `blackmamba data prepare` first") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to be a manifest") from None


def is_manifest(path: Path) -> bool:
    """A cheap recognition test: ``path`` holds a JSON object whose ``format`` is ours."""
    try:
        data = read_json(path)
    except DataError:
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


class _Fields:
    """Typed access to one JSON object, with errors that name the file and the field's dotted path."""

    def __init__(self, path: Path, data: Any, where: str = "") -> None:
        self.path, self.data, self.where = path, data, where
        if not isinstance(data, dict):
            self.fail(where or "the top level", f"must be a JSON object, got {_kind(data)}")

    def fail(self, field: str, message: str) -> None:
        raise DataError(f"{self.path}: field {field!r} {message}")

    def name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, required: bool = True) -> Any:
        if key not in self.data:
            if required:
                self.fail(self.name(key), "is missing")
            return None
        return self.data[key]

    def int(self, key: str, low: int = 0, high: int | None = None, required: bool = True) -> int | None:
        value = self.get(key, required)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(self.name(key), f"must be an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            self.fail(self.name(key), f"must be {bound}, got {value}")
        return value

    def str(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            self.fail(self.name(key), f"must be a string, got {_kind(value)}")
        return value

    def str_list(self, key: str, required: bool = True) -> list[str] | None:
        value = self.get(key, required)
        if value is None and not required:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(self.name(key), f"must be a list of strings, got {_kind(value)}")
        return value

    def child(self, key: str) -> _Fields:
        return _Fields(self.path, self.get(key), self.name(key))


def _kind(value: Any) -> str:
    """A short description of a JSON value for an error message."""
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return repr(value[:40])
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def shard_path(data_dir: Path, name: Any, field: str, manifest: Path) -> Path:
    """The resolved path of a shard named in the manifest; it must stay inside ``data_dir``."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise DataError(f"{manifest}: field {field!r} must be a file name, got {_kind(name)}")
    if os.path.isabs(name):
        raise DataError(f"{manifest}: field {field!r} is an absolute path ({name!r}); shards must be in {data_dir}")
    root = os.path.realpath(data_dir)
    real = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, real]) != root or real == root:
        raise DataError(f"{manifest}: field {field!r} ({name!r}) resolves outside {data_dir}; refused")
    return Path(real)


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The validated manifest of a prepared dataset, with every shard file checked (exists, regular, size)."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    top = _Fields(path, read_json(path))
    fmt = top.str("format")
    if fmt != FORMAT:
        top.fail("format", f"must be {FORMAT!r}, got {fmt!r} (prepare the data again)")
    top.str_list("sources")
    top.str("tokenizer")
    vocab = top.int("vocab_size", low=1, high=2**32)
    top.int("eos_token_id", high=vocab - 1)
    dtype_name = top.str("dtype")
    if dtype_name not in DTYPES:
        top.fail("dtype", f"must be one of {DTYPES}, got {dtype_name!r}")
    dtype = np.dtype(dtype_name)
    if vocab > np.iinfo(dtype).max + 1:
        top.fail("dtype", f"{dtype_name} cannot hold the vocabulary of {vocab} tokens")
    val_fraction = top.get("val_fraction")
    if not isinstance(val_fraction, int | float) or isinstance(val_fraction, bool) or not math.isfinite(val_fraction):
        top.fail("val_fraction", f"must be a number, got {_kind(val_fraction)}")
    splits = top.child("splits")
    if not splits.data:
        top.fail("splits", "holds no split")
    for split in splits.data:
        _check_split(data_dir, splits.child(split), dtype, vocab)
    return top.data


def _check_split(data_dir: Path, split: _Fields, dtype: np.dtype, vocab: int) -> None:
    split.str_list("documents")
    split.str_list("duplicates", required=False)
    recorded = split.int("max_token_id", high=vocab - 1, required=False)
    shards = split.get("shards")
    if not isinstance(shards, list) or not shards:
        split.fail(split.name("shards"), f"must be a non-empty list, got {_kind(shards)}")
    total = 0
    shard_max: list[int | None] = []
    for i, entry in enumerate(shards):
        shard = _Fields(split.path, entry, f"{split.name('shards')}[{i}]")
        tokens = shard.int("tokens")
        shard_max.append(shard.int("max_token_id", high=vocab - 1, required=False))
        file = shard_path(data_dir, shard.get("file"), shard.name("file"), split.path)
        try:
            st = os.stat(file)
        except OSError as e:
            shard.fail(shard.name("file"), f"names {file}, which cannot be read: {e.strerror}")
        if not stat.S_ISREG(st.st_mode):
            shard.fail(shard.name("file"), f"names {file}, which is not a regular file")
        if st.st_size != tokens * dtype.itemsize:
            shard.fail(
                shard.name("file"),
                f"names {file}, which is {st.st_size:,} bytes; {tokens:,} {dtype.name} tokens take "
                f"{tokens * dtype.itemsize:,} (truncated or replaced?)",
            )
        total += tokens
    if split.int("tokens") != total:
        split.fail(split.name("tokens"), f"is {split.data['tokens']}, but its shards hold {total} tokens")
    if recorded is not None and None not in shard_max and recorded != max(shard_max):
        split.fail(split.name("max_token_id"), f"is {recorded}, but its shards record {max(shard_max)}")
