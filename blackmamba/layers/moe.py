"""The MoE sublayer: a Linear router with bias, sigmoid top-1 routing, gated expert MLPs (spec section 1.4).

Named steps: route (router logits in fp32 -> expert, gate) then the experts kernel, which permutes
tokens by expert, runs the gated MLPs over stacked weights and un-permutes with the gate. In training
mode the expert is chosen by Sinkhorn (or plain top-1, per config) and the optional router losses are
computed; every call also returns the number of tokens per expert. Losses and counts are returned in a
:class:`RouterStats`, never kept on the module. The decode step (``step``, ``norm_step``) routes and runs
the experts through the kernels' decode dispatchers and counts nothing; the MoE keeps no decode state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from ..kernels import add_rms_norm_route, moe_experts, moe_experts_decode, route_top1
from ..routing import load_balancing_loss, router_z_loss, sinkhorn_top1, top1_sigmoid
from .mixer import Mixer

if TYPE_CHECKING:
    from .norm import RMSNorm


@dataclass
class RouterStats:
    """What one MoE call reports: tokens per expert (E,), the weighted auxiliary loss (training only,
    None when no loss is enabled) and the Sinkhorn iterations used (0 without Sinkhorn; a 0-d device tensor
    when the Triton kernel ran, so that nothing waits for the GPU until it is logged)."""

    counts_E: Tensor
    aux_loss: Tensor | None = None
    sinkhorn_iters: int | Tensor = 0


class MoE(Mixer):
    def __init__(self, config: BlackMambaConfig) -> None:
        super().__init__()
        d, f, e = config.d_model, config.d_ff, config.n_experts
        self.activation = config.moe_activation
        self.n_experts = e
        self.config = config
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

    def router_logits(self, x_TD: Tensor) -> Tensor:
        return F.linear(x_TD.float(), self.router.weight.float(), self.router.bias.float())

    def route(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        """Router logits in fp32, then sigmoid top-1 as in the released code: (expert (T,), gate (T,))."""
        return top1_sigmoid(self.router_logits(x_TD))

    def forward(
        self, x: Tensor, cache: None = None, mask: Tensor | None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, RouterStats]:
        """x: (B, L, D) -> (B, L, D) and the routing statistics of this call. Stateless: ``cache`` and
        ``slots`` are unused, and padded positions (``mask``) are routed like any token (their outputs are
        never read)."""
        cfg = self.config
        x_TD = x.reshape(-1, x.shape[-1])
        iters, aux = 0, None
        if not self.training:  # routing only: one launch on the Triton backend (see route_top1)
            expert_T, gate_T = route_top1(x_TD, self.router.weight, self.router.bias)
            return self.experts_eval(x_TD, expert_T, gate_T).view_as(x), RouterStats(self._counts(expert_T))
        logits_TE = self.router_logits(x_TD)
        if cfg.train_routing == "sinkhorn":
            expert_T, gate_T, iters = sinkhorn_top1(
                logits_TE, cfg.sinkhorn_tol, cfg.sinkhorn_max_iters, cfg.sinkhorn_init, cfg.sinkhorn_criterion
            )
        else:
            expert_T, gate_T = top1_sigmoid(logits_TE)
        terms = []
        if cfg.load_balance_weight > 0:
            terms.append(cfg.load_balance_weight * load_balancing_loss(logits_TE, expert_T))
        if cfg.z_loss_weight > 0:
            terms.append(cfg.z_loss_weight * router_z_loss(logits_TE))
        aux = sum(terms) if terms else None
        y_TD = moe_experts(x_TD, expert_T, gate_T, *self.expert_weights(x.dtype), self.activation)
        return y_TD.view_as(x), RouterStats(self._counts(expert_T), aux, iters)

    def _counts(self, expert_T: Tensor) -> Tensor:
        """Tokens per expert (E,). Not bincount: on CUDA it reads the largest id back to the host, which a CUDA
        graph cannot hold."""
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=expert_T.device)
        return counts_E.index_add_(0, expert_T, torch.ones_like(expert_T))

    def expert_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w1, w2) for inputs of ``dtype``: the parameters themselves here; an fp8 MoE
        (:mod:`.quant`) dequantizes its weights to ``dtype``."""
        return self.w1, self.w2

    def experts_eval(self, x_TD: Tensor, expert_T: Tensor, gate_T: Tensor) -> Tensor:
        """The experts of an inference forward (any token count); an fp8 MoE reads its weights in place."""
        return moe_experts(x_TD, expert_T, gate_T, *self.expert_weights(x_TD.dtype), self.activation)

    def step(self, x_t: Tensor, cache: None = None, slots: Tensor | None = None) -> Tensor:
        """One token per row: x_t (B, D) -> (B, D), with no statistics (on the Triton backend: the decode
        kernels of :mod:`blackmamba.kernels.moe_decode`, three launches). In training mode the step routes
        as the forward does."""
        if self.training:
            return self(x_t)[0]
        x_TD = x_t.reshape(-1, x_t.shape[-1])
        expert_T, gate_T = route_top1(x_TD, self.router.weight, self.router.bias)
        return self.experts_step(x_TD, expert_T, gate_T).view_as(x_t)

    def experts_step(self, x_TD: Tensor, expert_T: Tensor, gate_T: Tensor) -> Tensor:
        return moe_experts_decode(x_TD, expert_T, gate_T, *self.expert_weights(x_TD.dtype), self.activation)

    def norm_step(
        self, norm: RMSNorm, residual: Tensor, delta: Tensor | None, cache: None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The block's decode step with the routing fused into the norm's kernel (where the decode kernels
        apply; see :func:`blackmamba.kernels.add_rms_norm_route`)."""
        if self.training:
            return super().norm_step(norm, residual, delta, cache, slots)
        router = self.router
        h, residual, expert_T, gate_T = add_rms_norm_route(
            residual, delta, norm.weight, norm.eps, router.weight, router.bias
        )
        return residual, self.experts_step(h.reshape(-1, h.shape[-1]), expert_T, gate_T).view_as(h)
