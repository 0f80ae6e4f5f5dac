"""FLOPs per token from the layer shapes, block by block from the config's layer pattern (the paper's training-
and inference-efficiency comparisons).

Counting convention: a multiply-add is 2 FLOPs; only the terms that grow with model width or context are
counted (norms, activations and the residual adds are left out).

* Mamba block: in_proj 2*D*2Di, conv 2*Di*K, x_proj 2*Di*(R+2N), dt_proj 2*R*Di, out_proj 2*Di*D, and the
  selective scan's elementwise work, about 9*Di*N (exp of dt*A, decay, input, state update, C readout).
* MoE block (active, top-1): router 2*D*E, one expert's fc1 2*D*2F and fc2 2*F*D.
* MLP block (dense): fc1 2*D*2F and fc2 2*F*D.
* Attention block (width W = H*Dh): W_qkv 2*D*3W and W_out 2*W*D, plus 4*W*n for a query that sees n keys
  (scores q k^T 2*W*n, then the weighted sum of values 2*W*n). Training on sequences of length L: the causal
  mask leaves position t (0-based) t + 1 keys, (L + 1) / 2 on average (the masked half is skipped, as flash
  attention does). Decoding position t: t + 1 keys.
* Head: 2*D*V (tied embedding; the embedding lookup is free).
* Training = 3 x forward (backward costs about twice the forward).

:func:`comparison` sets a config beside the other three of the paper's four models with the same *active*
parameters P (one expert per MoE block, embedding excluded; see :mod:`blackmamba.experiments.baselines` for
how the widths are solved). ``blackmamba info`` shows both parameter counts and labels them ("active
parameters" includes the embedding, as the model names 340M/1.5B and 630M/2.8B do; "active, no embedding"
is this P).
"""

from __future__ import annotations

import torch

from ..config import BlackMambaConfig, ConfigError
from ..model import BlackMamba


def _mamba_block(c: BlackMambaConfig) -> tuple[int, int]:
    """(matmul FLOPs, scan FLOPs) of one Mamba block per token."""
    d, di, n, r, k = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv
    matmul = 2 * d * 2 * di + 2 * di * k + 2 * di * (r + 2 * n) + 2 * r * di + 2 * di * d
    return matmul, 9 * di * n


def _moe_block(c: BlackMambaConfig) -> int:
    return 2 * c.d_model * c.n_experts + _mlp_block(c)


def _mlp_block(c: BlackMambaConfig) -> int:
    return 2 * c.d_model * 2 * c.d_ff + 2 * c.d_ff * c.d_model


def _attention_block(c: BlackMambaConfig, keys: float) -> float:
    """One attention block per token for a query that sees ``keys`` keys (a mean over positions may be
    fractional)."""
    w = c.n_heads * c.head_dim
    return 2 * c.d_model * 3 * w + 2 * w * c.d_model + 4 * w * keys


def block_flops(c: BlackMambaConfig, kind: str, keys: float) -> float:
    """Forward FLOPs per token of one block of ``kind``; ``keys`` is what a query of an attention block sees."""
    if kind == "mamba":
        return float(sum(_mamba_block(c)))
    if kind == "moe":
        return float(_moe_block(c))
    if kind == "mlp":
        return float(_mlp_block(c))
    if kind == "attention":
        return float(_attention_block(c, keys))
    raise ValueError(f"unknown block kind {kind!r}")


def _forward(c: BlackMambaConfig, keys: float) -> float:
    blocks = sum(block_flops(c, kind, keys) for kind in c.layer_pattern)
    return blocks + 2 * c.d_model * c.vocab_size


def active_params(c: BlackMambaConfig, embedding: bool = False) -> int:
    """Parameters one token passes through (one expert per MoE block), counted on a meta-device model;
    without the embedding unless ``embedding`` (the P of the comparison, see the module docstring)."""
    with torch.device("meta"):
        return BlackMamba(c).num_parameters(active=True, embedding=embedding)


def flops_per_token(c: BlackMambaConfig, seq_len: int = 2048) -> dict[str, float]:
    """Forward and training FLOPs per token when training on sequences of ``seq_len`` tokens."""
    forward = _forward(c, (seq_len + 1) / 2)
    return {"forward": float(forward), "train": 3.0 * forward}


def decode_flops(c: BlackMambaConfig, position: int) -> float:
    """Forward FLOPs of generating the token at ``position`` (0-based) from the cache: what one decode step
    costs there (attention blocks see ``position + 1`` keys; Mamba and the MLPs cost the same anywhere)."""
    return float(_forward(c, position + 1))


def generation_flops_per_token(c: BlackMambaConfig, prompt: int, new_tokens: int) -> float:
    """Mean forward FLOPs per generated token over ``new_tokens`` tokens after a ``prompt``-token prompt."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    # Every term but attention's is the same at each position, and attention's is affine in the position.
    return decode_flops(c, prompt + (new_tokens - 1) / 2)


def comparison(c: BlackMambaConfig, seq_len: int = 2048) -> list[dict]:
    """Rows for ``blackmamba flops``: this model, then the paper's other models of equal active parameters
    (dense Mamba, transformer, transformer-MoE, BlackMamba; see :mod:`blackmamba.experiments.baselines`)."""
    from ..experiments.baselines import KINDS, LABELS, kind_of, matched_config

    own = kind_of(c)
    rows = [_row(f"{LABELS[own] if own else 'BlackMamba'} (this config)", c, seq_len)]
    if own is None and not set(c.layer_pattern) <= {"mamba", "moe"}:
        return rows  # a pattern mixing other kinds has no defined baselines
    for kind in KINDS:
        if kind == (own or "blackmamba"):
            continue
        try:
            config = matched_config(c, kind)
        except ConfigError:  # the solved width leaves the config's bounds (a config at the limits)
            continue
        rows.append(_row(f"{LABELS[kind]}, same active params{_heads(config)}", config, seq_len))
    return rows


def _heads(c: BlackMambaConfig) -> str:
    return f" ({c.n_heads} heads)" if "attention" in c.layer_pattern else ""


def _row(label: str, c: BlackMambaConfig, seq_len: int) -> dict:
    fpt = flops_per_token(c, seq_len)
    return {"model": label, "active_params": active_params(c), "forward": fpt["forward"], "train": fpt["train"]}
