"""Tensor ops with a plain reference beside each fast implementation.

Every public op takes the same arguments as its ``*_ref`` twin (for the decode steps:
``selective_state_update``, ``causal_conv1d_update``); :mod:`.backend` decides which implementation runs
("ref": the plain reference, "torch": the fast PyTorch path, "triton": GPU kernels, "auto": triton on CUDA
tensors when available, torch elsewhere), and :mod:`.settings` holds the tuning switches of the fast paths.
Layers and models import ops from here only.
"""

from .backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from .causal_conv1d import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_triton,
    causal_conv1d_update,
    conv_update,
    conv_update_triton,
)
from .gemv import dequantize, linear, linear_conv, linear_conv_triton, linear_reference, linear_triton
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .moe import (
    gated_activation,
    gated_activation_ref,
    moe_experts,
    moe_experts_fp8,
    moe_experts_grouped_mm,
    moe_experts_ref,
    moe_experts_triton,
)
from .moe_decode import (
    decode_kernels_apply,
    moe_experts_decode,
    moe_experts_decode_triton,
    route_top1,
    route_top1_ref,
    route_top1_triton,
)
from .moe_fused import moe_experts_fused
from .norm import (
    add_rms_norm,
    add_rms_norm_ref,
    add_rms_norm_route,
    add_rms_norm_route_ref,
    add_rms_norm_route_triton,
    rms_norm,
    rms_norm_ref,
)
from .scan import selective_scan, selective_scan_ref, selective_state_update, ssm_update
from .scan_chunked import selective_scan_chunked
from .scan_cpu import selective_scan_cpu
from .scan_triton import selective_scan_triton, ssm_update_triton
from .settings import KernelSettings, get_settings, use_settings

__all__ = [
    "BACKENDS",
    "KernelSettings",
    "add_rms_norm",
    "add_rms_norm_ref",
    "add_rms_norm_route",
    "add_rms_norm_route_ref",
    "add_rms_norm_route_triton",
    "causal_conv1d",
    "causal_conv1d_ref",
    "causal_conv1d_triton",
    "causal_conv1d_update",
    "conv_update",
    "conv_update_triton",
    "decode_kernels_apply",
    "dequantize",
    "gated_activation",
    "gated_activation_ref",
    "get_backend",
    "get_settings",
    "linear",
    "linear_conv",
    "linear_conv_triton",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "linear_reference",
    "linear_triton",
    "moe_experts",
    "moe_experts_decode",
    "moe_experts_decode_triton",
    "moe_experts_fp8",
    "moe_experts_fused",
    "moe_experts_grouped_mm",
    "moe_experts_ref",
    "moe_experts_triton",
    "resolve_backend",
    "rms_norm",
    "rms_norm_ref",
    "route_top1",
    "route_top1_ref",
    "route_top1_triton",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_cpu",
    "selective_scan_ref",
    "selective_scan_triton",
    "selective_state_update",
    "set_backend",
    "ssm_update",
    "ssm_update_triton",
    "use_backend",
    "use_settings",
]
