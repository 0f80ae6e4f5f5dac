"""Shared test helpers: random models with weights large enough that outputs differ between inputs."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (tiny shapes). This must be
# set before any kernel module imports triton.
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

from blackmamba import BlackMamba, BlackMambaConfig  # noqa: E402

# One tolerance table: (rtol, atol) per dtype for comparisons of a fast path with its reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def nan_filled(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer pre-filled with NaN, so that an element a kernel fails to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating buffer from torch.empty / empty_like (how the launchers allocate their outputs) starts as
    NaN, so an element a kernel fails to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randomize(model: BlackMamba, seed: int = 0, scale: float = 0.3) -> BlackMamba:
    """Re-draw every weight at a scale where greedy outputs vary between inputs (the default init makes a
    tiny model repeat its input). A_log, D and dt bias keep plausible ranges."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.5)
            elif name.endswith("dt_proj.bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 4 - 5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def assert_caches_close(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Two InferenceCaches hold the same conv windows and SSM states, block by block."""
    for x, y in zip(a.layers, b.layers, strict=True):
        if x is not None:
            torch.testing.assert_close(x.ssm_state, y.ssm_state, rtol=rtol, atol=atol)
            torch.testing.assert_close(x.conv_state, y.conv_state, rtol=rtol, atol=atol)


def tiny_model(seed: int = 0, **overrides) -> BlackMamba:
    torch.manual_seed(seed)
    return randomize(BlackMamba(BlackMambaConfig.from_preset("tiny", **overrides)), seed).eval()


@pytest.fixture
def tiny() -> BlackMamba:
    return tiny_model()
