"""AdamW with the usual exclusions from weight decay, gradient clipping, and a warmup + cosine learning-rate
schedule."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
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


def takes_device_scalars(optimizer: torch.optim.Optimizer) -> bool:
    """PyTorch's fused Adam and AdamW read two device tensors in their step: ``optimizer.grad_scale`` divides
    every gradient as the kernel loads it, ``optimizer.found_inf`` (1.0) skips the step, step count included."""
    return bool(optimizer.defaults.get("fused"))


def clip_gradients(
    optimizer: torch.optim.Optimizer, parameters: list[Tensor], max_norm: float, distributed: bool = False
) -> Tensor:
    """The total 2-norm of the parameters' gradients (over every rank and mesh when ``distributed``), and
    the gradients clipped to ``max_norm`` (``<= 0``: not clipped) as :func:`torch.nn.utils.clip_grad_norm_`
    clips them, scaled by ``max_norm / (norm + 1e-6)`` where that is below 1. With a fused optimizer the
    scaling happens in its next step (``grad_scale``), so it costs no pass over the gradients of its own;
    otherwise one multi-tensor multiply now. Nothing here reads the norm on the host."""
    fused = takes_device_scalars(optimizer)
    if distributed:
        from .distributed import clip_grad_norm_

        norm = clip_grad_norm_(parameters, 0.0 if fused else max_norm)
    elif fused or max_norm <= 0:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if fused:
        scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0).reshape(()) if max_norm > 0 else None
        optimizer.grad_scale = scale  # 0-d: DTensor parameters take it as replicated
    return norm


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr`` at ``max_steps``."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
