"""nn.Modules of BlackMamba. They call :mod:`blackmamba.kernels` for the math, never Triton directly, and
never choose a backend: the kernels' dispatchers do."""

from .attention import AttentionMixer, KVCache, KVCacheFullError
from .mamba import MambaCache, MambaMixer
from .mixer import Mixer
from .mlp import MLP
from .moe import MoE, RouterStats
from .norm import RMSNorm

__all__ = [
    "MLP",
    "AttentionMixer",
    "KVCache",
    "KVCacheFullError",
    "MambaCache",
    "MambaMixer",
    "Mixer",
    "MoE",
    "RMSNorm",
    "RouterStats",
]
