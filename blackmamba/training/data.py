"""Training data: text sources -> token ids in memory-mapped shards with a JSON manifest, and batches.

``prepare`` streams documents (a Shakespeare play, a standard-library module, a text file, a JSONL line)
from the named sources, assigns each document to the train or validation split by a hash of its
name (so no document is split across both), tokenizes with GPT-NeoX-20B or a byte-level BPE trained on
the training split only, and appends the ids, each document followed by the end-of-text token, to
shards of at most ``shard_tokens`` ids (uint16 when the vocabulary fits, else uint32). The same inputs
give byte-identical shards.

A file reached twice (through a symlinked folder, a hard link, or named by two sources) is one document,
and a document whose text was already written (a copy) is skipped and listed under ``duplicates``, so
nothing held out for validation is also trained on.

The dataset is built in a temporary folder beside ``--out`` and swapped in atomically
(:mod:`blackmamba.atomic_dir`): a kill or a full disk at any step leaves the previous dataset as it was.
``--out`` must be new, empty, or a dataset written here; anything else is refused, never deleted.

``TokenData`` reads the shards back through ``numpy.memmap`` (after :func:`load_manifest` has checked the
manifest) and draws training windows from a seed and the step number alone, so a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .. import atomic_dir
from ..corpora import clean_play, shakespeare_files
from ..tokenizer import TokenizerError, neox_tokenizer, train_bpe
from .manifest import FORMAT, MANIFEST, DataError, is_manifest, load_manifest, shard_path

__all__ = [
    "MANIFEST",
    "DataError",
    "Document",
    "TokenData",
    "load_manifest",
    "prepare",
    "source_documents",
    "split_documents",
    "token_dtype",
]

BUILTIN_SOURCES = ("shakespeare", "pystdlib")
TEXT_SUFFIXES = (".txt", ".md")
TOKENIZER_FILE = "tokenizer.json"
_SHARD = re.compile(r"(train|val)-\d{5}\.bin")


def owned_file(name: str) -> bool:
    """A file name that ``prepare`` writes into a dataset folder (the only names it will ever delete)."""
    return name in (MANIFEST, MANIFEST + ".tmp", TOKENIZER_FILE) or _SHARD.fullmatch(name) is not None


@dataclass(frozen=True)
class Document:
    """One unit of the train/validation split: a stable name, a way to read its text, and the identity of
    the file it comes from (device, inode and line), so the same file reached twice counts once."""

    name: str
    read: Callable[[], str]
    identity: tuple = ()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}): convert it or leave it out") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _identity(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return (st.st_dev, st.st_ino)


def _jsonl_documents(path: Path) -> Iterator[Document]:
    text = _read_text(path)
    file_id = _identity(path)
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i + 1} is not valid JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path} line {i + 1} is nested too deeply") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path} line {i + 1} has no string field 'text'")
        yield Document(f"{path}:{i + 1}", lambda t=record["text"]: t, (*file_id, i))


def _file_documents(path: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
    else:
        yield Document(str(path), lambda p=path: _read_text(p), _identity(path))


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def source_documents(source: str) -> list[Document]:
    """The documents of one source: a built-in name, a file, or a folder (searched recursively; symlinked
    folders inside it are not followed)."""
    if source == "shakespeare":
        try:
            files = shakespeare_files()
        except FileNotFoundError as e:
            raise DataError(str(e)) from None
        return [Document(f"shakespeare:{f.stem}", lambda f=f: clean_play(_read_text(f)), _identity(f)) for f in files]
    if source == "pystdlib":
        return [
            Document(f"pystdlib:{p.name}:{i}", lambda p=p: _read_text(p), _identity(p))
            for i, p in enumerate(_stdlib_files())
        ]
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


def gather_documents(sources: list[str]) -> list[Document]:
    """The documents of all ``sources`` in order, each file counted once however often it is reached (by two
    sources, a symlink, a hard link): the first path that reaches it names it."""
    seen: set[tuple] = set()
    docs = []
    for source in sources:
        for doc in source_documents(source):
            if doc.identity and doc.identity in seen:
                continue
            seen.add(doc.identity)
            docs.append(doc)
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: the documents whose name hashes lowest go to validation."""
    _check_val_fraction(val_fraction)
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        raise DataError("the same document appears twice in the sources")
    n_val = 0 if val_fraction == 0 else min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    ranked = sorted(docs, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    val = {d.name for d in ranked[:n_val]}
    return [d for d in docs if d.name not in val], [d for d in docs if d.name in val]


def _check_val_fraction(val_fraction: float) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype:
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in ("uint16", "uint32"):
        raise DataError(f"token dtype must be auto, uint16 or uint32, got {requested!r}")
    dtype = np.dtype(requested)
    if vocab_size > np.iinfo(dtype).max + 1:
        raise DataError(f"a vocabulary of {vocab_size} tokens does not fit in {dtype.name}")
    return dtype


def _bpe_vocab(tokenizer: str) -> int | None:
    """None for ``neox``, the vocabulary size for ``bpe:VOCAB``; DataError for anything else."""
    if tokenizer == "neox":
        return None
    if not isinstance(tokenizer, str) or not tokenizer.startswith("bpe:"):
        raise DataError(f"unknown tokenizer {tokenizer!r}: use neox or bpe:VOCAB")
    try:
        vocab = int(tokenizer[4:])
    except ValueError:
        raise DataError(f"bad tokenizer {tokenizer!r}: use neox or bpe:VOCAB, e.g. bpe:4096") from None
    if vocab < 300:
        raise DataError(f"a BPE vocabulary needs at least 300 tokens (256 bytes + merges), got {vocab}")
    if vocab > 2**20:
        raise DataError(f"a BPE vocabulary of {vocab} tokens is too large to train here (at most {2**20})")
    return vocab


def _check_out(out: str | os.PathLike) -> Path:
    """The folder ``prepare`` will replace, after checking (without writing anything) that it may: not a file,
    not under a file, writable, and either new, empty, or a dataset written here."""
    given = os.fspath(out)
    if not given or "\0" in given:
        raise DataError(f"--out must be a folder name, got {given!r}")
    if os.path.islink(given) and not os.path.exists(given):
        raise DataError(f"--out {given} is a symlink to nothing")
    target = Path(os.path.realpath(given))
    if target == target.parent:
        raise DataError(f"--out {given} is the root folder; choose a new or empty folder")
    ancestor = target.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DataError(f"--out {given} cannot be created: {ancestor} is a file, not a folder")
    if os.path.lexists(target) and not target.is_dir():
        raise DataError(f"--out {given} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DataError(f"--out {given} cannot be written: {ancestor} is read-only (or not ours to write)")
    try:
        atomic_dir.recover(target, owned_file, is_manifest_dir)
    except OSError as e:
        raise DataError(f"cannot tidy up an earlier run's files beside {given}: {e.strerror} ({e.filename})") from None
    if target.is_dir():
        try:
            names = sorted(os.listdir(target))
        except OSError as e:
            raise DataError(f"cannot read --out {given}: {e.strerror}") from None
        if names and not is_manifest_dir(target):
            raise DataError(
                f"--out {given} is not empty and holds no dataset manifest written by `blackmamba data prepare`; "
                "refusing to replace it: choose a new or empty folder"
            )
        foreign = [n for n in names if not (owned_file(n) and stat.S_ISREG(os.lstat(target / n).st_mode))]
        if foreign:
            raise DataError(
                f"--out {given} holds a dataset and also {foreign[0]!r}, which `data prepare` did not write; "
                "refusing to replace it: move that out, or choose another folder"
            )
        if names and not os.access(target, os.W_OK | os.X_OK):
            raise DataError(f"--out {given} is read-only: its old dataset could not be removed")
    return target


def is_manifest_dir(folder: Path) -> bool:
    """``folder`` holds a ``manifest.json`` of ours (recognised by its format field; not fully validated)."""
    return is_manifest(folder / MANIFEST)


class _ShardWriter:
    """Streams one split's ids into ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.fd: int | None = None
        self.count = self.max_id = 0

    def add(self, ids: np.ndarray) -> None:
        while ids.size:
            if self.fd is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.fd = atomic_dir.open_file(self.folder / name)
                self.shards.append({"file": name, "tokens": 0, "max_token_id": 0})
                self.count = self.max_id = 0
            part, ids = ids[: self.shard_tokens - self.count], ids[self.shard_tokens - self.count :]
            atomic_dir.write_chunk(self.fd, np.ascontiguousarray(part))
            self.count += int(part.size)
            self.max_id = max(self.max_id, int(part.max()))
            self.shards[-1].update(tokens=self.count, max_token_id=self.max_id)
            if self.count == self.shard_tokens:
                self._close(sync=True)

    def _close(self, sync: bool) -> None:
        fd, self.fd = self.fd, None
        try:
            if sync:
                atomic_dir.sync_file(fd)
        finally:
            os.close(fd)

    def finish(self) -> list[dict]:
        if self.fd is not None:
            self._close(sync=True)
        return self.shards

    def abort(self) -> None:
        if self.fd is not None:
            self._close(sync=False)


def _write_split(
    docs: list[Document],
    tok: Tokenizer,
    eos: int,
    folder: Path,
    split: str,
    dtype: np.dtype,
    shard_tokens: int,
    seen: dict[bytes, str],
) -> dict | None:
    """Write one split's shards; None when every document was a duplicate. ``seen`` maps the hashes of texts
    already written (by either split) to their document, so a copy is written once."""
    writer = _ShardWriter(folder, split, dtype, shard_tokens)
    written, duplicates = [], []
    try:
        for doc in tqdm(docs, desc=f"tokenizing {split}", unit="doc", disable=None):
            text = doc.read()
            digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
            if digest in seen:
                duplicates.append(doc.name)
                continue
            seen[digest] = doc.name
            written.append(doc.name)
            writer.add(np.asarray([*tok.encode(text).ids, eos], dtype=dtype))
        shards = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if not written:
        return None
    tokens = sum(s["tokens"] for s in shards)
    info = {"documents": written, "shards": shards, "tokens": tokens}
    info["max_token_id"] = max(s["max_token_id"] for s in shards)
    if duplicates:
        info["duplicates"] = duplicates
    return info


def _write_text(path: Path, text: str) -> None:
    atomic_dir.write_file(path, [text.encode("utf-8")])


def prepare(
    sources: list[str],
    out: str | os.PathLike,
    tokenizer: str = "neox",
    val_fraction: float = 0.05,
    dtype: str = "auto",
    shard_tokens: int = 2**26,
) -> dict:
    """Tokenize ``sources`` into ``out`` (shards + manifest.json + tokenizer.json). Returns the manifest.

    ``out`` is replaced atomically, and only when it is new, empty, or a dataset written here."""
    if not sources or isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        raise DataError(f"give the sources as a non-empty list of names or paths, got {sources!r}")
    bpe_vocab = _bpe_vocab(tokenizer)
    _check_val_fraction(val_fraction)
    if dtype not in ("auto", "uint16", "uint32"):
        raise DataError(f"token dtype must be auto, uint16 or uint32, got {dtype!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    target = _check_out(out)

    docs = gather_documents(list(sources))
    if not docs:
        raise DataError(f"the sources {sources} hold no documents")
    train_docs, val_docs = split_documents(docs, val_fraction)
    if bpe_vocab is None:
        try:
            tok = neox_tokenizer()
        except TokenizerError as e:
            raise DataError(str(e)) from None
    else:
        texts = (d.read() for d in tqdm(train_docs, desc="training BPE", unit="doc", disable=None))
        tok = train_bpe(texts, bpe_vocab)
    vocab_size = tok.get_vocab_size()
    np_dtype = token_dtype(vocab_size, dtype)
    eos = tok.token_to_id("<|endoftext|>")
    if eos is None:
        raise DataError("the tokenizer has no <|endoftext|> token")
    manifest = {
        "format": FORMAT,
        "sources": list(sources),
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "dtype": np_dtype.name,
        "val_fraction": val_fraction,
        "splits": {},
    }

    def write(folder: Path) -> None:
        seen: dict[bytes, str] = {}
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            info = (
                _write_split(split_docs, tok, eos, folder, split, np_dtype, shard_tokens, seen) if split_docs else None
            )
            if info is not None:
                manifest["splits"][split] = info
        train = manifest["splits"]["train"]
        if train["tokens"] <= len(train["documents"]):
            raise DataError(f"the sources {sources} hold no text")
        _write_text(folder / TOKENIZER_FILE, tok.to_str(pretty=True))
        _write_text(folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    _replace_dir(target, os.fspath(out), write)
    return manifest


def _replace_dir(target: Path, shown: str, write: Callable[[Path], None]) -> None:
    """Build the new dataset with ``write`` in a temporary folder beside ``target``, then swap it in. Any
    failure before the swap removes what was written and leaves ``target`` as it was."""
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = atomic_dir.make_parents(target.parent)
        tmp = atomic_dir.temp_dir(target)
        write(tmp)
        atomic_dir.sync_dir(tmp)
        old = atomic_dir.swap_in(tmp, target)
    except BaseException as e:
        _discard(tmp, created)
        if isinstance(e, OSError):
            state = f"{shown} is unchanged" if os.path.lexists(target) else "nothing was written"
            where = f" ({e.filename})" if e.filename else ""
            raise DataError(f"cannot write the dataset {shown}: {e.strerror or e}{where}; {state}") from None
        raise
    try:
        atomic_dir.sync_dir(target.parent)
        if old is not None and not atomic_dir.remove_owned(old, owned_file):
            warnings.warn(f"left {old} in place: it holds files `data prepare` did not write", stacklevel=3)
    except OSError as e:
        warnings.warn(
            f"the new dataset is in {shown}, but removing the previous one failed: {e.strerror} ({e.filename}); "
            "the next `data prepare` of this folder retries",
            stacklevel=3,
        )
    finally:
        atomic_dir.release(tmp)
        if old is not None:
            atomic_dir.release(old)


def _discard(tmp: Path | None, created: list[Path]) -> None:
    """Best-effort removal of a failed build: its temporary folder, then the parents made for it."""
    if tmp is not None and os.path.isdir(tmp):
        try:
            atomic_dir.remove_owned(tmp, owned_file)
        except OSError:
            pass  # a leftover of ours: the next prepare removes it
        atomic_dir.release(tmp)
    for folder in reversed(created):
        try:
            atomic_dir.remove_dir(folder)
        except OSError:
            break


class TokenData:
    """Memory-mapped token shards of one split, with deterministic random windows."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train") -> None:
        data_dir = Path(data_dir)
        # A concurrent `data prepare` swaps a new folder in under the same name; reading the manifest and the
        # shards while the folder's identity stays the same guarantees one version, never a mix.
        for _ in range(3):
            before = _folder_id(data_dir)
            try:
                manifest, tokens = _read_split(data_dir, split)
            except DataError:
                if _folder_id(data_dir) != before:
                    continue
                raise
            if _folder_id(data_dir) == before:
                break
        else:
            raise DataError(f"{data_dir} was replaced three times while it was being read; try again")
        self.manifest = manifest
        self.vocab_size: int = manifest["vocab_size"]
        self.eos_token_id: int = manifest["eos_token_id"]
        self.tokens = tokens
        if self.tokens.size < 2:
            raise DataError(f"the {split} split of {data_dir} has fewer than 2 tokens")
        self._max_token_id: int | None = manifest["splits"][split].get("max_token_id")

    def __len__(self) -> int:
        return int(self.tokens.size)

    def max_token_id(self) -> int:
        """The largest token id in this split: recorded in the manifest at prepare time (checked there to be
        below ``vocab_size``), or for older manifests read from the shards once."""
        if self._max_token_id is None:
            self._max_token_id = self.scan_max_token_id()
        return self._max_token_id

    def scan_max_token_id(self) -> int:
        """The largest token id in this split, read from the shards (not trusting the manifest)."""
        return int(self.tokens.max())

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


def _folder_id(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_split(data_dir: Path, split: str) -> tuple[dict, np.ndarray]:
    """The validated manifest and the split's tokens (memory-mapped when it is one shard)."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir} has no {split!r} split (it has {', '.join(manifest['splits'])})")
    dtype = np.dtype(manifest["dtype"])
    arrays = []
    for i, shard in enumerate(manifest["splits"][split]["shards"]):
        path = shard_path(data_dir, shard["file"], f"splits.{split}.shards[{i}].file", data_dir / MANIFEST)
        arrays.append(_map(path, dtype, shard["tokens"]))
    return manifest, arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _map(path: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    if tokens == 0:
        return np.zeros(0, dtype=dtype)
    try:
        return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot map {path}: {e}") from None
