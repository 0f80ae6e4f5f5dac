"""The tied head and the cross-entropy in one op, without the (T, V) logits of the whole batch.

    loss = mean_t [ logsumexp_v (h_t . W_v) - h_t . W_{y_t} ]      (over the tokens whose target is not ignored)

:func:`linear_cross_entropy_ref` is what the trainer did before: ``F.linear`` to (T, V) logits, a cast to fp32
and ``F.cross_entropy``. At 4 x 2048 tokens and V = 50304 that holds 0.8 GB of bf16 logits, 1.6 GB of fp32
ones and as much again of log-probabilities and their gradient.

:func:`linear_cross_entropy` walks the tokens in chunks of ``chunk_size``: a chunk's logits in the compute
dtype (bf16 under autocast, as the reference's ``F.linear``), their logsumexp and the target's logit in fp32,
and, when a gradient is wanted, the chunk's gradient right away (the loss is the end of the graph, so its
gradient is known up to the incoming scalar): dlogits = softmax - onehot, rounded to the compute dtype as
the reference's backward does, then dh = dlogits @ W and dW += dlogits^T h (summed in fp32 over the chunks).
The backward only scales the stored dh and dW. No logit is computed twice, and at most one chunk's logits
(in fp32) live at a time.

Departures from the reference: dW is summed over chunks in fp32 where the reference rounds the one product
over all tokens to the compute dtype (ours is the closer one), and the loss of each chunk is summed in fp32
in another order. Reductions "mean" and "sum" only (the gradient is formed in the forward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import get_backend
from .settings import get_settings

REDUCTIONS = ("mean", "sum")


def _compute_dtype(h_TD: Tensor, weight_VD: Tensor) -> torch.dtype:
    """The dtype of the logits: autocast's when it is on (as ``F.linear`` under autocast), else the
    promoted dtype of the inputs."""
    device = h_TD.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h_TD.dtype, weight_VD.dtype)


def _check(h_TD: Tensor, weight_VD: Tensor, targets_T: Tensor, reduction: str, chunk_size: int) -> None:
    if h_TD.ndim != 2 or weight_VD.ndim != 2 or h_TD.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: want h (T, D) and weight (V, D), got {tuple(h_TD.shape)} and "
            f"{tuple(weight_VD.shape)}"
        )
    if targets_T.shape != h_TD.shape[:1] or targets_T.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"linear_cross_entropy: want integer targets of shape ({h_TD.shape[0]},), got "
            f"{tuple(targets_T.shape)} {targets_T.dtype}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")


def linear_cross_entropy_ref(
    h_TD: Tensor,
    weight_VD: Tensor,
    targets_T: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Cross-entropy of the logits h (T, D) @ weight (V, D)^T against targets (T,): the whole (T, V) logits in
    the compute dtype, then fp32. ``chunk_size`` is unused (the fused op's argument)."""
    _check(h_TD, weight_VD, targets_T, reduction, chunk_size)
    dtype = _compute_dtype(h_TD, weight_VD)
    logits = F.linear(h_TD.to(dtype), weight_VD.to(dtype))
    return F.cross_entropy(logits.float(), targets_T.long(), ignore_index=ignore_index, reduction=reduction)


def _chunk_loss(logits_CV: Tensor, t_C: Tensor, keep_C: Tensor) -> Tensor:
    """The summed loss (fp32 scalar) of a chunk's logits (C, V) in the compute dtype."""
    logits = logits_CV.float()
    target_C = logits.gather(1, torch.where(keep_C, t_C, 0)[:, None]).squeeze(1)
    return ((torch.logsumexp(logits, dim=-1) - target_C) * keep_C).sum()


