"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, resumable on another layout,
written atomically, exportable to the single-folder layout of :func:`blackmamba.load_pretrained`.

A checkpoint folder holds DCP's files (``.metadata`` and one ``__<rank>_<n>.distcp`` per writing rank),
``dcp_state.json`` (the step, the run's own records and the layout that wrote it; JSON, no pickles of
ours) and, when the writer had one, the run's ``tokenizer.json``. Tensors are stored by parameter name and
global shape, so a checkpoint written by 2 ranks with expert parallelism loads on 1 rank, on 4, or with
another expert-parallel degree: DCP reads the pieces each rank needs.

Atomicity: every rank writes into one temporary folder beside the target (named by rank 0); once all
ranks are done, rank 0 writes ``dcp_state.json`` last, fsyncs, and swaps the folder in with
:mod:`blackmamba.atomic_dir` (one rename). A crash at any point leaves the previous checkpoint as it was.
A failure on any rank is agreed on by all of them (one small collective), so every rank raises
:class:`~blackmamba.checkpoint.CheckpointError` and none waits for the others.
With ``async_save`` the ranks stage the state to host memory and write it in a background thread while
training goes on; :meth:`PendingSave.wait` (before the next save, and at the end) finishes the swap.

Reading is careful with the file: DCP's ``.metadata`` is a pickle, which :class:`SafeReader` unpickles with
an allow-list of DCP's own metadata types, and the data files it names must be plain names inside the
folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from .. import atomic_dir
from ..checkpoint import CheckpointError, save_pretrained, save_released
from ..config import BlackMambaConfig
from ..errors import BlackMambaError
from ..model import BlackMamba
from ..tokenizer import read_tokenizer
from .distributed import is_main_process, rank, world_size

__all__ = [
    "STATE_JSON",
    "PendingSave",
    "SafeReader",
    "dcp_to_pretrained",
    "export_pretrained",
    "is_dcp_checkpoint",
    "load",
    "read_state",
    "save",
]

STATE_JSON = "dcp_state.json"
TOKENIZER = "tokenizer.json"
FORMAT = "blackmamba-dcp-1"
_DATA_FILE = re.compile(r"__\d+_\d+\.distcp")


def owned_file(name: str) -> bool:
    """A file name that a distributed checkpoint is made of (the only names :func:`save` ever deletes)."""
    return name in (".metadata", STATE_JSON, TOKENIZER) or _DATA_FILE.fullmatch(name) is not None


def is_dcp_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a complete distributed checkpoint written here."""
    path = Path(path)
    return (path / STATE_JSON).is_file() and (path / ".metadata").is_file()


# ------------------------------------------------------------------------------------------ reading


_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.storage",
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata: its own dataclasses, torch.Size and dtypes, and plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":  # a name lookup among torch's layouts
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return super().find_class(module, name)  # the checkpoint id DCP records
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


class SafeReader(FileSystemReader):
    """DCP's file-system reader, reading the metadata without running code from the file and refusing data
    files named outside the checkpoint folder."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as e:
            raise CheckpointError(f"{path} is not a distributed-checkpoint index this tool wrote ({e})") from None
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} is not a distributed-checkpoint index (it holds {type(metadata).__name__})")
        for item in (metadata.storage_data or {}).values():
            name = getattr(item, "relative_path", None)
            if not isinstance(name, str) or not _DATA_FILE.fullmatch(name):
                raise CheckpointError(f"{path} names a data file {name!r} that is not a plain file of the checkpoint")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a distributed checkpoint (``dcp_state.json``), checked."""
    file = Path(path) / STATE_JSON
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(
            f"{path} is not a distributed checkpoint: cannot read {file} ({e.strerror or e})"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} record")
    if not isinstance(record.get("config"), dict) or not isinstance(record.get("state", {}), dict):
        raise CheckpointError(f"{file} lacks the model config or its state record")
    return record


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` into ``model`` (and ``optimizer``), whatever the layout
    that wrote it and the one reading it (any number of ranks, FSDP or not, any expert-parallel degree,
    or one plain process). Returns the ``state`` record saved with it. Every rank calls this."""
    path = Path(path)
    record = read_state(path)
    reader = SafeReader(path)
    reader.read_metadata()  # here, so that a bad index fails with its own message, not one DCP wraps
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader, no_dist=_no_group())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP gathers every rank's failure in a CheckpointException
        raise CheckpointError(f"cannot load distributed checkpoint {path}: {' '.join(str(e).split())[:500]}") from None
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optimizer", {}),
    )
    return record["state"]


# ------------------------------------------------------------------------------------------ writing


