"""The run folder of a training run: what the trainer writes there, and how it reads it back on ``--resume``.

    RUN/.trainer.lock                 held (fcntl.flock) by the one trainer working in RUN
    RUN/metrics.jsonl                 one JSON row per logged step and per evaluation
    RUN/checkpoints/step-00000500/    a loadable checkpoint + trainer_state.pt (one process), or a distributed
                                      checkpoint (torch.distributed.checkpoint files + dcp_state.json)
    RUN/model/                        a distributed run's final model in the single-folder layout
    RUN/summary.json, RUN/plots/      written at the end

Why a module of its own: every rule that keeps a run's files safe lives here. The trainer refuses a folder
that holds something it did not write, replaces an old run only when asked (``--overwrite``), lets one
trainer at a time into a folder, and reads ``trainer_state.pt`` as untrusted input: it holds only tensors,
numbers, strings, lists and dicts, and is read with ``torch.load(weights_only=True)``, so a file carrying a
pickled object is refused without running it. A distributed checkpoint keeps the same records, less the
optimizer (sharded in DCP's files), as JSON in ``dcp_state.json``.

In a distributed run only rank 0 touches the folder (lock, checks, metrics, plots, summary); every rank
writes its part of a distributed checkpoint, so with several nodes ``RUN`` must be on a file system they
share.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BlackMambaError

LOCK_FILE = ".trainer.lock"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
MODEL = "model"
STATE_FILE = "trainer_state.pt"
STATE_FORMAT = "blackmamba-trainer-state-v2"
# Everything the trainer writes into a run folder; --overwrite removes these and nothing else.
OUTPUTS = (CHECKPOINTS, METRICS, SUMMARY, PLOTS, MODEL, "tensorboard")
# Hidden names of the trainer's own temporaries (an interrupted overwrite, a metrics rewrite).
TRASH_PREFIX = ".old-"
TMP_PREFIX = ".tmp-"
# The only globals a trainer state written by the first version holds: numpy's array and dtype
# reconstruction for its RNG state. They build plain arrays and run no code of the file's choosing.
_LEGACY_GLOBALS = {
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
}


class TrainingError(BlackMambaError, RuntimeError):
    """A training run cannot start or continue; the message names the file, option or value."""


def warn(message: str) -> None:
    """Tell the user something went differently than asked, without stopping (one line on stderr; in a
    distributed run from rank 0 only, where every rank would say the same)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
        return
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ the folder


def check_out_path(run: Path) -> None:
    """Refuse an ``--out`` that is a file, lies under a file or cannot be written, before anything is loaded."""
    if run.exists() and not run.is_dir():
        raise TrainingError(f"--out {run} is a file, not a folder")
    existing = run
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise TrainingError(f"--out {run}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"--out {run}: no permission to write in {existing}")


def _entries(run: Path) -> list[str]:
    if not run.is_dir():
        return []
    own = (TRASH_PREFIX, TMP_PREFIX)  # the trainer's temporaries, removed by clean_stale
    return sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE and not p.name.startswith(own))


def checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first, of either kind (an interrupted write is hidden and
    not listed)."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    found = (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    return sorted(p for p in found if (p / STATE_FILE).is_file() or is_distributed_checkpoint(p))


def is_distributed_checkpoint(path: Path) -> bool:
    """A complete checkpoint written by a distributed run (see :mod:`blackmamba.training.dcp`)."""
    if not (path / ".metadata").is_file():
        return False
    from .dcp import is_dcp_checkpoint  # torch.distributed.checkpoint only where one may be

    return is_dcp_checkpoint(path)


