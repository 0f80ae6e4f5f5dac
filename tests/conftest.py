"""Fixtures shared by the tests. Helpers that tests import by name live in tests/helpers.py (imported first
here: it points Triton at its interpreter when there is no GPU, before anything imports triton)."""

from __future__ import annotations

import pytest
import torch

# TOL and randomize are re-exported for tests/layers/test_attention.py and tests/layers/test_mlp.py, which
# another change is editing; drop them here once those files import from .helpers.
from .helpers import TOL, BlackMamba, randomize, tiny_model  # noqa: F401


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating buffer from torch.empty / empty_like (how the launchers allocate their outputs) starts as
    NaN, so an element a kernel fails to write shows up in the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


@pytest.fixture
def tiny() -> BlackMamba:
    return tiny_model()
