"""Checkpoints: the only place where parameter names are translated between layouts.

Two layouts on disk:

* **released** (Zyphra's): ``config.json`` (12 Megatron-style fields) + ``pytorch_model.bin`` holding
  ``{"model": state_dict}`` with keys ``embedding.word_embeddings.weight``, ``decoder.layers.{i}.…``,
  ``decoder.final_layernorm.…`` and one ``local_experts.{e}`` pair of weights per expert (spec section 3.3).
* **ours**: ``config.json`` (:class:`BlackMambaConfig`) + ``model.safetensors`` (or shards
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``, split by huggingface_hub) +
  ``tokenizer.json`` when known. Expert weights are stacked (``mixer.w1`` (E, 2F, D), ``mixer.w2`` (E, D, F)).
  A training run's step folders add ``trainer_state.pt`` (the optimizer state). An fp8 checkpoint
  (``"quantization": "fp8"`` in its config; ``convert --quantize fp8`` writes one) holds the Mamba projections
  and the experts as ``F8_E4M3`` with their fp32 scales beside them (``mixer.in_proj.scale``,
  ``mixer.w1_scale``, ...; :mod:`blackmamba.layers.quant`); it exists in our layout only.

Reading: every file is untrusted. :func:`open_checkpoint` is the one door: it checks the config's bounds, that
torch files hold nothing but tensors (``weights_only=True``; a pickle with code is refused and said so), that
shard names in the index stay inside the folder, and every key, shape and dtype, before any weight is used.
``blackmamba info`` reads headers only; loading reads the tensors too. A reader never mixes two versions of
a folder that a writer replaces meanwhile: it pins the folder (``/proc/self/fd`` on Linux), opens all its
files at once and holds them, and when the folder was swapped before that (a file gone, or the folder's
identity changed) it reads again, a bounded number of times.

Writing: everything goes to a temporary folder beside the target, which then replaces the target in one
step (``renameat2(RENAME_EXCHANGE)`` on Linux), so a kill at any moment leaves a loadable checkpoint, old or
new. Where that call is missing two renames are used; a kill between them leaves the previous version beside
the target, which readers point to and the next save puts back. A target that exists and is not a checkpoint
is refused unless ``overwrite=True``; a file, the working directory or a folder holding it is never
replaced. Folders and files honour the umask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import pickle
import pickletools
import re
import shutil
import socket
import stat
import tempfile
import time
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .atomic_dir import current_umask, exchange
from .config import BlackMambaConfig, ConfigError
from .errors import BlackMambaError
from .layers.quant import QuantizationError, quantize_fp8, quantized_tensors
from .model import BlackMamba, cast_model
from .tokenizer import NEOX_SIZE, neox_tokenizer_or_none

CONFIG_NAME = "config.json"
RELEASED_WEIGHTS = "pytorch_model.bin"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer_state.pt"
DEFAULT_SHARD_BYTES = 2 * 2**30
SHARD_PATTERN = re.compile(r"model-\d{5,}-of-\d{5,}\.safetensors")
# The files a checkpoint folder may hold; a folder holding anything else is not replaced without overwrite.
CHECKPOINT_FILES = frozenset({CONFIG_NAME, RELEASED_WEIGHTS, WEIGHTS, INDEX, TOKENIZER, TRAINER_STATE})
# Weights must be floating point; cast_model converts between these.
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
MAX_INDEX_BYTES = 64 * 2**20
# What a plain weight file's pickle may import: torch's tensor rebuilders and storages, OrderedDict.
_WEIGHT_MODULES = ("torch", "collections", "_codecs")
# How much of a pickle is parsed to name what it imports (weight pickles are small; tensors live outside).
MAX_PICKLE_SCAN = 64 * 2**20
READ_ATTEMPTS = 5


class CheckpointError(BlackMambaError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match its config; the message says what and where."""


def _one_line(e: BaseException) -> str:
    """A library's message squeezed onto one short line (torch's run over many)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------ key names


def empty_model(config: BlackMambaConfig) -> BlackMamba:
    """The model ``config`` describes on the meta device (quantized when the config says so), for the
    shapes of a checkpoint and for loading one into (``load_state_dict(..., assign=True)``)."""
    with torch.device("meta"):
        model = BlackMamba(config)
    if config.quantization == "fp8":
        try:
            quantize_fp8(model)
        except QuantizationError as e:
            raise CheckpointError(f"cannot load an fp8 checkpoint: {e}") from None
    return model


def expected_shapes(config: BlackMambaConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (from a model built on the meta device)."""
    return {k: tuple(v.shape) for k, v in empty_model(config).state_dict().items()}


