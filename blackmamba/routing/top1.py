"""Top-1 routing as the released BlackMamba computes it (spec section 1.4).

The router's probabilities are an element-wise sigmoid of the logits (not a softmax); each token goes to
its most probable expert and the expert's output is scaled by that probability, with no renormalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def top1_sigmoid(logits_TE: Tensor) -> tuple[Tensor, Tensor]:
    """logits (T, E) -> (expert index (T,) int64, gate (T,) = the chosen expert's sigmoid probability).

    The argmax is taken over the probabilities, not the logits, as the released code does: large logits
    saturate the sigmoid to exactly 1.0 and the tie then goes to the lowest expert index.
    """
    probs_TE = torch.sigmoid(logits_TE)
    gate_T, expert_T = probs_TE.max(dim=-1)
    return expert_T, gate_T
