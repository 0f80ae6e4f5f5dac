"""Tensor ops with a plain reference beside each fast implementation.

Every public op takes the same arguments as its ``*_ref`` twin; :mod:`.backend` decides which
implementation runs ("ref": the plain reference, "torch": the fast PyTorch path, "triton": GPU kernels,
"auto": triton on CUDA tensors when available, torch elsewhere).
"""

from .backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from .causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update
from .decode_step import conv_update_triton, mamba_decode_step, ssm_update_triton
from .moe import moe_experts, moe_experts_grouped_mm, moe_experts_ref, moe_experts_triton
from .norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from .selective_scan import selective_scan, selective_scan_chunked, selective_scan_ref, selective_state_update

__all__ = [
    "BACKENDS",
    "add_rms_norm",
    "add_rms_norm_ref",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_update",
    "conv_update_triton",
    "get_backend",
    "mamba_decode_step",
    "moe_experts",
    "moe_experts_grouped_mm",
    "moe_experts_ref",
    "moe_experts_triton",
    "resolve_backend",
    "rms_norm",
    "rms_norm_ref",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
    "selective_state_update",
    "set_backend",
    "ssm_update_triton",
    "use_backend",
]
