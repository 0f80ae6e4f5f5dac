"""AdamW with the usual exclusions from weight decay, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# No weight decay on the SSM's A_log and D, on norms, biases and the (tied) embedding.
NO_DECAY_SUFFIXES = ("A_log", "mixer.D", "bias", "norm.weight", "embedding.weight")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, with and without weight decay. In a parallelized model, where FSDP's sharded parameters
    (DTensors) sit beside plain ones (the fp32 A_log, D and dt bias it leaves out), each group is split in
    two: the fused AdamW kernel refuses a group that mixes them."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY_SUFFIXES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if not any(isinstance(p, DTensor) for p in decay + no_decay):
        return groups
    split = []
    for group in groups:
        for sharded in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == sharded]
            if params:
                split.append({**group, "params": params})
    return split


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``max_steps``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
