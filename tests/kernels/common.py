"""Helpers shared by the kernel tests."""

import torch


def grads_of(fn, inputs):
    """fn(*inputs) (its first output if a tuple) and the gradients of a random projection of it."""
    out = fn(*inputs)
    if isinstance(out, tuple):
        out = out[0]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return out, torch.autograd.grad((out * weight).float().sum(), inputs)
