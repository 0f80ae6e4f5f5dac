"""Device and dtype choice shared by the command line, the trainer and the evaluator."""

from __future__ import annotations

import warnings

import torch

from .errors import BlackMambaError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(BlackMambaError, ValueError):
    """A device or dtype name that cannot be used here."""


def resolve_device(name: str | torch.device | None, cpu_fallback: bool = False) -> torch.device:
    """ "auto" (or None) picks CUDA when available; otherwise the named CPU or CUDA device, which must exist.

    ``cpu_fallback``: a CUDA device asked for on a machine without one warns and gives the CPU instead of
    failing (lm-eval's own command line asks for ``cuda`` by default)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"bad device {name!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        if cpu_fallback:
            warnings.warn(f"device {name!r} requested but no CUDA GPU is available: using the CPU", stacklevel=2)
            return torch.device("cpu")
        raise DeviceError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The dtype to load a checkpoint in (for :func:`blackmamba.load_pretrained`).

    "auto" (or None): bf16 on a GPU; on the CPU, None, which loading reads as "the dtype the checkpoint is
    stored in": the released bf16 weights stay bf16 (half the memory of fp32: the 1.5B fits in about 3 GiB,
    the 2.8B in about 5.6 GiB), a checkpoint trained here in fp32 stays fp32. The precision and speed this
    costs are measured by ``benchmarks/cpu_dtype.py``. Otherwise one of :data:`DTYPES`.
    """
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in DTYPES:
        raise DeviceError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


class HostCopy:
    """A tensor's copy on its way to the host. From CUDA it goes to pinned memory behind an event, so the
    stream runs on and later work may overwrite the source; elsewhere it is copied at once (never an alias of
    the source). :meth:`tolist` waits for this copy only."""

    def __init__(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self.event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.to("cpu", copy=True)

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
