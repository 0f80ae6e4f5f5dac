"""Checkpoints: the only place where parameter names are translated between layouts.

Two layouts on disk:

* **released** (Zyphra's): ``config.json`` (12 Megatron-style fields) + ``pytorch_model.bin`` holding
  ``{"model": state_dict}`` with keys ``embedding.word_embeddings.weight``, ``decoder.layers.{i}.…``,
  ``decoder.final_layernorm.…`` and one ``local_experts.{e}`` pair of weights per expert (spec section 3.3).
* **ours**: ``config.json`` (:class:`BlackMambaConfig`) + ``model.safetensors`` (or shards
  ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``) + ``tokenizer.json`` when
  known. Expert weights are stacked (``mixer.w1`` (E, 2F, D), ``mixer.w2`` (E, D, F)).

Every write goes to a temporary directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Every read checks the full key set and every shape before
any weight is used, so a bad file never yields a partly random model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import BlackMambaConfig, ConfigError
from .model import BlackMamba, cast_model
from .tokenizer import NEOX_SIZE, neox_tokenizer_or_none

CONFIG_NAME = "config.json"
RELEASED_WEIGHTS = "pytorch_model.bin"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
DEFAULT_SHARD_BYTES = 2 * 2**30


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match its config; the message says what and where."""


# ------------------------------------------------------------------------------------------ key names


def expected_shapes(config: BlackMambaConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (from a model built on the meta device)."""
    with torch.device("meta"):
        model = BlackMamba(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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


def check_state_dict(state: dict[str, Any], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise :class:`CheckpointError` naming every missing or unexpected key and every wrong shape."""
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    for key, shape in expected.items():
        value = state.get(key)
        if value is None:
            continue
        if not isinstance(value, Tensor):
            problems.append(f"key {key!r} holds a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != shape:
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


def detect_layout(path: str | os.PathLike) -> str:
    """ "released" or "ours", from the files in the checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
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
    try:
        return BlackMambaConfig.from_json(Path(path) / CONFIG_NAME)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_NAME}: {e}") from None


def _read_released(file: Path) -> dict[str, Tensor]:
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch.load raises many types on bad files: unpickling, zip, EOF, runtime
        raise CheckpointError(
            f"cannot read {file}: the file is truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(loaded, dict) or not isinstance(loaded.get("model"), dict):
        raise CheckpointError(f"{file} is not a released BlackMamba checkpoint: expected a dict with key 'model'")
    return loaded["model"]


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    index_file = path / INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file} is not a valid shard index: {e}") from None
        files = sorted(set(weight_map.values()))
    else:
        weight_map, files = None, [WEIGHTS]
    state: dict[str, Tensor] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint shard {file} is missing")
        try:
            shard = load_file(file)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: the file is truncated or corrupt ({e})") from None
        state.update(shard)
    if weight_map is not None and set(weight_map) != set(state):
        raise CheckpointError(f"{index_file} lists keys that its shards do not hold (or the reverse)")
    return state


def load_state_dict(path: str | os.PathLike) -> tuple[BlackMambaConfig, dict[str, Tensor], str]:
    """Read and check a checkpoint of either layout: (config, state dict in our names, layout)."""
    path = Path(path)
    layout = detect_layout(path)
    config = load_config(path)
    if layout == "released":
        file = path / RELEASED_WEIGHTS
        raw = _read_released(file)
        check_state_dict(raw, released_shapes(config), str(file))
        state = released_to_ours(raw, config)
    else:
        state = _read_safetensors(path)
        check_state_dict(state, expected_shapes(config), str(path))
    return config, state, layout


def load_pretrained(
    path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> BlackMamba:
    """Load a checkpoint (released or our layout) into a :class:`BlackMamba` in eval mode.

    ``dtype`` defaults to the stored dtype (A_log, D and the dt bias are always fp32).
    """
    config, state, _ = load_state_dict(path)
    with torch.device("meta"):
        model = BlackMamba(config)
    model.load_state_dict(state, strict=True, assign=True)
    cast_model(model, dtype or state["embedding.weight"].dtype)
    return model.to(device or "cpu").eval()


# ------------------------------------------------------------------------------------------ writing


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "ckpt")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _shards(state: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards


def _own_state(model: BlackMamba) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_pretrained(
    model: BlackMamba,
    path: str | os.PathLike,
    tokenizer: Any | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``model`` in our layout (config.json, safetensors, tokenizer.json if given), atomically."""
    state = _own_state(model)
    shards = _shards(state, max_shard_bytes)
    with atomic_directory(path) as tmp:
        model.config.to_json(tmp / CONFIG_NAME)
        if len(shards) == 1:
            save_file(shards[0], tmp / WEIGHTS, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(v.numel() * v.element_size() for v in state.values())
            (tmp / INDEX).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER))
    return Path(path)


def save_released(model: BlackMamba, path: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write ``model`` in the released layout, loadable by the reference code's ``from_pretrained``
    (which ignores the extra ``tokenizer.json`` written when a tokenizer is given)."""
    config = model.config
    released_config = config.to_released()
    state = ours_to_released(_own_state(model), config)
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(released_config, indent=2) + "\n")
        torch.save({"model": state}, tmp / RELEASED_WEIGHTS)
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER))
    return Path(path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None) -> str:
    """Convert a checkpoint to the other layout (or to ``to``: "ours" | "released"). Returns the new layout.

    Weights are copied bit for bit (no dtype change). A tokenizer.json beside the source is kept; a
    released checkpoint without one gets the GPT-NeoX-20B tokenizer when it is installed and the
    vocabulary is large enough for it.
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise CheckpointError("convert: source and destination are the same directory")
    config, state, layout = load_state_dict(src)
    target = to or ("ours" if layout == "released" else "released")
    if target not in ("ours", "released"):
        raise CheckpointError(f"convert: unknown target layout {target!r} (use 'ours' or 'released')")
    with torch.device("meta"):
        model = BlackMamba(config)
    model.load_state_dict(state, strict=True, assign=True)
    tokenizer = None
    if (Path(src) / TOKENIZER).is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(src) / TOKENIZER))
    elif layout == "released" and config.vocab_size >= NEOX_SIZE:
        tokenizer = neox_tokenizer_or_none()
    if target == "released":
        save_released(model, dst, tokenizer=tokenizer)
    else:
        save_pretrained(model, dst, tokenizer=tokenizer)
    return target


def checkpoint_size(path: str | os.PathLike) -> int:
    """Bytes on disk of all files in the checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
