"""Expert parallelism and rank-independent routing for the MoE sublayer, applied to a built model from outside.

:func:`apply_expert_parallel` turns every :class:`blackmamba.layers.MoE` of a model into a
:class:`DistributedMoE` (the same parameters under the same names; only ``forward`` differs), so
``layers/`` and ``model.py`` never mention parallelism. Per call, as the MoE's own named steps:

1. **route** - router logits in fp32 on this rank's tokens. Sinkhorn (training) balances the experts over
   the whole global batch, not over one rank's share: the logits of all ranks are all-gathered (T x E
   floats, small next to the activations) and the unchanged :func:`blackmamba.routing.sinkhorn_top1` runs
   on them, so every token gets exactly the expert it gets in one process. The gate stays the sigmoid of
   the chosen logit, with its gradient, on the token's own rank. Plain top-1 (inference, or
   ``train_routing="top1"``) needs nothing from the other ranks. Tokens per expert are summed over the
   ranks, and the balancing loss is written so that its mean over the ranks is the global loss.
2. **dispatch** - with E > 1 ranks per expert group, each rank holds n_experts / E experts (the stacked
   ``w1``/``w2`` become DTensors sharded on the expert axis). Tokens are sorted by expert and sent to the
   rank holding their expert with ``all_to_all_single`` with uneven splits (the counts are exchanged
   first); nothing is dropped, however uneven the load.
3. **experts** - the public :func:`blackmamba.kernels.moe_experts` (the grouped GEMM the MoE uses) on the
   local experts, for the tokens received from every rank of the group.
4. **combine** - the outputs go back by the reverse all-to-all, are scaled by the gate and put back in
   token order. Both all-to-alls are autograd functions, so gradients take the reverse path.

The expert gradients that reach a rank are summed over its expert group by the all-to-all's backward;
FSDP then divides by the world size instead of its own group size (see :func:`.distributed.apply_fsdp`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..kernels import moe_experts
from ..layers import MoE, RouterStats
from ..model import BlackMamba
from ..routing import router_z_loss, sinkhorn_top1, top1_sigmoid
from .distributed import DistributedError, Meshes

__all__ = ["DistributedMoE", "all_to_all", "apply_expert_parallel", "dispatch_layout"]

# torch >= 2.13 names it all_gather_single and deprecates the older name, which 2.9 - 2.12 need.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send`` go to the ranks of ``group``; rows from them arrive split by ``recv``.
    The backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, recv: list[int], send: list[int], group: ProcessGroup) -> Tensor:
        ctx.recv, ctx.send, ctx.group = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: Tensor, recv: list[int], send: list[int], group: ProcessGroup) -> Tensor:
    """Differentiable ``all_to_all_single`` over rows: ``send[r]`` rows of ``x`` (in order) go to rank r of
    ``group``, ``recv[r]`` rows come from it."""
    return _AllToAll.apply(x, recv, send, group)


def dispatch_layout(counts_E: Tensor, recv_counts_E: Tensor, ep: int) -> tuple[list[int], list[int], Tensor]:
    """From this rank's tokens per expert (E,) and the counts the other ranks of the group will send for
    this rank's experts (``recv_counts_E`` (ep * E_local,), grouped by source rank): rows to send to each
    rank, rows to receive from each, and the local expert (in [0, E_local)) of every received row, which
    arrive grouped by source rank, then by expert."""
    n_local = counts_E.numel() // ep
    send = counts_E.view(ep, n_local).sum(1).tolist()
    recv = recv_counts_E.view(ep, n_local).sum(1).tolist()
    local_ids = torch.arange(n_local, device=counts_E.device).repeat(ep)
    return send, recv, torch.repeat_interleave(local_ids, recv_counts_E)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class DistributedMoE(MoE):
    """An MoE whose routing sees the global batch and whose experts may live on other ranks.

    Made only by :func:`apply_expert_parallel` (from a built :class:`MoE`, by class change: the parameters,
    their names and the checkpoint layout are untouched). ``expert_group`` is None without expert
    parallelism; ``routing_group`` spans the ranks that hold different tokens (all of them).
    """

    expert_group: ProcessGroup | None
    ep_size: int
    routing_group: ProcessGroup | None

    def forward(
        self, x: Tensor, cache: None = None, mask: Tensor | None = None, slots: Tensor | None = None
    ) -> tuple[Tensor, RouterStats]:
        cfg = self.config
        x_TD = x.reshape(-1, x.shape[-1])
        # With experts on other ranks the router is its own FSDP unit, so it must be called as a module.
        logits_TE = self.router(x_TD.float()) if self.expert_group is not None else self.router_logits(x_TD)
        iters = 0
        if self.training and cfg.train_routing == "sinkhorn":
            expert_T, iters = self._global_sinkhorn(logits_TE)
            gate_T = torch.sigmoid(logits_TE.gather(-1, expert_T[:, None]).squeeze(-1))
        else:
            expert_T, gate_T = top1_sigmoid(logits_TE)
        counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=expert_T.device)
        counts_E.index_add_(0, expert_T, torch.ones_like(expert_T))
        global_counts_E = counts_E.clone()
        if self.routing_group is not None:
            dist.all_reduce(global_counts_E, op=dist.ReduceOp.SUM, group=self.routing_group)
        aux = self._aux_loss(logits_TE, global_counts_E) if self.training else None
        if self.expert_group is None:
            y_TD = moe_experts(x_TD, expert_T, gate_T, self.w1, self.w2, self.activation)
        else:
            y_TD = self._experts_all_to_all(x_TD, expert_T, gate_T, counts_E)
        return y_TD.view_as(x), RouterStats(global_counts_E, aux, iters)

    def _global_sinkhorn(self, logits_TE: Tensor) -> tuple[Tensor, int | Tensor]:
        """Sinkhorn over the logits of every rank (all-gathered in rank order, which is the order of the
        global batch), then this rank's rows."""
        cfg = self.config
        local = logits_TE.detach()
        if self.routing_group is None:
            full = local
        else:
            n = dist.get_world_size(self.routing_group)
            full = local.new_empty((n * local.shape[0], local.shape[1]))
            _all_gather(full, local.contiguous(), group=self.routing_group)
        expert_all, _, iters = sinkhorn_top1(
            full, cfg.sinkhorn_tol, cfg.sinkhorn_max_iters, cfg.sinkhorn_init, cfg.sinkhorn_criterion
        )
        start = (dist.get_rank(self.routing_group) if self.routing_group is not None else 0) * local.shape[0]
        return expert_all[start : start + local.shape[0]], iters

    def _aux_loss(self, logits_TE: Tensor, global_counts_E: Tensor) -> Tensor | None:
        """The router losses of the config. The balancing loss E * sum_e f_e * p_e takes f_e (no gradient)
        from the global counts and p_e from this rank's tokens: with equal shares, its mean over the ranks
        (what gradient averaging computes) is the loss of the global batch."""
        cfg = self.config
        terms = []
        if cfg.load_balance_weight > 0:
            fraction_E = global_counts_E.to(logits_TE.dtype) / global_counts_E.sum()
            prob_E = torch.softmax(logits_TE.float(), dim=-1).mean(dim=0)
            terms.append(cfg.load_balance_weight * self.n_experts * (fraction_E * prob_E).sum())
        if cfg.z_loss_weight > 0:
            terms.append(cfg.z_loss_weight * router_z_loss(logits_TE))
        return sum(terms) if terms else None

    def _experts_all_to_all(self, x_TD: Tensor, expert_T: Tensor, gate_T: Tensor, counts_E: Tensor) -> Tensor:
        group, ep = self.expert_group, self.ep_size
        recv_counts_E = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_E, counts_E, group=group)
        send, recv, local_expert = dispatch_layout(counts_E, recv_counts_E, ep)
        order_T = torch.argsort(expert_T, stable=True)
        x_recv = all_to_all(x_TD[order_T], recv, send, group)
        w1, w2 = _local(self.w1), _local(self.w2)
        ones = torch.ones(x_recv.shape[0], dtype=gate_T.dtype, device=x_recv.device)
        y_recv = moe_experts(x_recv, local_expert, ones, w1, w2, self.activation)
        if x_recv.shape[0] == 0:
            # No token for this rank's experts: keep them in the graph so every rank reduces a gradient.
            y_recv = y_recv + 0 * (w1.sum() + w2.sum()).to(y_recv.dtype)
        y_sorted = all_to_all(y_recv, send, recv, group)
        y_sorted = y_sorted * gate_T[order_T, None].to(y_sorted.dtype)
        return x_TD.new_zeros(x_TD.shape, dtype=y_sorted.dtype).index_copy(0, order_T, y_sorted)

    def step(self, x_t: Tensor, cache: None = None, slots: Tensor | None = None) -> Tensor:
        if self.expert_group is not None:
            raise DistributedError("decoding runs on an exported model, not on an expert-parallel one")
        return super().step(x_t, cache, slots)

    def norm_step(self, norm: Any, residual: Tensor, delta: Tensor | None, cache: None = None, slots: Any = None):
        if self.expert_group is not None:
            raise DistributedError("decoding runs on an exported model, not on an expert-parallel one")
        return super().norm_step(norm, residual, delta, cache, slots)


