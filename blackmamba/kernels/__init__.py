"""Tensor ops with a plain reference beside each fast implementation.

Every public op takes the same arguments as its ``*_ref`` twin; :mod:`.backend` decides which
implementation runs ("ref": the plain reference, "torch": the fast PyTorch path, "triton": GPU kernels,
"auto": triton on CUDA tensors when available, torch elsewhere).
"""

from .backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from .causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from .moe import moe_experts, moe_experts_ref
from .norm import rms_norm, rms_norm_ref
from .selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref, selective_state_update

__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "get_backend",
    "moe_experts",
    "moe_experts_ref",
    "resolve_backend",
    "rms_norm",
    "rms_norm_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
    "set_backend",
    "use_backend",
]
