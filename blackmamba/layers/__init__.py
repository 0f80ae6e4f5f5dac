"""nn.Modules of BlackMamba. They call :mod:`blackmamba.kernels` for the math, never Triton directly, and
never choose a backend: the kernels' dispatchers do."""

from .mamba import MambaCache, MambaMixer
from .mixer import Mixer
from .moe import MoE, RouterStats
from .norm import RMSNorm

__all__ = ["MambaCache", "MambaMixer", "Mixer", "MoE", "RMSNorm", "RouterStats"]