def apply_expert_parallel(model: BlackMamba, meshes: Meshes) -> BlackMamba:
    """Make every MoE of ``model`` a :class:`DistributedMoE` for the layout of ``meshes``: routing over the
    global batch, and with E > 1 its experts split over the expert group (rank i of the group keeps experts
    [i * n / E, (i + 1) * n / E) of the model; every rank must have built the same model). Call before
    FSDP (:func:`.distributed.apply_fsdp`), with the model on its device."""
    ep_mesh = meshes.ep_mesh
    routing_group = dist.group.WORLD if meshes.dims.world_size > 1 else None
    for module in model.modules():
        if not isinstance(module, MoE) or isinstance(module, DistributedMoE):
            continue
        if module.n_experts % meshes.dims.ep:
            raise DistributedError(
                f"--expert-parallel {meshes.dims.ep} does not divide the model's {module.n_experts} experts"
            )
        module.__class__ = DistributedMoE
        module.routing_group = routing_group
        module.ep_size = meshes.dims.ep
        module.expert_group = None
        if ep_mesh is not None:
            module.expert_group = ep_mesh.get_group()
            for name in ("w1", "w2"):
                full = getattr(module, name)
                shard = distribute_tensor(full.detach(), ep_mesh, [Shard(0)])
                setattr(module, name, nn.Parameter(shard, requires_grad=full.requires_grad))
    return model
