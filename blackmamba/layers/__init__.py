"""nn.Modules of BlackMamba. They call :mod:`blackmamba.kernels` for the math, never Triton directly."""

from .mamba import MambaCache, MambaMixer
from .moe import MoE, RouterStats
from .norm import RMSNorm

__all__ = ["MambaCache", "MambaMixer", "MoE", "RMSNorm", "RouterStats"]