def prune_checkpoints(run: Path, newest: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (``newest`` among them). Each goes out of the
    listing at once (renamed hidden), then its files; a failure is a warning, never an error."""
    old = [c for c in checkpoints(run) if c != newest]
    for stale in old[: max(0, len(old) + 1 - keep_last)]:
        hidden = stale.parent / f".deleting-{stale.name}"
        try:
            os.replace(stale, hidden)
            shutil.rmtree(hidden)
        except OSError as e:
            warn(f"could not delete the old checkpoint {stale}: {e.strerror or e}")


def check_out_contents(run: Path, resume: bool, overwrite: bool) -> None:
    """Whether a run may start in ``run``: a new or empty folder, an old run with ``overwrite``, or a run
    with a checkpoint to ``resume``. Never a folder holding files the trainer did not write."""
    entries = _entries(run)
    foreign = [name for name in entries if name not in OUTPUTS]
    if resume:
        if not run.is_dir():
            raise TrainingError(f"--resume: {run} does not exist (nothing to resume)")
        if not checkpoints(run):
            raise TrainingError(f"--resume: no checkpoint found under {run / CHECKPOINTS}")
        return
    if not entries:
        return
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise TrainingError(
            f"--out {run} is not empty and is not a training run (it holds {shown}): choose a new or empty folder"
        )
    if not overwrite:
        raise TrainingError(
            f"--out {run} already holds a training run ({', '.join(entries)}): continue it with --resume, "
            "replace it with --overwrite, or choose another --out"
        )


def remove_outputs(run: Path) -> None:
    """Delete the trainer's own outputs in ``run`` (for ``--overwrite``), leaving anything else alone.

    Each output is first renamed into one hidden folder, so the run never shows a half-deleted checkpoint;
    a crash before the folder is gone leaves only that hidden folder, removed at the next start."""
    present = [run / name for name in OUTPUTS if (run / name).exists()]
    if not present:
        return
    trash = run / f"{TRASH_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        trash.mkdir()
        for path in present:
            os.replace(path, trash / path.name)
        shutil.rmtree(trash)
    except OSError as e:
        raise TrainingError(f"--overwrite: cannot remove the old run in {run}: {e.strerror or e}") from None


def clean_stale(run: Path) -> None:
    """Remove what an interrupted trainer left behind: hidden temporaries of checkpoint writes and deletions
    (in ``checkpoints/``), of overwrites and of file rewrites. Called with the lock held, so none of them can
    belong to a trainer still running. A hidden folder that a visible name links to is kept."""
    root = run / CHECKPOINTS
    hidden = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    if run.is_dir():
        hidden += [p for p in run.iterdir() if p.name.startswith((TRASH_PREFIX, TMP_PREFIX))]
    linked = {os.path.realpath(p) for p in (root.iterdir() if root.is_dir() else ()) if p.is_symlink()}
    for p in hidden:
        if os.path.realpath(p) in linked:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class RunLock:
    """An exclusive ``flock`` on ``RUN/.trainer.lock``, held for the whole run: a second trainer aimed at
    the same folder fails at once instead of mixing its checkpoints and metrics with the first one's.
    The kernel releases the lock when the process ends, however it ends."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.path = run / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise TrainingError(f"--out {self.run}: cannot write there ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (process {holder})" if holder.isdigit() else ""
            raise TrainingError(
                f"another trainer{who} is using {self.run} (it holds {self.path}): wait for it to finish "
                "or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden temporary file and one rename (modes follow the umask)."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a leftover is removed by clean_stale at the next start
            tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ metrics


def read_metrics_for_resume(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` for a resumed run. A torn last line (the disk filled or the process
    died mid-write) is dropped with a warning; a bad line anywhere else is an error naming the file."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise TrainingError(f"cannot read {path}: {e.strerror or e}") from None
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = all(not rest.strip() for rest in lines[i + 1 :])
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if last:
                warn(f"{path}: dropping a half-written last line (line {i + 1}: {line[:40]!r}...)")
                break
            raise TrainingError(f"{path}, line {i + 1}: not valid JSON; fix or remove that line to resume") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise TrainingError(f"{path}, line {i + 1}: expected a JSON object with an integer 'step'")
        rows.append(row)
    return rows


class MetricsLog:
    """Append-only JSONL metrics (plus TensorBoard when it is installed).

    On resume the rows after the checkpoint's step are dropped (the resumed run writes them again), by
    rewriting the file through a temporary and one rename, so a crash there loses nothing."""

    def __init__(self, run: Path, resume_step: int | None) -> None:
        self.path = run / METRICS
        if resume_step is not None:
            kept = [r for r in read_metrics_for_resume(self.path) if r["step"] <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        else:
            self.path.unlink(missing_ok=True)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (one write call of one whole line). Raises OSError when the disk is full."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# ------------------------------------------------------------------------------------------ identities


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of a data manifest (keys sorted): the same prepared data gives the same fingerprint."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a tokenizer's id -> token table (added tokens included). Two tokenizers with the same table
    give every id the same meaning, which is what a model's embedding needs; file formatting, version
    fields and the order of keys in tokenizer.json do not matter."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    table = sorted((i, t) for t, i in vocab.items())
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ trainer state


def rng_state(all_gpus: bool = True) -> dict[str, Any]:
    """Every RNG the training step may draw from, as tensors and numbers (no pickled objects). With
    ``all_gpus=False`` only the current GPU's generator (a distributed rank must not touch the others)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64)},
        "python_gauss_next": gauss_next,
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all()) if all_gpus else [torch.cuda.get_rng_state()]
    return state


def set_rng_state(state: dict[str, Any], where: Path) -> None:
    try:
        python, numpy_state = state["python"], state["numpy"]
        internal = tuple(int(v) for v in python["internal"].tolist())
        random.setstate((int(python["version"]), internal, state.get("python_gauss_next")))
        keys = numpy_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (
                numpy_state["kind"],
                keys,
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["cached_gaussian"]),
            )
        )
        torch.set_rng_state(state["torch"])
        if state.get("cuda") and torch.cuda.is_available():
            if len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])
            elif len(state["cuda"]) == 1:  # a distributed rank's own GPU
                torch.cuda.set_rng_state(state["cuda"][0])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise TrainingError(f"{where}: the stored random-number state is malformed ({type(e).__name__}: {e})") from None


_TENSOR = "__tensor__"
_JSON_DTYPES = {"uint8": torch.uint8, "int64": torch.int64}


def rng_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_state` as JSON values: each tensor (uint8 or int64) as its dtype, shape and base64 bytes."""

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().numpy().tobytes()
            dtype = str(value.dtype).removeprefix("torch.")
            return {_TENSOR: dtype, "shape": list(value.shape), "base64": base64.b64encode(data).decode()}
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [encode(v) for v in value]
        return value

    return encode(state)


def rng_from_json(value: Any, where: Path) -> Any:
    """The inverse of :func:`rng_to_json`, checking every tensor's dtype and size (the file is untrusted)."""
    if isinstance(value, list):
        return [rng_from_json(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR not in value:
        return {k: rng_from_json(v, where) for k, v in value.items()}
    dtype, shape = _JSON_DTYPES.get(value[_TENSOR]), value.get("shape")
    bad = f"{where}: the stored random-number state is malformed"
    if dtype is None or not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 2**24 for n in shape):
        raise TrainingError(f"{bad} (a tensor of dtype {value[_TENSOR]!r}, shape {shape!r})")
    try:
        data = base64.b64decode(value.get("base64", ""), validate=True)
    except (TypeError, ValueError):
        raise TrainingError(f"{bad} (tensor bytes are not base64)") from None
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise TrainingError(f"{bad} (tensor bytes do not fit shape {shape})")
    return (
        torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape).clone()
        if data
        else torch.empty(shape, dtype=dtype)
    )


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a trainer state (format v2: only tensors, numbers, strings, None, lists and dicts)."""
    torch.save({"format": STATE_FORMAT, **state}, path)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:  # a damaged archive fails here in many ways (zip, pickle opcodes, EOF)
        raise TrainingError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__})") from None


def _legacy_safe_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def _from_legacy(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """A first-version trainer state (RNG states as Python tuples and numpy arrays) in the v2 layout."""
    rng = raw.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("python"), tuple) or not isinstance(rng.get("numpy"), tuple):
        raise TrainingError(f"{path}: the stored random-number state is malformed (an older trainer state)")
    version, internal, gauss_next = rng["python"]
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    args = raw.get("args")
    state = {
        "format": "blackmamba-trainer-state-v1",
        "step": raw.get("step"),
        "max_steps": raw.get("max_steps"),
        "optimizer": raw.get("optimizer"),
        "args": {k: v for k, v in args.items() if k != "extra"} if isinstance(args, dict) else args,
        "data": {},
        "rng": {
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64)},
            "python_gauss_next": gauss_next,
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": pos,
                "has_gauss": has_gauss,
                "cached_gaussian": cached,
            },
            "torch": rng.get("torch"),
            "cuda": list(rng.get("cuda", [])),
        },
    }
    if isinstance(state["step"], int):
        state["data_position"] = state["step"] * int(state["args"].get("grad_accum", 1))
    return state


_REQUIRED: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "max_steps": (int,),
    "data_position": (int,),
    "optimizer": (dict,),
    "rng": (dict,),
    "args": (dict,),
    "data": (dict,),
}


def load_state(path: Path) -> dict[str, Any]:
    """Read and check a ``trainer_state.pt``. Raises :class:`TrainingError` naming the file when it is
    missing, damaged, carries pickled objects (refused, never run) or lacks an entry of the right type."""
    if not path.is_file():
        raise TrainingError(f"{path} is missing: the checkpoint cannot be resumed")
    if not zipfile.is_zipfile(path):
        raise TrainingError(f"cannot read {path}: not an archive written by torch.save (truncated or corrupt)")
    unsafe = _unsafe_globals(path)
    legacy = bool(unsafe) and set(unsafe) <= _LEGACY_GLOBALS
    if unsafe and not legacy:
        raise TrainingError(
            f"{path} holds pickled Python objects ({', '.join(sorted(unsafe)[:3])}), which could run code: "
            "it was refused and nothing in it was run. A trainer state holds only tensors, numbers and strings"
        )
    try:
        if legacy:
            with torch.serialization.safe_globals(_legacy_safe_globals()):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainingError(
            f"{path} holds something other than tensors, numbers and strings; it was refused and nothing in it "
            f"was run ({str(e).strip().splitlines()[-1][:120] if str(e).strip() else 'unpickling refused'})"
        ) from None
    except Exception as e:  # torch.load raises many types on a damaged file: zip, EOF, runtime
        raise TrainingError(f"cannot read {path}: the file is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise TrainingError(f"{path} holds a {type(raw).__name__}, not a trainer state (a dict)")
    if legacy:
        state = _from_legacy(raw, path)
    elif raw.get("format") == STATE_FORMAT:
        state = raw
    else:
        raise TrainingError(f"{path}: not a trainer state written by blackmamba (format {raw.get('format')!r})")
    _check_state(state, path, _REQUIRED)
    return state


def _check_state(state: dict[str, Any], path: Path, required: dict[str, tuple[type, ...]]) -> None:
    for key, types in required.items():
        if key not in state:
            raise TrainingError(f"{path} has no {key!r} entry: it is not a complete trainer state")
        value = state[key]
        if not isinstance(value, types) or isinstance(value, bool):
            expected = " or ".join(t.__name__ for t in types)
            raise TrainingError(f"{path}: {key!r} is a {type(value).__name__}, expected {expected}")
    if state["step"] < 0 or state["max_steps"] < 1:
        raise TrainingError(f"{path}: step {state['step']} / max_steps {state['max_steps']} are out of range")
    if not isinstance(state["rng"].get("torch"), torch.Tensor):
        raise TrainingError(f"{path}: the stored random-number state is malformed (no torch generator state)")


def load_distributed_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer state and the model config (a dict) of a distributed checkpoint, read from its JSON
    record and checked like :func:`load_state` (the optimizer state lives in DCP's files)."""
    from .dcp import STATE_JSON, read_state

    where = checkpoint / STATE_JSON
    record = read_state(checkpoint)
    state = dict(record["state"])
    state["rng"] = rng_from_json(state.get("rng"), where)
    if not isinstance(state["rng"], dict):
        raise TrainingError(f"{where}: the stored random-number state is malformed (not an object)")
    _check_state(state, where, {k: v for k, v in _REQUIRED.items() if k != "optimizer"})
    return state, record["config"]
