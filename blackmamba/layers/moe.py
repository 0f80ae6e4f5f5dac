"""The MoE sublayer: a Linear router with bias, sigmoid top-1 routing, gated expert MLPs (spec section 1.4).

Named steps: route (router logits in fp32 -> expert, gate) then the experts kernel, which permutes
tokens by expert, runs the gated MLPs over stacked weights and un-permutes with the gate. In training
mode the expert is chosen by Sinkhorn (or plain top-1, per config) and the optional router losses are
computed; every call also returns the number of tokens per expert. Losses and counts are returned in a
:class:`RouterStats`, never kept on the module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BlackMambaConfig
from ..kernels import moe_decode, moe_experts, resolve_backend
from ..kernels.moe_decode import moe_experts_decode_triton, route_top1_triton
from ..routing import load_balancing_loss, router_z_loss, sinkhorn_top1, top1_sigmoid


@dataclass
class RouterStats:
    """What one MoE call reports: tokens per expert (E,), the weighted auxiliary loss (training only,
    None when no loss is enabled) and the Sinkhorn iterations used (0 without Sinkhorn)."""

    counts_E: Tensor
    aux_loss: Tensor | None = None
    sinkhorn_iters: int = 0


class MoE(nn.Module):
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

    def decode_kernels_apply(self, x: Tensor, dtype: torch.dtype | None = None) -> bool:
        """Whether the experts of tokens ``x`` (..., D) run on the decode kernels (:mod:`..kernels.moe_decode`):
        inference (no training, no autograd, no autocast) of at most ``moe_decode.DECODE_TOKENS`` tokens on
        the Triton backend, with the input in the experts' dtype (``dtype``: the input's, if not x's)."""
        dtype = x.dtype if dtype is None else dtype
        tokens = x.numel() // x.shape[-1] if x.ndim else 0
        return (
            not self.training
            and tokens <= min(moe_decode.DECODE_TOKENS, moe_decode.MAX_TOKENS)
            and not (torch.is_grad_enabled() and (x.requires_grad or self.w1.requires_grad))
            and not torch.is_autocast_enabled(x.device.type)
            and dtype == self.w1.dtype == self.w2.dtype
            and resolve_backend(x, has_triton=True) == "triton"
        )

    def experts_decode(self, x_TD: Tensor, expert_T: Tensor, gate_T: Tensor) -> Tensor:
        """The experts on the decode kernels for tokens already routed: x (T, D) -> (T, D)."""
        return moe_experts_decode_triton(x_TD, expert_T, gate_T, self.w1, self.w2, self.activation)

    def forward(self, x: Tensor, with_stats: bool = True) -> tuple[Tensor, RouterStats | None]:
        """x: (B, L, D) -> (B, L, D) and the routing statistics of this call (None without ``with_stats``:
        the decode step skips counting tokens per expert, three small kernels per layer and token, and on
        the Triton backend runs the fused decode kernels of :mod:`..kernels.moe_decode`)."""
        cfg = self.config
        x_TD = x.reshape(-1, x.shape[-1])
        if not with_stats and self.decode_kernels_apply(x_TD):
            expert_T, gate_T = route_top1_triton(x_TD, self.router.weight, self.router.bias)
            return self.experts_decode(x_TD, expert_T, gate_T).view_as(x), None
        logits_TE = self.router_logits(x_TD)
        iters, aux = 0, None
        if self.training and cfg.train_routing == "sinkhorn":
            expert_T, gate_T, iters = sinkhorn_top1(
                logits_TE, cfg.sinkhorn_tol, cfg.sinkhorn_max_iters, cfg.sinkhorn_init, cfg.sinkhorn_criterion
            )
        else:
            expert_T, gate_T = top1_sigmoid(logits_TE)
        if self.training:
            terms = []
            if cfg.load_balance_weight > 0:
                terms.append(cfg.load_balance_weight * load_balancing_loss(logits_TE, expert_T))
            if cfg.z_loss_weight > 0:
                terms.append(cfg.z_loss_weight * router_z_loss(logits_TE))
            aux = sum(terms) if terms else None
        y_TD = moe_experts(x_TD, expert_T, gate_T, self.w1, self.w2, self.activation)
        if not with_stats and aux is None:
            return y_TD.view_as(x), None
        # Not bincount: on CUDA it reads the largest id back to the host, which a CUDA graph cannot hold.
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=expert_T.device)
        counts_E.index_add_(0, expert_T, torch.ones_like(expert_T))
        return y_TD.view_as(x), RouterStats(counts_E, aux, iters)
