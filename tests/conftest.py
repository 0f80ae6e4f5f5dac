"""Shared test helpers: random models with weights large enough that outputs differ between inputs."""

from __future__ import annotations

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig

# One tolerance table: (rtol, atol) per dtype for comparisons of a fast path with its reference.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


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


def tiny_model(seed: int = 0, **overrides) -> BlackMamba:
    torch.manual_seed(seed)
    return randomize(BlackMamba(BlackMambaConfig.from_preset("tiny", **overrides)), seed).eval()


@pytest.fixture
def tiny() -> BlackMamba:
    return tiny_model()