def _broadcast_path(path: Path | None) -> Path | None:
    """Rank 0's ``path`` on every rank (as bytes in a tensor: nothing is unpickled); None where rank 0 has
    none (it could not prepare the folder)."""
    if world_size() == 1:
        return path
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    data = os.fsencode(path) if path is not None else b""
    size = torch.tensor([len(data)], dtype=torch.long, device=device)
    dist.broadcast(size, 0)
    buffer = torch.zeros(int(size), dtype=torch.uint8, device=device)
    if rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, 0)
    return Path(os.fsdecode(bytes(buffer.cpu().tolist()))) if int(size) else None


def _any_failed(failed: bool, group: dist.ProcessGroup | None) -> bool:
    """True on every rank of ``group`` when one of them failed (a barrier too). Runs on the CPU when the
    group is gloo (the saver group of an asynchronous save), on the GPU with NCCL."""
    if world_size() == 1:
        return failed
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def _no_group() -> bool:
    """One plain process: DCP then reads and writes without collectives."""
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns each time it runs in one process, which is intended here (a plain trainer, convert)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500] or type(e).__name__


@dataclass
class PendingSave:
    """A save in progress: :meth:`wait` finishes it (every rank calls it) and returns the checkpoint path."""

    target: Path
    tmp: Path
    record: dict[str, Any]
    future: Future | None = None
    group: dist.ProcessGroup | None = None
    tokenizer: Any | None = None
    done: bool = field(default=False)

    def wait(self) -> Path:
        """Finish the save on every rank: all ranks agree that their files are written, then rank 0 commits;
        a failure anywhere raises :class:`CheckpointError` on every rank (the previous checkpoint stays)."""
        if self.done:
            return self.target
        error: str | None = None
        try:
            if self.future is not None:
                self.future.result()
        except (Exception, CheckpointException) as e:
            error = _one_line(e)
        if _any_failed(error is not None, self.group):
            if is_main_process():
                _discard(self.tmp)
            self.done = True
            raise CheckpointError(f"cannot write checkpoint {self.target}: {error or 'another rank failed to write'}")
        if is_main_process():
            try:
                _commit(self.tmp, self.target, self.record, self.tokenizer)
            except CheckpointError as e:
                error = str(e)
            except Exception as e:  # anything else, too, must reach the other ranks rather than strand them
                _discard(self.tmp)
                error = f"cannot write checkpoint {self.target}: {_one_line(e)}"
        if _any_failed(error is not None, self.group):
            self.done = True
            raise CheckpointError(error or f"cannot write checkpoint {self.target}: rank 0 failed to commit it")
        self.done = True
        return self.target


def _commit(tmp: Path, target: Path, record: dict[str, Any], tokenizer: Any | None = None) -> None:
    """Rank 0, after every rank wrote its files: the tokenizer, the JSON record last, fsync everything,
    one swap."""
    try:
        if tokenizer is not None:
            atomic_dir.write_file(tmp / TOKENIZER, [tokenizer.to_str().encode()])
        atomic_dir.write_file(tmp / STATE_JSON, [(json.dumps(record, indent=1) + "\n").encode()])
        for name in os.listdir(tmp):
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                atomic_dir.sync_file(fd)
            finally:
                os.close(fd)
        atomic_dir.sync_dir(tmp)
        old = atomic_dir.swap_in(tmp, target)
        atomic_dir.release(tmp)
        atomic_dir.sync_dir(target.parent)
    except OSError as e:
        _discard(tmp)
        raise CheckpointError(f"cannot write checkpoint {target}: {e.strerror or e}") from None
    if old is not None:
        _discard(old)


def _discard(folder: Path) -> None:
    try:
        if folder.exists():
            atomic_dir.remove_owned(folder, owned_file)
    except OSError:
        pass  # a later save removes what is left


def _check_target(target: Path) -> None:
    if os.path.islink(target) or (os.path.lexists(target) and not target.is_dir()):
        raise CheckpointError(f"{target} is not a folder; refusing to replace it with a checkpoint")
    if target.is_dir() and not atomic_dir.is_owned(target, owned_file):
        raise CheckpointError(
            f"{target} holds files that are not part of a distributed checkpoint; refusing to replace it"
        )


