"""The shapes the kernel benchmarks and tile sweeps run at, and random inputs at those shapes.

BlackMamba-2.8B widths (d_model 1472, d_inner 2944, N 16, conv width 4, 8 experts of F 3872), bf16 as on
the GPU. ``benchmarks/kernels.py`` and the sweeps in ``benchmarks/tune/`` share them, so a tile picked by
a sweep is the tile the kernel benchmark then measures.
"""

from __future__ import annotations

import torch

from blackmamba import BlackMambaConfig

from .harness import BF16

CFG = BlackMambaConfig.from_preset("blackmamba-2.8b")
D_MODEL, D_IN, N, R, K = CFG.d_model, CFG.d_inner, CFG.d_state, CFG.dt_rank, CFG.d_conv
E, F_FF = CFG.n_experts, CFG.d_ff


def scan_inputs(batch: int, length: int, seed: int = 0, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Keyword arguments of ``selective_scan_*`` at (batch, length) and the 2.8B widths, bf16 activations;
    B, C and z are strided views, as the model passes them."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0, dtype: torch.dtype = BF16) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dtype)

    proj = rand(batch, length, R + 2 * N)  # B and C are views of the x_proj output, as in the model
    return {
        "u": rand(batch, length, D_IN),
        "delta": rand(batch, length, D_IN, scale=0.5),
        "A": -torch.exp(torch.rand(D_IN, N, generator=g, device=device) * 2.5),
        "B": proj[..., R : R + N],
        "C": proj[..., R + N :],
        "D": rand(D_IN, dtype=torch.float32),
        "z": rand(batch, length, 2 * D_IN)[..., D_IN:],
        "delta_bias": torch.rand(D_IN, generator=g, device=device) * 4 - 5,
    }