def expected_dtypes(config: BlackMambaConfig) -> dict[str, str]:
    """The names whose dtype is fixed by ``config`` (an fp8 model's weights and scales) and that dtype; any
    other weight may be any of :data:`FLOAT_DTYPES`."""
    if config.quantization is None:
        return {}
    return {k: str(v).removeprefix("torch.") for k, v in quantized_tensors(empty_model(config)).items()}


def released_shapes(config: BlackMambaConfig) -> dict[str, tuple[int, ...]]:
    """The released checkpoint's key names and shapes for ``config`` (spec section 3.3)."""
    d, d_in, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    f, e = config.d_ff, config.n_experts
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (config.vocab_size, d)}
    for i, kind in enumerate(config.layer_pattern):
        p = f"decoder.layers.{i}."
        shapes[p + "norm.weight"] = (d,)
        if kind == "mamba":
            shapes.update(
                {
                    p + "mixer.in_proj.weight": (2 * d_in, d),
                    p + "mixer.conv1d.weight": (d_in, 1, k),
                    p + "mixer.conv1d.bias": (d_in,),
                    p + "mixer.x_proj.weight": (r + 2 * n, d_in),
                    p + "mixer.dt_proj.weight": (d_in, r),
                    p + "mixer.dt_proj.bias": (d_in,),
                    p + "mixer.A_log": (d_in, n),
                    p + "mixer.D": (d_in,),
                    p + "mixer.out_proj.weight": (d, d_in),
                }
            )
        else:
            shapes[p + "mixer.router.weight"] = (e, d)
            shapes[p + "mixer.router.bias"] = (e,)
            for j in range(e):
                shapes[p + f"mixer.local_experts.{j}.linear_fc1.weight"] = (2 * f, d)
                shapes[p + f"mixer.local_experts.{j}.linear_fc2.weight"] = (d, f)
    shapes["decoder.final_layernorm.weight"] = (d,)
    shapes["decoder.final_layernorm.bias"] = (d,)
    return shapes


@dataclass(frozen=True)
class TensorSpec:
    """What a file says about one tensor, read without its data: shape and dtype (torch's name)."""

    shape: tuple[int, ...]
    dtype: str


def _spec(value: Tensor) -> TensorSpec:
    return TensorSpec(tuple(value.shape), str(value.dtype).removeprefix("torch."))


def _key_list(keys: list[Any]) -> str:
    shown = [k if len(repr(k)) <= 80 else repr(k)[:77] + "..." for k in keys[:5]]
    return f"{len(keys)} {'key' if len(keys) == 1 else 'keys'}, e.g. {shown}"


