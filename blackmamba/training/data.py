"""Training data: text sources -> token ids in memory-mapped shards with a JSON manifest, and batches.

``prepare`` streams documents (a Shakespeare play, a standard-library module, a text file, a JSONL line)
from the named sources, assigns each document to the train or validation split by a hash of its
name (so no document is split across both), tokenizes with GPT-NeoX-20B or a byte-level BPE trained on
the training split only, and appends the ids, each document followed by the end-of-text token, to
shards of at most ``shard_tokens`` ids (uint16 when the vocabulary fits, else uint32). The same inputs
give byte-identical shards.

``TokenData`` reads the shards back through ``numpy.memmap`` and draws training windows from a seed and
the step number alone, so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..corpora import clean_play, shakespeare_files
from ..tokenizer import neox_tokenizer, train_bpe

MANIFEST = "manifest.json"
BUILTIN_SOURCES = ("shakespeare", "pystdlib")
TEXT_SUFFIXES = (".txt", ".md")


class DataError(ValueError):
    """Bad data input: the message names the source or file."""


@dataclass(frozen=True)
class Document:
    """One unit of the train/validation split: a stable name and a way to read its text."""

    name: str
    read: Callable[[], str]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}): convert it or leave it out") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    text = _read_text(path)
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i + 1} is not valid JSON: {e.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path} line {i + 1} has no string field 'text'")
        yield Document(f"{path}:{i + 1}", lambda t=record["text"]: t)


def _file_documents(path: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    else:
        yield Document(str(path), lambda p=path: _read_text(p))


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def source_documents(source: str) -> list[Document]:
    """The documents of one source: a built-in name, a file, or a folder (searched recursively)."""
    if source == "shakespeare":
        try:
            files = shakespeare_files()
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        return [Document(f"shakespeare:{f.stem}", lambda f=f: clean_play(_read_text(f))) for f in files]
    if source == "pystdlib":
        return [Document(f"pystdlib:{p.name}:{i}", lambda p=p: _read_text(p)) for i, p in enumerate(_stdlib_files())]
    path = Path(source)
    if path.is_file():
        if path.suffix not in (*TEXT_SUFFIXES, ".jsonl"):
            raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .md or .jsonl)")
        return list(_file_documents(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise DataError(f"{path} holds no .txt, .md or .jsonl files")
        return [d for f in files for d in _file_documents(f)]
    raise DataError(f"unknown source {source!r}: not one of {BUILTIN_SOURCES} and no such file or folder")


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: the documents whose name hashes lowest go to validation."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise DataError("the same document appears twice in the sources")
    n_val = 0 if val_fraction == 0 else min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    val = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val], [d for d in docs if d.name in val]


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    dtype = np.dtype(requested)
    if dtype not in (np.dtype("uint16"), np.dtype("uint32")):
        raise DataError(f"token dtype must be uint16 or uint32, got {requested}")
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"a vocabulary of {vocab_size} tokens does not fit in {dtype.name}")
    return dtype


def _write_split(
    docs: list[Document],
    encode: Callable[[str], list[int]],
    eos: int,
    out: Path,
    split: str,
    dtype: np.dtype,
    shard_tokens: int,
) -> list[dict]:
    shards: list[dict] = []
    buffer: list[int] = []

    def flush() -> None:
        name = f"{split}-{len(shards):05d}.bin"
        array = np.asarray(buffer, dtype=dtype)
        array.tofile(out / name)
        shards.append({"file": name, "tokens": int(array.size)})
        buffer.clear()

    for doc in tqdm(docs, desc=f"tokenizing {split}", unit="doc", disable=None):
        buffer.extend(encode(doc.read()))
        buffer.append(eos)
        while len(buffer) >= shard_tokens:
            rest = buffer[shard_tokens:]
            del buffer[shard_tokens:]
            flush()
            buffer.extend(rest)
    if buffer or not shards:
        flush()
    return shards


def prepare(
    sources: list[str],
    out: str | os.PathLike,
    tokenizer: str = "neox",
    val_fraction: float = 0.05,
    dtype: str = "auto",
    shard_tokens: int = 2**26,
) -> dict:
    """Tokenize ``sources`` into ``out`` (shards + manifest.json + tokenizer.json). Returns the manifest."""
    if not sources:
        raise DataError("no sources given")
    docs = [d for s in sources for d in source_documents(s)]
    if not docs:
        raise DataError(f"the sources {sources} hold no documents")
    train_docs, val_docs = split_documents(docs, val_fraction)
    if tokenizer == "neox":
        tok = neox_tokenizer()
    elif tokenizer.startswith("bpe:"):
        try:
            vocab = int(tokenizer[4:])
        except ValueError:
            raise DataError(f"bad tokenizer {tokenizer!r}: use neox or bpe:VOCAB, e.g. bpe:4096") from None
        if vocab < 300:
            raise DataError(f"a BPE vocabulary needs at least 300 tokens (256 bytes + merges), got {vocab}")
        tok = train_bpe((d.read() for d in tqdm(train_docs, desc="training BPE", unit="doc", disable=None)), vocab)
    else:
        raise DataError(f"unknown tokenizer {tokenizer!r}: use neox or bpe:VOCAB")
    vocab_size = tok.get_vocab_size()
    np_dtype = token_dtype(vocab_size, dtype)
    eos = tok.token_to_id("<|endoftext|>")
    if eos is None:
        raise DataError("the tokenizer has no <|endoftext|> token")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.bin"):
        stale.unlink()

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids

    splits = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        if split_docs:
            shards = _write_split(split_docs, encode, eos, out, split, np_dtype, shard_tokens)
            splits[split] = {
                "documents": [d.name for d in split_docs],
                "shards": shards,
                "tokens": sum(s["tokens"] for s in shards),
            }
    if splits.get("train", {}).get("tokens", 0) <= len(train_docs):
        raise DataError(f"the sources {sources} hold no text")
    tok.save(str(out / "tokenizer.json"))
    manifest = {
        "format": "blackmamba-tokens-v1",
        "sources": sources,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "dtype": np_dtype.name,
        "val_fraction": val_fraction,
        "splits": splits,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


class TokenData:
    """Memory-mapped token shards of one split, with deterministic random windows."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train") -> None:
        data_dir = Path(data_dir)
        try:
            manifest = json.loads((data_dir / MANIFEST).read_text())
        except FileNotFoundError:
            raise DataError(f"{data_dir} has no {MANIFEST}: run `blackmamba data prepare` first") from None
        if split not in manifest["splits"]:
            raise DataError(f"{data_dir} has no {split!r} split")
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.eos_token_id: int = manifest["eos_token_id"]
        dtype = np.dtype(manifest["dtype"])
        arrays = [np.memmap(data_dir / s["file"], dtype=dtype, mode="r") for s in manifest["splits"][split]["shards"]]
        self.tokens = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        if self.tokens.size < 2:
            raise DataError(f"the {split} split of {data_dir} has fewer than 2 tokens")

    def __len__(self) -> int:
        return int(self.tokens.size)

    def window_starts(self, seed: int, step: int, count: int, seq_len: int) -> np.ndarray:
        """Start offsets of ``count`` windows for training step ``step``: a function of (seed, step) only."""
        high = max(1, len(self) - seq_len - 1)
        rng = np.random.default_rng([seed, step])
        return rng.integers(0, high, size=count)

    def batch(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets (B, seq_len), int64."""
        length = min(seq_len, len(self) - 1)
        rows = np.stack([np.asarray(self.tokens[s : s + length + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def sequential_batches(self, seq_len: int, batch_size: int, max_tokens: int | None = None):
        """Consecutive non-overlapping windows covering the split once (for evaluation)."""
        length = min(seq_len, len(self) - 1)
        limit = len(self) - 1 if max_tokens is None else min(len(self) - 1, max_tokens)
        starts = np.arange(0, max(1, limit - length + 1), length)
        for i in range(0, len(starts), batch_size):
            yield self.batch(starts[i : i + batch_size], length)
