"""The MoE sublayer: a Linear router with bias, sigmoid top-1 routing, gated expert MLPs (spec section 1.4).

Named steps: route (router logits in fp32 -> expert, gate) then the experts kernel, which permutes
tokens by expert, runs the gated MLPs over stacked weights and un-permutes with the gate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from ..kernels import moe_experts
from ..routing import top1_sigmoid


class MoE(nn.Module):
    def __init__(self, config: BlackMambaConfig) -> None:
        super().__init__()
        d, f, e = config.d_model, config.d_ff, config.n_experts
        self.activation = config.moe_activation
        self.router = nn.Linear(d, e, bias=True)
        self.w1 = nn.Parameter(torch.empty(e, 2 * f, d))  # (E, 2F, D): rows [0, F) activated, [F, 2F) linear
        self.w2 = nn.Parameter(torch.empty(e, d, f))  # (E, D, F)
        self.reset_parameters(config)

    def reset_parameters(self, config: BlackMambaConfig) -> None:
        std = config.initializer_range
        nn.init.normal_(self.router.weight, std=std)
        nn.init.zeros_(self.router.bias)
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w2, std=std / math.sqrt(2 * config.n_layers))

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits in fp32, then top-1: (expert index (T,), gate (T,))."""
        logits_TE = F.linear(x_TD.float(), self.router.weight.float(), self.router.bias.float())
        return top1_sigmoid(logits_TE)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, L, D) -> (B, L, D)."""
        x_TD = x.reshape(-1, x.shape[-1])
        expert_T, gate_T = self.route(x_TD)
        y_TD = moe_experts(x_TD, expert_T, gate_T, self.w1, self.w2, self.activation)
        return y_TD.view_as(x)