def check_state_dict(
    state: Mapping[Any, Tensor | TensorSpec],
    expected: dict[str, tuple[int, ...]],
    where: str,
    dtypes: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`CheckpointError` naming every missing or unexpected key, every value that is not a dense
    floating-point CPU tensor (of the dtype ``dtypes`` names for its key, if any), and every wrong shape.
    Values are tensors, or :class:`TensorSpec` from a file header (then nothing is read but the header)."""
    dtypes = dtypes or {}
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected {_key_list(unexpected)}")
    for key, shape in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if isinstance(value, Tensor):
            if value.layout != torch.strided or value.is_nested or value.device.type != "cpu":
                problems.append(f"key {key!r} holds a {value.layout} tensor on {value.device}, not plain data")
                continue
            value = _spec(value)
        if not isinstance(value, TensorSpec):
            problems.append(f"key {key!r} holds a {type(value).__name__}, not a tensor")
        elif key in dtypes and value.dtype != dtypes[key]:
            problems.append(f"key {key!r} holds {value.dtype} values; an fp8 checkpoint stores it as {dtypes[key]}")
        elif key not in dtypes and value.dtype not in FLOAT_DTYPES:
            problems.append(f"key {key!r} holds {value.dtype} values; weights must be one of {list(FLOAT_DTYPES)}")
        elif value.shape != shape:
            problems.append(f"key {key!r}: expected shape {list(shape)} from config.json, found {list(value.shape)}")
    if problems:
        raise CheckpointError(f"{where} does not match its config.json: " + "; ".join(problems[:8]))


def released_to_ours(state: dict[str, Tensor], config: BlackMambaConfig) -> dict[str, Tensor]:
    """Translate a released state dict (checked first) into our names, stacking the experts."""
    out: dict[str, Tensor] = {"embedding.weight": state["embedding.word_embeddings.weight"]}
    for i, kind in enumerate(config.layer_pattern):
        src, dst = f"decoder.layers.{i}.", f"layers.{i}."
        out[dst + "norm.weight"] = state[src + "norm.weight"]
        if kind == "mamba":
            for name in (
                "in_proj.weight",
                "conv1d.weight",
                "conv1d.bias",
                "x_proj.weight",
                "dt_proj.weight",
                "dt_proj.bias",
                "A_log",
                "D",
                "out_proj.weight",
            ):
                out[dst + "mixer." + name] = state[src + "mixer." + name]
        else:
            out[dst + "mixer.router.weight"] = state[src + "mixer.router.weight"]
            out[dst + "mixer.router.bias"] = state[src + "mixer.router.bias"]
            experts = range(config.n_experts)
            out[dst + "mixer.w1"] = torch.stack(
                [state[src + f"mixer.local_experts.{e}.linear_fc1.weight"] for e in experts]
            )
            out[dst + "mixer.w2"] = torch.stack(
                [state[src + f"mixer.local_experts.{e}.linear_fc2.weight"] for e in experts]
            )
    out["final_norm.weight"] = state["decoder.final_layernorm.weight"]
    out["final_norm.bias"] = state["decoder.final_layernorm.bias"]
    return out


def ours_to_released(state: dict[str, Tensor], config: BlackMambaConfig) -> OrderedDict[str, Tensor]:
    """Inverse of :func:`released_to_ours`: experts unstacked, released key names in the spec's order."""
    flat: dict[str, Tensor] = {
        "embedding.word_embeddings.weight": state["embedding.weight"],
        "decoder.final_layernorm.weight": state["final_norm.weight"],
        "decoder.final_layernorm.bias": state["final_norm.bias"],
    }
    pattern = re.compile(r"layers\.(\d+)\.(.*)")
    for key, value in state.items():
        m = pattern.fullmatch(key)
        if m is None:
            continue
        i, rest = m.groups()
        src = f"decoder.layers.{i}."
        if rest in ("mixer.w1", "mixer.w2"):
            fc = "linear_fc1" if rest.endswith("w1") else "linear_fc2"
            for e in range(value.shape[0]):
                flat[src + f"mixer.local_experts.{e}.{fc}.weight"] = value[e].clone()
        else:
            flat[src + rest] = value
    return OrderedDict((key, flat[key]) for key in released_shapes(config))


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder that passed every check of :func:`open_checkpoint`.

    ``state`` holds the weights in our names when they were asked for, else None (``info`` needs only the
    headers). ``dtype`` is the stored dtype of the embedding; ``optimizer_bytes`` is the size of
    ``trainer_state.pt`` (0 outside a training run), which ``size_bytes`` includes.
    """

    path: Path
    layout: str
    config: BlackMambaConfig
    files: tuple[Path, ...]
    dtype: torch.dtype
    size_bytes: int
    optimizer_bytes: int
    state: dict[str, Tensor] | None = None


def detect_layout(path: str | os.PathLike) -> str:
    """ "released" or "ours", from the files in the checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist{_interrupted_save_hint(path)}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (expected config.json plus weights)")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"checkpoint {path} has no {CONFIG_NAME}")
    if (path / WEIGHTS).is_file() or (path / INDEX).is_file():
        return "ours"
    if (path / RELEASED_WEIGHTS).is_file():
        return "released"
    raise CheckpointError(f"checkpoint {path} has no weights ({WEIGHTS}, {INDEX} or {RELEASED_WEIGHTS})")


def load_config(path: str | os.PathLike) -> BlackMambaConfig:
    """The checked config of the checkpoint folder ``path`` (either layout)."""
    file = Path(path) / CONFIG_NAME
    _check_regular_file(file)
    try:
        return BlackMambaConfig.from_json(file)
    except ConfigError as e:  # its message starts with the file's path
        raise CheckpointError(str(e)) from None


def open_checkpoint(path: str | os.PathLike, load_weights: bool = False) -> Checkpoint:
    """Open and check the checkpoint folder ``path`` (either layout): the one way every command reads one.

    Checks the config (types and bounds), the index, every file header, key, shape and dtype; with
    ``load_weights`` also reads the tensors (in our names) into ``Checkpoint.state``. Raises
    :class:`CheckpointError` naming the file and the problem. When the folder is replaced while it is read
    (a save over it), it is read again, up to ``READ_ATTEMPTS`` times, so config and weights always come
    from one version.
    """
    path = Path(path)
    for attempt in range(READ_ATTEMPTS):
        if _identity(path) is None and attempt + 1 < READ_ATTEMPTS and _interrupted_save_hint(path):
            time.sleep(0.05 * (attempt + 1))  # a save without RENAME_EXCHANGE is between its two renames
            continue
        with _pinned(path) as base:
            before = _identity(base)
            try:
                opened = _open_once(base, load_weights)
            except (CheckpointError, OSError) as e:
                if _identity(path) != before:
                    continue  # replaced while read: a file of the old version was deleted, or two got mixed
                message = str(e) if isinstance(e, CheckpointError) else f"cannot read checkpoint {base}: {_one_line(e)}"
                raise CheckpointError(message.replace(str(base), str(path))) from None
            if base != path or _identity(path) == before:
                files = tuple(path / f.relative_to(base) for f in opened.files)
                return dataclasses.replace(opened, path=path, files=files)
    raise CheckpointError(
        f"checkpoint {path} was replaced during each of {READ_ATTEMPTS} reads; is another process saving it?"
    )


@contextmanager
def _pinned(path: Path) -> Iterator[Path]:
    """A name for the folder ``path`` is now, that keeps naming it if a writer swaps another in: on Linux
    ``/proc/self/fd/N`` of an open descriptor, so that every file comes from one version; elsewhere ``path``
    itself, and :func:`open_checkpoint` compares the folder's identity before and after instead."""
    fd = None
    if os.path.isdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        yield path if fd is None else Path(f"/proc/self/fd/{fd}")
    finally:
        if fd is not None:
            os.close(fd)


def load_state_dict(path: str | os.PathLike) -> tuple[BlackMambaConfig, dict[str, Tensor], str]:
    """Read and check a checkpoint of either layout: (config, state dict in our names, layout)."""
    opened = open_checkpoint(path, load_weights=True)
    assert opened.state is not None
    return opened.config, opened.state, opened.layout


def load_pretrained(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> BlackMamba:
    """Load a checkpoint (released or our layout) into a :class:`BlackMamba` in eval mode.

    ``dtype`` defaults to the stored dtype (A_log, D and the dt bias are always fp32). An fp8 checkpoint
    loads as the quantized model (its fp8 weights and scales as stored; ``dtype`` is that of the rest and of
    the activations).
    """
    config, state, _ = load_state_dict(path)
    model = empty_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    cast_model(model, dtype or state["embedding.weight"].dtype)
    return model.to(device or "cpu").eval()


def checkpoint_size(path: str | os.PathLike) -> int:
    """Bytes on disk of all files in the checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _open_once(path: Path, load_weights: bool) -> Checkpoint:
    # Every file is opened first, in a burst, and held open: a writer that swaps the folder and deletes the old
    # version meanwhile cannot take a file away half-way (the slow checks come after).
    layout = detect_layout(path)
    config = load_config(path)
    state: dict[str, Tensor] | None = None
    with contextlib.ExitStack() as held:
        if layout == "released":
            file = path / RELEASED_WEIGHTS
            raw = _read_released(file)
            check_state_dict(raw, released_shapes(config), str(file))
            files: tuple[Path, ...] = (file,)
            dtype = raw["embedding.word_embeddings.weight"].dtype
            if load_weights:
                state = released_to_ours(raw, config)
        else:
            handles, specs = _open_safetensors(path, held)
            files = tuple(handles)
            check_state_dict(specs, expected_shapes(config), str(path), expected_dtypes(config))
            dtype = getattr(torch, specs["embedding.weight"].dtype)
            if load_weights:
                state = _read_safetensors_tensors(handles)
    trainer_state = path / TRAINER_STATE
    return Checkpoint(
        path=path,
        layout=layout,
        config=config,
        files=files,
        dtype=dtype,
        size_bytes=checkpoint_size(path),
        optimizer_bytes=trainer_state.stat().st_size if trainer_state.is_file() else 0,
        state=state,
    )


def _identity(path: Path) -> tuple[int, ...] | None:
    """What changes when a writer swaps the folder: a new inode, and new times even if the inode is reused."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def _check_regular_file(file: Path) -> None:
    """Refuse a FIFO, device or folder where a file belongs: reading /dev/zero or a pipe would never end."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or _one_line(e)}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{file} is not a regular file")


def _read_released(file: Path) -> dict[Any, Any]:
    """The ``model`` dict of a released ``pytorch_model.bin``, loaded with ``weights_only=True``: a file that
    needs anything but tensors and plain containers is refused before any of it runs."""
    _check_regular_file(file)
    zipped = zipfile.is_zipfile(file)  # torch.save's format; mmap keeps the weights out of memory until used
    if not zipped:
        with open(file, "rb") as f:
            if f.read(1) != b"\x80":  # the legacy format starts with a pickle's PROTO opcode
                raise CheckpointError(
                    f"cannot read {file}: the file is truncated or corrupt (neither a zip nor a legacy torch file)"
                )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of legacy files
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        raise CheckpointError(_refusal(file, str(e))) from None
    except Exception as e:  # torch.load raises many types on bad files: zip, EOF, runtime, value
        detail = "" if "weights_only" in str(e) else f" ({type(e).__name__}: {_one_line(e)})"
        raise CheckpointError(f"cannot read {file}: the file is truncated or corrupt{detail}") from None
    if not isinstance(loaded, dict) or "model" not in loaded:
        found = f"a dict with keys {_key_list(list(loaded))}" if isinstance(loaded, dict) else type(loaded).__name__
        raise CheckpointError(
            f"{file} is not a released BlackMamba checkpoint: expected a dict with key 'model', found {found}"
        )
    if not isinstance(loaded["model"], dict):
        raise CheckpointError(
            f"{file}: 'model' holds a {type(loaded['model']).__name__}, expected a dict of named tensors"
        )
    return loaded["model"]


def _refusal(file: Path, torch_message: str) -> str:
    """Why torch's weights-only loader refused ``file``, in our words (torch's suggest the unsafe loader).
    The file's pickle is parsed, never run, to name what it imports."""
    imports = _pickle_imports(file)
    if imports is None or "Weights only load failed" not in torch_message:
        return f"cannot read {file}: the file is truncated or corrupt (not a readable pickle)"
    code = sorted({name for name in imports if name.split(".")[0] not in _WEIGHT_MODULES})
    if code or "Unsupported operand" not in torch_message:
        what = f" (it imports {', '.join(code[:3])})" if code else ""
        return f"{file} holds Python code (a pickle that is not plain tensors) and was refused{what}"
    return (
        f"{file} was refused: its pickle uses opcodes the safe loader does not read (pickle protocol 4 or later); "
        "re-save it with torch.save's default protocol"
    )


def _pickle_imports(file: Path) -> list[str] | None:
    """The names the pickles of a torch file import (GLOBAL, STACK_GLOBAL, INST), found by parsing the opcodes
    without running them; None when the first pickle does not parse."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with z.open(name) as f:
                    blob = f.read(MAX_PICKLE_SCAN)
        else:
            with open(file, "rb") as f:
                blob = f.read(MAX_PICKLE_SCAN)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return None
    imports: list[str] = []
    strings: list[str] = []
    start = 0
    for n in range(8):  # a legacy file is several pickles in a row (magic, protocol, system info, object)
        stop = None
        try:
            for op, arg, pos in pickletools.genops(blob[start:]):
                if op.name in ("GLOBAL", "INST"):  # protocol 2 writes builtins as Python 2's __builtin__
                    imports.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    imports.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
                    stop = start + pos + 1
        except Exception:  # pickletools raises ValueError and others on bytes that are no pickle
            return None if n == 0 else imports
        if stop is None or stop >= len(blob):
            break
        start = stop
    return imports


def _read_index(path: Path) -> dict[str, str]:
    """The weight map of ``model.safetensors.index.json``, every file name in it checked to stay inside
    ``path`` (no absolute path, no ``..``, no symbolic link leading out)."""
    index_file = path / INDEX
    _check_regular_file(index_file)
    try:
        with open(index_file, "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES // 2**20} MiB")
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{index_file} is not a valid shard index: JSON nested too deeply") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index_file} is not a valid shard index: {_one_line(e)}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        found = type(weight_map).__name__ if isinstance(data, dict) and "weight_map" in data else "nothing"
        raise CheckpointError(
            f"{index_file} is not a valid shard index: 'weight_map' must map tensor names to file names, "
            f"found {'an empty dict' if weight_map == {} else found}"
        )
    bad = [(k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if bad:
        key, value = bad[0]
        raise CheckpointError(
            f"{index_file}: weight_map[{key!r}] must be a file name, found {type(value).__name__} {value!r:.60}"
        )
    root = os.path.realpath(path)
    for name in sorted(set(weight_map.values())):
        inside = "\0" not in name and not os.path.isabs(name) and ".." not in Path(name).parts
        if inside:
            real = os.path.realpath(os.path.join(root, name))
            inside = os.path.commonpath([root, real]) == root and real != root
        if not inside:
            raise CheckpointError(
                f"{index_file} names the shard {name!r:.100}, which lies outside the checkpoint folder "
                f"(an absolute path, '..' or a symbolic link leading out); refused"
            )
    return weight_map


def _open_safetensors(path: Path, held: contextlib.ExitStack) -> tuple[dict[Path, Any], dict[str, TensorSpec]]:
    """The weight files of our layout, opened (and held open by ``held``), and what their headers say; no
    tensor data is read."""
    weight_map = _read_index(path) if (path / INDEX).is_file() else None
    names = sorted(set(weight_map.values())) if weight_map is not None else [WEIGHTS]
    files = tuple(path / name for name in names)
    specs: dict[str, TensorSpec] = {}
    where: dict[str, Path] = {}
    handles: dict[Path, Any] = {}
    for file in files:
        if not os.path.lexists(file):
            raise CheckpointError(f"checkpoint shard {file} is missing")
        _check_regular_file(file)
        with _safetensors_errors(file):
            handles[file] = held.enter_context(safe_open(str(file), framework="pt"))
    for file, f in handles.items():
        with _safetensors_errors(file):
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = piece.get_dtype()
                spec = TensorSpec(tuple(piece.get_shape()), _SAFETENSORS_DTYPES.get(dtype, dtype.lower()))
                if key in where:
                    raise CheckpointError(f"key {key!r} is stored twice, in {where[key]} and {file}")
                if weight_map is not None and key in weight_map and path / weight_map[key] != file:
                    raise CheckpointError(f"{path / INDEX} puts {key!r} in {weight_map[key]}, but {file} holds it")
                specs[key], where[key] = spec, file
    if weight_map is not None and set(weight_map) != set(specs):
        absent = sorted(set(weight_map) - set(specs))
        unlisted = sorted(set(specs) - set(weight_map))
        raise CheckpointError(
            f"{path / INDEX} does not match its shards: listed but absent {absent[:5]}, held but unlisted "
            f"{unlisted[:5]}"
        )
    return handles, specs


def _read_safetensors_tensors(handles: dict[Path, Any]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for file, f in handles.items():
        with _safetensors_errors(file):
            for key in f.keys():
                state[key] = f.get_tensor(key)
    return state


@contextmanager
def _safetensors_errors(file: Path) -> Iterator[None]:
    """Any failure of the safetensors library on ``file`` as one :class:`CheckpointError`."""
    try:
        yield
    except (CheckpointError, KeyboardInterrupt):
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint shard {file} is missing") from None
    except BaseException as e:
        # A Rust panic in the library arrives as pyo3's PanicException, which derives from BaseException.
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise CheckpointError(f"cannot read {file}: the file is truncated or corrupt ({_one_line(e)})") from None


def _interrupted_save_hint(path: Path) -> str:
    """When ``path`` is missing but a save interrupted between its two renames left the previous version
    beside it: where that version is."""
    olds = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")) if path.parent.is_dir() else []
    olds = [p for p in olds if (p / CONFIG_NAME).is_file()]
    if not olds:
        return ""
    return f" (an interrupted save left the previous version in {olds[-1]}; rename it to {path} to use it)"


# ------------------------------------------------------------------------------------------ writing


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; when the body succeeds it replaces ``target`` in one step.

    ``target`` may be missing, empty or a checkpoint; anything else (a file, a folder holding other things)
    is refused with :class:`CheckpointError` unless ``overwrite``, before anything is written and again just
    before the swap. A file, the working directory and the folders above it are refused even then. The old
    version is deleted only after the new one is in place; a failure leaves ``target`` as it was, and every
    write error becomes a :class:`CheckpointError` naming ``target``.
    """
    target = Path(target)
    _check_destination(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {target}: {e.strerror or _one_line(e)}") from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a checkpoint follows the umask
        yield tmp
        _check_destination(target, overwrite)
        _settle_tree(tmp, current_umask())
        _swap_into_place(tmp, target)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot write checkpoint {target}: {_one_line(e)}") from None
    finally:
        _remove_quietly(tmp)


def _check_destination(target: Path, overwrite: bool) -> None:
    if os.path.islink(target):
        raise CheckpointError(f"{target} is a symbolic link; give the folder it points to, or another destination")
    if os.path.lexists(target) and not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a checkpoint folder; refusing to replace it")
    if not target.is_dir():
        for parent in target.parents:
            if os.path.lexists(parent) and not parent.is_dir():
                raise CheckpointError(f"cannot write checkpoint {target}: {parent} is a file")
        return
    real = os.path.realpath(target)
    cwd = os.path.realpath(os.getcwd())
    if real == os.path.dirname(real) or os.path.commonpath([real, cwd]) == real:
        raise CheckpointError(f"refusing to replace {target}: it is, or holds, the current directory")
    try:
        entries = sorted(os.listdir(target))
    except OSError as e:
        raise CheckpointError(f"cannot read {target}: {e.strerror or _one_line(e)}") from None
    if overwrite or not entries or is_checkpoint_folder(target):
        return
    foreign = [name for name in entries if not _checkpoint_file(target / name)] or entries
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    raise CheckpointError(
        f"{target} exists and is not a checkpoint (it holds {shown}); refusing to replace it: choose another "
        "destination, or pass overwrite=True (--overwrite)"
    )


def is_checkpoint_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a config, weights and nothing but the files a checkpoint is made of, so that
    replacing it loses nothing the tools did not write."""
    path = Path(path)
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    known = all(_checkpoint_file(path / name) for name in entries)
    has_weights = WEIGHTS in entries or INDEX in entries or RELEASED_WEIGHTS in entries
    return known and CONFIG_NAME in entries and has_weights


def _checkpoint_file(file: Path) -> bool:
    """One of the files a checkpoint is made of (a plain file, not a link)."""
    named = file.name in CHECKPOINT_FILES or SHARD_PATTERN.fullmatch(file.name) is not None
    return named and not file.is_symlink() and file.is_file()


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put the finished folder ``tmp`` at ``target``, then delete what was there."""
    if not os.path.lexists(target):
        os.rename(tmp, target)  # fails, rather than replaces, if a non-empty folder appeared meanwhile
    elif exchange(tmp, target):
        _remove_quietly(tmp)  # tmp now holds the old version
    else:
        old = target.parent / f".{target.name}.old-{_owner_tag()}-{os.urandom(4).hex()}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove_quietly(old)
    _fsync_dir(target.parent)


def _remove_quietly(folder: Path) -> None:
    """Delete a temporary folder; failing to is no reason to fail a save (the next save after this process
    ends removes it)."""
    with contextlib.suppress(OSError):
        if os.path.lexists(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _owner_tag() -> str:
    """host-pid, in the names of temporary folders, so that a later save can tell abandoned ones."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _remove_stale_temporaries(target: Path) -> None:
    """Delete the temporary folders of saves to ``target`` that were killed (their process, on this host,
    is gone); folders of live saves are left alone. A save killed between the two renames of the fallback
    left ``target`` missing and its previous version beside it: that version is put back first."""
    host = _owner_tag().rsplit("-", 1)[0]
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-{re.escape(host)}-(\d+)-.*")
    stale = []
    for entry in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _alive(int(m.group(2))):
            stale.append((m.group(1), entry))
    for kind, entry in stale:
        if kind == "old" and not os.path.lexists(target) and (entry / CONFIG_NAME).is_file():
            os.rename(entry, target)
        else:
            _remove_quietly(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _settle_tree(folder: Path, umask: int) -> None:
    """Give every file and folder the mode the umask asks for (safetensors writes its files private), and
    flush them all to disk, before the folder is swapped in."""
    for entry in folder.iterdir():
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, 0o777 & ~umask)
            _settle_tree(entry, umask)
        else:
            os.chmod(entry, 0o666 & ~umask)
            with open(entry, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can open a folder (Windows)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _own_state(model: BlackMamba) -> dict[str, Tensor]:
    """The model's tensors on the CPU, each owning exactly its storage (the shard sizes count storages)."""
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().contiguous().cpu()
        if value.untyped_storage().nbytes() != value.numel() * value.element_size():
            value = value.clone()
        state[key] = value
    return state


def _write_safetensors(state: dict[str, Tensor], folder: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards ``model-0000k-of-0000n.safetensors`` plus the index when the weights
    exceed ``max_shard_bytes``: huggingface_hub's split, which keeps exactly these names and the index format
    ``{"metadata": {"total_size": ...}, "weight_map": {...}}`` that transformers and the hub read."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes
    )
    for name, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, folder / name, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_pretrained(
    model: BlackMamba,
    path: str | os.PathLike,
    tokenizer: Any | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` in our layout (config.json, safetensors, tokenizer.json if given), atomically.

    ``path`` may be missing, empty or a checkpoint (replaced); any other folder only with ``overwrite``.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    state = _own_state(model)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        model.config.to_json(tmp / CONFIG_NAME)
        _write_safetensors(state, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER))
    return Path(path)


def save_released(
    model: BlackMamba, path: str | os.PathLike, tokenizer: Any | None = None, overwrite: bool = False
) -> Path:
    """Write ``model`` in the released layout, loadable by the reference code's ``from_pretrained``
    (which ignores the extra ``tokenizer.json`` written when a tokenizer is given). ``path`` as in
    :func:`save_pretrained`."""
    config = model.config
    released_config = config.to_released()
    state = ours_to_released(_own_state(model), config)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(released_config, indent=2) + "\n")
        try:
            torch.save({"model": state}, tmp / RELEASED_WEIGHTS)
        except RuntimeError as e:  # torch reports a failed write (a full disk) as a RuntimeError
            raise OSError(_one_line(e)) from None
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER))
    return Path(path)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
) -> str:
    """Convert a checkpoint to the other layout (or to ``to``: "ours" | "released"). Returns the new layout.

    The tensors are copied bit-exact (no dtype change); the files' bytes differ from any other writer's (for
    instance from the released download), since the containers are laid out anew. ``quantize="fp8"``
    writes the fp8 weight-only model instead (:func:`blackmamba.layers.quant.quantize_fp8`; our layout, the
    default target then), every other tensor copied as it is. A tokenizer.json beside the
    source is kept; a released checkpoint without one gets the GPT-NeoX-20B tokenizer when it is installed and
    the vocabulary is large enough for it. ``dst`` as in :func:`save_pretrained`; it may never be ``src``, hold
    ``src`` or lie inside it.
    """
    if to not in (None, "ours", "released"):
        raise CheckpointError(f"convert: unknown target layout {to!r} (use 'ours' or 'released')")
    if quantize not in (None, "fp8"):
        raise CheckpointError(f"convert: unknown quantization {quantize!r} (the one supported is 'fp8')")
    if quantize is not None and to == "released":
        raise CheckpointError("convert: the released layout cannot hold fp8 weights; --quantize writes our layout")
    source, dest = os.path.realpath(src), os.path.realpath(dst)
    if source == dest:
        raise CheckpointError("convert: source and destination are the same directory")
    if os.path.commonpath([source, dest]) == dest:
        raise CheckpointError(f"convert: {dst} holds the source {src}; replacing it would delete the source")
    if os.path.commonpath([source, dest]) == source:
        raise CheckpointError(f"convert: {dst} lies inside the source checkpoint {src}; choose another place")
    _check_destination(Path(dst), overwrite)  # before the long read
    config, state, layout = load_state_dict(src)
    if quantize is not None and config.quantization is not None:
        raise CheckpointError(f"convert: {src} is already quantized ({config.quantization})")
    target = to or ("ours" if layout == "released" or quantize or config.quantization else "released")
    if target == "released" and config.quantization is not None:
        raise CheckpointError(
            f"convert: {src} holds {config.quantization} weights, which the released layout cannot hold "
            "(convert the unquantized checkpoint instead)"
        )
    model = empty_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    if quantize is not None:
        try:
            quantize_fp8(model)
        except QuantizationError as e:
            raise CheckpointError(f"convert: cannot quantize {src}: {e}") from None
    tokenizer = None
    if os.path.lexists(Path(src) / TOKENIZER):
        from .tokenizer import read_tokenizer

        tokenizer = read_tokenizer(Path(src) / TOKENIZER)
    elif layout == "released" and config.vocab_size >= NEOX_SIZE:
        tokenizer = neox_tokenizer_or_none()
    if target == "released":
        save_released(model, dst, tokenizer=tokenizer, overwrite=overwrite)
    else:
        save_pretrained(model, dst, tokenizer=tokenizer, overwrite=overwrite)
    return target