def _chunk_loss_grad(logits_CV: Tensor, t_C: Tensor, keep_C: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """The summed loss of a chunk and its logits' gradient (softmax - onehot) x ``scale`` for the kept tokens
    (0 for the others), in the logits' dtype. Overwrites ``logits_CV`` when it is fp32 (the caller's temporary)."""
    logits = logits_CV.float()
    safe_t = torch.where(keep_C, t_C, 0)
    lse_C = torch.logsumexp(logits, dim=-1)
    target_C = logits.gather(1, safe_t[:, None]).squeeze(1)
    loss = ((lse_C - target_C) * keep_C).sum()
    probs = logits.sub_(lse_C[:, None]).exp_()
    probs.scatter_add_(1, safe_t[:, None], -keep_C.to(probs.dtype)[:, None])
    return loss, probs.mul_((keep_C * scale)[:, None]).to(logits_CV.dtype)


_compiled: dict[str, Callable] = {}


def _glue(name: str, fn: Callable, compiled: bool) -> Callable:
    """``fn``, or ``fn`` under torch.compile (made once) when ``compiled``: the chunk's elementwise work then
    reads the logits once and writes the gradient once, where eager PyTorch makes about seven passes."""
    if not compiled:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_TD, weight_VD, targets_T, ignore_index, reduction, chunk_size, dtype, grad_enabled):
        # needs_input_grad is set under no_grad too: the caller says whether a backward can follow.
        need_h, need_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        h_c, w_c = h_TD.to(dtype), weight_VD.to(dtype)
        keep_T = targets_T != ignore_index
        targets_T = targets_T.long()
        total = torch.zeros((), dtype=torch.float32, device=h_TD.device)
        count = keep_T.sum()
        scale = None
        if need_h or need_w:
            scale = 1.0 / count.float() if reduction == "mean" else torch.ones((), device=h_TD.device)
        dh = torch.empty_like(h_TD) if need_h else None
        dw = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        compiled = get_settings().loss_compiled
        for lo in range(0, h_TD.shape[0], chunk_size):
            hi = min(lo + chunk_size, h_TD.shape[0])
            logits = F.linear(h_c[lo:hi], w_c)
            if scale is None:
                total += _glue("loss", _chunk_loss, compiled)(logits, targets_T[lo:hi], keep_T[lo:hi])
                continue
            loss, dlogits = _glue("grad", _chunk_loss_grad, compiled)(logits, targets_T[lo:hi], keep_T[lo:hi], scale)
            total += loss
            del logits
            if need_h:
                dh[lo:hi] = dlogits @ w_c
            if need_w and dlogits.dtype == dw.dtype:
                dw.addmm_(dlogits.t(), h_c[lo:hi])
            elif need_w:
                dw.add_(dlogits.t() @ h_c[lo:hi])  # the chunk's product in the compute dtype, summed in fp32
        ctx.save_for_backward(dh, None if dw is None else dw.to(weight_VD.dtype))
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        dh = None if dh is None else dh * grad_loss.to(dh.dtype)
        dw = None if dw is None else dw * grad_loss.to(dw.dtype)
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy(
    h_TD: Tensor,
    weight_VD: Tensor,
    targets_T: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Cross-entropy of the logits h (T, D) @ weight (V, D)^T against targets (T,), in chunks of
    ``chunk_size`` tokens (by default the ``loss_chunk`` kernel setting; ``loss_compiled`` compiles the
    chunks' elementwise work) (see the module docstring); the same arguments and result as
    :func:`linear_cross_entropy_ref`, which the "ref" backend runs instead. Differentiable in h and weight;
    the gradients come back in their dtypes (fp32 for fp32 master weights under autocast)."""
    if get_backend() == "ref":
        return linear_cross_entropy_ref(h_TD, weight_VD, targets_T, ignore_index, reduction, chunk_size)
    chunk_size = get_settings().loss_chunk if chunk_size is None else chunk_size
    _check(h_TD, weight_VD, targets_T, reduction, chunk_size)
    dtype = _compute_dtype(h_TD, weight_VD)
    grad_enabled = torch.is_grad_enabled()
    # The named range lets a profile (benchmarks/train_profile.py) sum the GPU time of the head and the loss.
    with torch.profiler.record_function("linear_cross_entropy"), torch.autocast(h_TD.device.type, enabled=False):
        return _LinearCrossEntropy.apply(
            h_TD, weight_VD, targets_T, ignore_index, reduction, chunk_size, dtype, grad_enabled
        )
