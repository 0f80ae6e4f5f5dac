"""Routing: pure functions from router logits to each token's expert and gate."""

from .top1 import top1_sigmoid

__all__ = ["top1_sigmoid"]
