"""FLOPs per token from the layer shapes (the paper's training-efficiency comparison).

Counting convention: a multiply-add is 2 FLOPs; only the terms that grow with model width are counted.

* Mamba block: in_proj 2*D*2Di, conv 2*Di*K, x_proj 2*Di*(R+2N), dt_proj 2*R*Di, out_proj 2*Di*D, and the
  selective scan's elementwise work, about 9*Di*N (exp of dt*A, decay, input, state update, C readout).
* MoE block (active, top-1): router 2*D*E, one expert's fc1 2*D*2F and fc2 2*F*D.
* Head: 2*D*V (tied embedding; the embedding lookup is free).
* Training = 3 x forward (backward costs about twice the forward).

Comparison models with the same *active* parameters P, here the parameters one token passes through (one
expert per MoE block) WITHOUT the embedding: its lookup costs nothing and the head is counted separately
above, as Kaplan et al. count. ``blackmamba info`` shows both counts and labels them ("active parameters"
includes the embedding, as the model names 340M/1.5B and 630M/2.8B do; "active, no embedding" is this P).
* dense Mamba: forward 2*P + the scan term of the model's Mamba blocks scaled to P (Mamba's cost is
  its parameters plus the scan, independent of sequence length).
* dense transformer (Kaplan et al. 2020): forward 2*P + 2*n_layer*L*D for causal attention at
  sequence length L, with n_layer = P / (12 * D^2) layers of width D.
"""

from __future__ import annotations

import torch

from ..config import BlackMambaConfig
from ..model import BlackMamba


def _mamba_block(c: BlackMambaConfig) -> tuple[int, int]:
    d, di, n, r, k = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv
    matmul = 2 * d * 2 * di + 2 * di * k + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * d
    return matmul, 9 * di * n


def _moe_block(c: BlackMambaConfig) -> int:
    return 2 * c.d_model * c.n_experts + 2 * c.d_model * 2 * c.d_ff + 2 * c.d_ff * c.d_model


def active_params(c: BlackMambaConfig, embedding: bool = False) -> int:
    """Parameters one token passes through (one expert per MoE block), counted on a meta-device model;
    without the embedding unless ``embedding`` (the P of the comparison, see the module docstring)."""
    with torch.device("meta"):
        return BlackMamba(c).num_parameters(active=True, embedding=embedding)


def flops_per_token(c: BlackMambaConfig, seq_len: int = 2048) -> dict[str, float]:
    n_mamba = c.layer_pattern.count("mamba")
    n_moe = c.n_layers - n_mamba
    m_matmul, m_scan = _mamba_block(c)
    head = 2 * c.d_model * c.vocab_size
    forward = n_mamba * (m_matmul + m_scan) + n_moe * _moe_block(c) + head
    return {"forward": float(forward), "train": 3.0 * forward}


def comparison(c: BlackMambaConfig, seq_len: int = 2048) -> list[dict]:
    """Rows for ``blackmamba flops``: this model, dense Mamba and dense transformer of equal active size."""
    p = active_params(c)
    head = 2 * c.d_model * c.vocab_size
    ours = flops_per_token(c, seq_len)
    m_matmul, m_scan = _mamba_block(c)
    scan_per_param = m_scan / max(1, m_matmul / 2)
    dense_mamba = 2 * p * (1 + scan_per_param) + head
    n_layer = max(1, round(p / (12 * c.d_model**2)))
    transformer = 2 * p + 2 * n_layer * seq_len * c.d_model + head
    return [
        {"model": "BlackMamba (this config)", "active_params": p, "forward": ours["forward"], "train": ours["train"]},
        {
            "model": "dense Mamba, same active params",
            "active_params": p,
            "forward": dense_mamba,
            "train": 3 * dense_mamba,
        },
        {
            "model": f"dense transformer, same active params ({n_layer} layers)",
            "active_params": p,
            "forward": transformer,
            "train": 3 * transformer,
        },
    ]
