"""The one place that chooses which implementation of an op runs.

The choice comes from :func:`set_backend` / :func:`use_backend`, or the ``BLACKMAMBA_BACKEND``
environment variable when neither was called. Layers never import Triton themselves.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "ref", "torch", "triton")
_ENV = "BLACKMAMBA_BACKEND"
_selected: str | None = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def get_backend() -> str:
    if _selected is not None:
        return _selected
    return _check(os.environ.get(_ENV, "auto"))


def set_backend(name: str) -> None:
    global _selected
    _selected = _check(name)


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend ``name``, then restore the previous choice."""
    global _selected
    previous, _selected = _selected, _check(name)
    try:
        yield
    finally:
        _selected = previous


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(x: torch.Tensor, has_triton: bool = False) -> str:
    """The concrete backend ("ref", "torch" or "triton") for an op on tensor ``x``.

    ``has_triton`` says whether the op has a Triton kernel; ops without one fall back to "torch"
    under "auto" and raise under an explicit "triton" request.
    """
    name = get_backend()
    if name == "auto":
        return "triton" if (has_triton and x.is_cuda and triton_available()) else "torch"
    if name == "triton":
        if not has_triton:
            raise NotImplementedError("this op has no Triton kernel yet; use backend 'auto', 'torch' or 'ref'")
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
        if not x.is_cuda and not triton_interpreted():
            raise RuntimeError(
                f"backend 'triton' needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to run the "
                "kernels on the CPU in Triton's interpreter (slow, for tests)"
            )
    return name


def inference_kernels_apply(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether an inference-only Triton kernel (no backward) may take a call on ``x``: the "triton" backend
    for ``x``, no autograd through ``x`` or ``tensors``, no autocast on ``x``'s device."""
    return (
        not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)))
        and not torch.is_autocast_enabled(x.device.type)
        and resolve_backend(x, has_triton=True) == "triton"
    )