def save(
    path: str | os.PathLike,
    model: BlackMamba,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    async_save: bool = False,
    group: dist.ProcessGroup | None = None,
    layout: dict[str, Any] | None = None,
    tokenizer: Any | None = None,
) -> PendingSave:
    """Write ``model`` and ``optimizer`` (sharded as they are) and the JSON-serialisable ``state`` record
    to the folder ``path``, atomically; every rank calls this. ``path`` may be missing or an earlier
    checkpoint (replaced); anything else is refused. A ``tokenizer`` (a ``tokenizers.Tokenizer``) is
    written beside the weights, so the export carries it.

    Returns a :class:`PendingSave`; call :meth:`~PendingSave.wait` on every rank to finish it (at once for
    a synchronous save). With ``async_save`` the files are written in a background thread; pass a
    ``group`` of its own (``dist.new_group(backend="gloo")``) so its collectives never interleave with
    training's.
    """
    target = Path(path)
    record = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state": state or {},
        "layout": {"world_size": world_size(), **(layout or {})},
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint record must be JSON: {e}") from None
    tmp, refused = None, None
    if is_main_process():
        try:
            _check_target(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            for kind, leftover in atomic_dir.leftovers(target):
                if kind == "tmp":
                    _discard(leftover)
            tmp = atomic_dir.temp_dir(target)
        except CheckpointError as e:
            refused = e
        except OSError as e:
            refused = CheckpointError(f"cannot write checkpoint {target}: {e.strerror or e}")
    tmp = _broadcast_path(tmp)  # None on every rank when rank 0 could not prepare the folder
    if refused is not None:
        raise refused
    if tmp is None:
        raise CheckpointError(f"cannot write checkpoint {target}: rank 0 could not prepare the folder")
    if optimizer is None:
        sd = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        sd = {"model": model_sd, "optimizer": optim_sd}
    pending = PendingSave(target, tmp, record, group=group, tokenizer=tokenizer)
    try:
        with _single_process_quiet():
            if async_save:
                pending.future = dcp.async_save(sd, checkpoint_id=tmp, process_group=group, no_dist=_no_group())
            else:
                dcp.save(sd, checkpoint_id=tmp, process_group=group, no_dist=_no_group())
    except (Exception, CheckpointException) as e:
        if is_main_process():
            _discard(tmp)
        raise CheckpointError(f"cannot write checkpoint {target}: {_one_line(e)}") from None
    if not async_save:
        pending.wait()
    return pending


# ------------------------------------------------------------------------------------------ export


def export_pretrained(model: BlackMamba, path: str | os.PathLike, tokenizer: Any | None = None) -> Path | None:
    """Write a parallelized (or plain) model in the single-folder layout of :func:`blackmamba.load_pretrained`
    and ``blackmamba convert``: the full weights are gathered to rank 0's memory (expert shards put back
    together), which writes them with :func:`blackmamba.checkpoint.save_pretrained`. Every rank calls this;
    rank 0 returns the path, the others None."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Gathering expert shards (sharded twice) makes DTensor warn that it needs two all-gathers: expected.
    quiet = logging.getLogger("torch.distributed.tensor._redistribute")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        full = get_model_state_dict(model, options=options)
    finally:
        quiet.setLevel(level)
    if not is_main_process():
        return None
    return _write_full(full, model.config, path, tokenizer)


def _write_full(
    full: dict[str, torch.Tensor], config: BlackMambaConfig, path: str | os.PathLike, tokenizer: Any
) -> Path:
    plain = BlackMamba(config)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"the gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return save_pretrained(plain, path, tokenizer=tokenizer)


def dcp_to_pretrained(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    tokenizer: Any | None = None,
    overwrite: bool = False,
    to: str = "ours",
) -> Path:
    """Convert a distributed checkpoint to the single-folder layout (``to="ours"``, what
    :func:`blackmamba.load_pretrained` reads) or to the released one, in one plain process (no ranks).
    The checkpoint's own ``tokenizer.json`` goes along unless ``tokenizer`` is given. ``dst`` as in
    :func:`blackmamba.checkpoint.save_pretrained`; it may not be ``src``, hold it or lie inside it."""
    if to not in ("ours", "released"):
        raise CheckpointError(f"convert: unknown target layout {to!r} (use 'ours' or 'released')")
    source, dest = os.path.realpath(src), os.path.realpath(dst)
    if os.path.commonpath([source, dest]) in (source, dest):
        raise CheckpointError(
            f"convert: {dst} is, holds or lies inside the source checkpoint {src}; choose another folder"
        )
    record = read_state(src)
    try:
        config = BlackMambaConfig.from_dict(record["config"])
    except BlackMambaError as e:
        raise CheckpointError(f"{Path(src) / STATE_JSON}: {e}") from None
    if tokenizer is None and os.path.lexists(Path(src) / TOKENIZER):
        tokenizer = read_tokenizer(Path(src) / TOKENIZER)
    model = BlackMamba(config)
    load(src, model)
    if to == "released":
        return save_released(model, dst, tokenizer=tokenizer, overwrite=overwrite)
    return save_pretrained(model, dst, tokenizer=tokenizer, overwrite=overwrite)
