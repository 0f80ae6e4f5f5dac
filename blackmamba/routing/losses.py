"""Optional auxiliary router losses (off by default, as in the paper, whose Sinkhorn routing needs none).

* Switch-Transformer load balancing: E * sum_e f_e * p_e, with f_e the fraction of tokens sent to expert
  e and p_e the mean softmax probability of e. It equals 1 for a perfectly uniform router.
* Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, keeping router logits small.
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(logits_TE: Tensor, expert_T: Tensor) -> Tensor:
    experts = logits_TE.shape[-1]
    counts_E = torch.zeros(experts, dtype=logits_TE.dtype, device=expert_T.device)
    fraction_E = counts_E.index_add_(0, expert_T, torch.ones_like(expert_T, dtype=logits_TE.dtype)) / expert_T.numel()
    prob_E = torch.softmax(logits_TE.float(), dim=-1).mean(dim=0)
    return experts * (fraction_E * prob_E).sum()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
