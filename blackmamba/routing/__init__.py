"""Routing: pure functions from router logits to each token's expert and gate, and router losses."""

from .losses import load_balancing_loss, router_z_loss
from .sinkhorn import SINKHORN_CRITERIA, SINKHORN_INITS, sinkhorn, sinkhorn_top1
from .top1 import top1_sigmoid

__all__ = [
    "SINKHORN_CRITERIA",
    "SINKHORN_INITS",
    "load_balancing_loss",
    "router_z_loss",
    "sinkhorn",
    "sinkhorn_top1",
    "top1_sigmoid",
]
