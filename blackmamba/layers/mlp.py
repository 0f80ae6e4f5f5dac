"""The dense gated MLP of the paper's dense baselines (dense Mamba, transformer): one expert without a router.

    [a ; b] = W_1 x   (2F rows: the first F activated, the last F linear);   y = W_2 (act(a) * b)

It computes what an MoE expert computes (same weight layout as one slice of the stacked ``w1`` (2F, D) and
``w2`` (D, F), same ``moe_activation``), without the router and its gate, so that the dense and the MoE
models differ in nothing but the routing. It keeps no decode state; a step is the forward on one token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from .mixer import Mixer

_ACTIVATIONS = {
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"),
}


class MLP(Mixer):
    def __init__(self, config: BlackMambaConfig) -> None:
        super().__init__()
        d, f = config.d_model, config.d_ff
        self.activation = config.moe_activation
        self.fc1 = nn.Linear(d, 2 * f, bias=False)
        self.fc2 = nn.Linear(f, d, bias=False)
        self.reset_parameters(config)

    @torch.no_grad()
    def reset_parameters(self, config: BlackMambaConfig) -> None:
        std = config.initializer_range
        nn.init.normal_(self.fc1.weight, std=std)
        nn.init.normal_(self.fc2.weight, std=std / math.sqrt(2 * config.n_layers))

    def _mlp(self, x: Tensor) -> Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(_ACTIVATIONS[self.activation](a) * b)

    def forward(
        self, x: Tensor, cache: None = None, mask: Tensor | None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, None]:
        """x (B, L, D) -> ((B, L, D), None); position-wise, so ``cache``, ``mask`` and ``slots`` are unused."""
        return self._mlp(x), None

    def step(self, x_t: Tensor, cache: None = None, slots: Tensor | None = None) -> Tensor:
        """x_t (B, D) -> (B, D)."""
        return self._mlp(x_t)
