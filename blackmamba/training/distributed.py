"""Training on many processes with PyTorch's own engine: process groups, device meshes, FSDP2, data slices.

Parallelism is a transform applied to a built model from here (as torchtitan does); ``model.py`` and
``layers/`` never mention it. Launch with ``torchrun`` (one process per GPU, or per CPU slot with gloo):

    dims = ParallelDims(world_size, ep=E, fsdp=True)       # E divides the number of experts (8 when released)
    meshes = dims.build_meshes(device.type)
    parallelize(model, meshes)                             # expert parallelism, then FSDP2 per block

Layout (world size W, expert-parallel degree E, S = W / E):

* **Data** is split over all W ranks: rank r reads windows ``[r*b, (r+1)*b)`` of every global batch of
  ``b*W`` windows (:func:`rank_window_starts`), so the global batch, and with it the loss, does not depend
  on W. Expert parallelism takes its ranks from the data-parallel ones, as in torchtitan.
* **Dense weights** (Mamba mixers, norms, routers, the tied embedding) are sharded over all W ranks with
  FSDP2 (``fsdp=True``), or replicated with their gradients averaged (``fsdp=False``: HSDP with one shard,
  which is DDP).
* **Expert weights** (the stacked ``w1``/``w2`` of every MoE) are split over the E ranks of an expert group
  (a DTensor sharded on the expert axis, each rank holding n_experts / E experts), and sharded with FSDP2
  over the S ranks that hold the same experts (replicated without ``fsdp``). When S * E exceeds the number
  of experts, FSDP shards them along their second axis instead (torchtitan's rule, relevant for 8 experts).
  Tokens reach their experts by all-to-all (:mod:`.expert_parallel`).

Mixed precision on GPU: parameters are all-gathered and used in bf16, gradients are reduced in fp32, and the
optimizer keeps fp32 master weights (the sharded parameters). A_log, D and the dt bias stay fp32 as in
:func:`blackmamba.model.cast_model`: FSDP leaves them out (they are small and replicated) and a gradient
hook averages them over the ranks. On CPU (gloo) everything stays fp32.

Failures: every process group has a timeout (:func:`init_distributed`); :func:`fail_fast` turns an exception
on any rank into one line naming the rank and the error and ends that process at once with status 1;
``torchrun`` then stops the other ranks, so no rank waits forever on a collective that will never come.
Logs and files come from rank 0 only (:func:`is_main_process`).
"""

from __future__ import annotations

import math
import os
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import BlackMambaError
from ..layers import MoE
from ..model import FP32_PARAMS, BlackMamba

__all__ = [
    "DistEnv",
    "DistributedError",
    "ONE_RANK_BLOCKS_PER_UNIT",
    "Meshes",
    "ParallelDims",
    "all_reduce_mean",
    "all_reduce_sum",
    "any_rank",
    "apply_fsdp",
    "barrier",
    "broadcast_int",
    "clip_grad_norm_",
    "fail_fast",
    "init_distributed",
    "is_main_process",
    "launched_by_torchrun",
    "mixed_precision",
    "parallelize",
    "reduce_scatter_copy_in",
    "rank",
    "rank_eval_batches",
    "rank_window_starts",
    "set_fast_copy_in",
    "world_size",
]

DEFAULT_TIMEOUT_S = 600.0
# Blocks per FSDP unit on one rank by default: FSDP2's hooks cost the host about 1.3 ms per unit and step
# (2.8B on an H200: 4 blocks per unit 0.87-0.99x the plain step, one block 0.77-0.96x; benchmarks/results/
# distributed*.json), and one rank holds every unit's gathered parameters whatever their size.
ONE_RANK_BLOCKS_PER_UNIT = 4


class DistributedError(BlackMambaError, ValueError):
    """A parallel layout that cannot work with this world size, model or batch."""


# ------------------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size``, its rank on the node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on the one process that writes logs, metrics, plots and the progress bar (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment names this process's place in a group (torchrun sets these)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL on CUDA (one GPU per local rank), gloo on CPU. A collective that waits
    longer than ``timeout_s`` fails instead of hanging."""
    if not launched_by_torchrun():
        raise DistributedError(
            "no process group to join: launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        )
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise DistributedError(f"the process-group timeout must be a positive number of seconds, got {timeout_s!r}")
    env_rank, env_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most one "
                "process per GPU (torchrun --nproc-per-node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=env_rank,
            world_size=env_world,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    return DistEnv(env_rank, env_world, local_rank, dev)


def describe_failure(exc: BaseException) -> str:
    """One line naming this rank and the error (what a user sees when a rank fails). Before the process
    group exists, the rank is the one torchrun gave this process."""
    if dist.is_available() and dist.is_initialized():
        where = f"rank {rank()} of {world_size()}"
    else:
        where = f"rank {os.environ.get('RANK', '0')} of {os.environ.get('WORLD_SIZE', '1')}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 500:
        text = text[:500] + " ..."
    if isinstance(exc, BlackMambaError):
        return f"error: {where}: {text}"
    return f"error: {where} failed with {type(exc).__name__}: {text}"


@contextmanager
def fail_fast(show_traceback: bool = True) -> Iterator[None]:
    """Run the body; if it raises on this rank, print one line naming the rank and the error (and, for
    errors that are not bad input, the traceback) to stderr, then end this process with status 1 at once.

    Exiting without unwinding matters: a clean shutdown would wait in collectives (or in the process
    group's destructor) for ranks that are still computing. torchrun sees the failed worker and stops the
    others, and reports the rank with the first failure.
    """
    try:
        yield
    except SystemExit as e:
        if e.code in (0, None):
            raise
        _die(describe_failure(RuntimeError(f"exited with status {e.code}")), None)
    except BaseException as e:
        trace = None if isinstance(e, BlackMambaError) or not show_traceback else traceback.format_exc()
        _die(describe_failure(e), trace)


def _die(line: str, trace: str | None) -> None:
    if trace:
        sys.stderr.write(trace)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks split the work: ``ep`` ranks per expert group, FSDP or replicated weights."""

    world_size: int
    ep: int = 1
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("world_size", "ep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DistributedError(f"{name} must be a positive whole number, got {value!r}")
        if self.world_size % self.ep:
            raise DistributedError(
                f"--expert-parallel {self.ep} does not divide the number of ranks ({self.world_size})"
            )

    @property
    def efsdp(self) -> int:
        """Ranks that hold the same experts (the data-parallel degree of the expert weights)."""
        return self.world_size // self.ep

    def check_model(self, n_experts: int) -> None:
        if n_experts % self.ep:
            raise DistributedError(
                f"--expert-parallel {self.ep} does not divide the model's {n_experts} experts: choose a divisor "
                f"of {n_experts}"
            )

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise DistributedError(
                f"--batch-size {batch_size} is not a multiple of the {self.world_size} ranks: each rank reads an "
                "equal part of every batch"
            )

    def build_meshes(self, device_type: str) -> Meshes:
        """The device meshes (collective: every rank must call this, in the same order)."""
        w, ep, s = self.world_size, self.ep, self.efsdp
        if self.fsdp:
            dense = init_device_mesh(device_type, (w,), mesh_dim_names=("dp_shard",))
        else:
            dense = init_device_mesh(device_type, (w, 1), mesh_dim_names=("dp_replicate", "dp_shard"))
        sparse = None
        if ep > 1:
            # EP innermost: the ranks of an expert group are neighbours (one node, where all-to-all is fast).
            if self.fsdp:
                sparse = init_device_mesh(device_type, (s, ep), mesh_dim_names=("efsdp", "ep"))
            else:
                sparse = init_device_mesh(device_type, (s, 1, ep), mesh_dim_names=("erep", "efsdp", "ep"))
        return Meshes(self, dense, sparse)


@dataclass
class Meshes:
    """The meshes of one layout: ``dense`` for everything but the experts; ``sparse`` (E > 1 only) whose
    last axis ``ep`` is the expert group and whose other axes are the experts' data-parallel mesh."""

    dims: ParallelDims
    dense: DeviceMesh
    sparse: DeviceMesh | None

    @property
    def ep_mesh(self) -> DeviceMesh | None:
        return None if self.sparse is None else self.sparse["ep"]

    @property
    def expert_dp_mesh(self) -> DeviceMesh:
        """The mesh FSDP uses for the expert weights (the dense one without expert parallelism)."""
        if self.sparse is None:
            return self.dense
        names = self.sparse.mesh_dim_names or ()
        return self.sparse["erep", "efsdp"] if "erep" in names else self.sparse["efsdp"]


# ------------------------------------------------------------------------------------------ data


def rank_window_starts(data: Any, seed: int, step: int, batch_size: int, seq_len: int, rank: int, world: int) -> Any:
    """This rank's windows of the global batch drawn for ``step``: the global batch is what one process
    would draw (``data.window_starts(seed, step, batch_size, seq_len)``); rank r takes its r-th of W equal
    contiguous parts, so the ranks read disjoint windows and together exactly the global batch."""
    if batch_size % world:
        raise DistributedError(f"--batch-size {batch_size} is not a multiple of the {world} ranks")
    if not 0 <= rank < world:
        raise DistributedError(f"rank {rank} is not in [0, {world})")
    starts = data.window_starts(seed, step, batch_size, seq_len)
    share = batch_size // world
    return starts[rank * share : (rank + 1) * share]


def rank_eval_batches(
    data: Any, seq_len: int, batch_size: int, max_tokens: int | None, rank: int, world: int
) -> Iterator[tuple[Tensor, Tensor, bool]]:
    """This rank's share of the sequential evaluation batches, as (x, y, real): batch i goes to rank
    i mod W. Every rank yields the same number of batches (collectives run in lockstep); a rank without a
    batch of its own in the last round repeats its previous one with ``real=False`` (not to be counted)."""
    batches = list(data.sequential_batches(seq_len, batch_size, max_tokens))
    rounds = -(-len(batches) // world)
    for i in range(rounds):
        index = i * world + rank
        if index < len(batches):
            x, y = batches[index]
            yield x, y, True
        else:
            x, y = batches[(i - 1) * world + rank] if i else batches[0]
            yield x, y, False


def all_reduce_mean(value: Tensor | float, device: torch.device | None = None) -> float:
    """The mean of ``value`` over all ranks (itself without a process group), e.g. the loss of a step when
    each rank computed the mean over an equal share of the batch."""
    if world_size() == 1:
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=device or _collective_device()).detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t) / world_size()


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (a copy; ``t`` itself without a process group)."""
    if world_size() == 1:
        return t
    out = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def any_rank(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True on every rank when ``flag`` is True on at least one: a decision that every rank must take alike
    (stop for time, stop on an error), or collectives would wait for ranks that went another way. On a gloo
    ``group`` the vote travels between the hosts only: with NCCL as the default group it would go through
    the GPU's stream and wait for all the work queued there."""
    if world_size() == 1:
        return bool(flag)
    device = torch.device("cpu") if group is not None and dist.get_backend(group) == "gloo" else _collective_device()
    t = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (e.g. the schedule length rank 0 fitted to the time budget)."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------------------------------ FSDP


def mixed_precision(device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute parameters and fp32 reductions on GPU; fp32 throughout on CPU (gloo)."""
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)


def reduce_scatter_copy_in(tensors: list[Tensor], dim: int, num_chunks: int, out: Tensor) -> None:
    """What ``torch._chunk_cat`` writes, FSDP2's reduce-scatter copy-in: each gradient is cut along ``dim``
    into ``num_chunks`` equal chunks (zero-padded: chunk k holds rows ``[k*c, (k+1)*c)``, c = ceil(rows /
    num_chunks)), and row k of ``out`` (viewed as ``(num_chunks, -1)``) holds every gradient's chunk k in turn,
    cast to ``out``'s dtype.

    Written with ordinary copies: one ``torch.cat`` on one rank, one strided copy per gradient otherwise.
    ``torch._chunk_cat``'s CUDA path builds a host-side table with one entry per 2 KB of its output and
    uploads it every call, whatever the world size: 12 to 49 ms of host time per 2.8B step in bf16 on one H200,
    the more the larger the FSDP units (``benchmarks.train_distributed --host-profile``,
    results/distributed_units.json), against about 120 ms for the plain step's whole forward + backward.
    Tensors this does not cover (another ``dim``, 0-d or empty ones) go to ``torch._chunk_cat``."""
    if dim != 0 or not tensors or any(t.dim() == 0 or t.size(0) == 0 for t in tensors):
        torch._chunk_cat(tensors, dim, num_chunks, out=out)
        return
    rows = out.view(num_chunks, -1)
    if num_chunks == 1:
        torch.cat([t.reshape(-1) for t in tensors], out=rows[0])
        return
    chunk_rows = [-(-t.size(0) // num_chunks) for t in tensors]
    widths = [c * (t.numel() // t.size(0)) for c, t in zip(chunk_rows, tensors, strict=True)]
    if sum(widths) != rows.size(1):
        torch._chunk_cat(tensors, dim, num_chunks, out=out)  # torch's handling of an output of another size
        return
    for t, c, chunks in zip(tensors, chunk_rows, rows.split(widths, dim=1), strict=True):
        if t.size(0) == c * num_chunks:
            chunks.copy_(t.reshape(num_chunks, -1))
            continue
        flat, by_chunk = t.reshape(t.size(0), -1), chunks.view(num_chunks, c, -1)
        full, rest = divmod(t.size(0), c)
        chunks.zero_()
        by_chunk[:full].copy_(flat[: full * c].view(full, c, -1))
        if rest:
            by_chunk[full, :rest].copy_(flat[full * c :])


def _fsdp_copy_in(unsharded_grads: list[Tensor], reduce_scatter_input: Tensor, world_size: int) -> None:
    reduce_scatter_copy_in(unsharded_grads, 0, world_size, reduce_scatter_input.view(world_size, -1))


def set_fast_copy_in(enabled: bool = True) -> bool:
    """Make FSDP2's reduce-scatter copy-in (``foreach_reduce_scatter_copy_in`` in PyTorch's FSDP2
    collectives) run :func:`reduce_scatter_copy_in` (``enabled``), or PyTorch's own ``torch._chunk_cat``
    again. It holds for the whole process; :func:`apply_fsdp` turns it on. Returns whether the copy-in is now
    ours: a PyTorch without that function keeps its own."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    torch_copy_in = getattr(collectives, "_torch_copy_in", None) or getattr(
        collectives, "foreach_reduce_scatter_copy_in", None
    )
    if torch_copy_in is None:
        return False
    collectives._torch_copy_in = torch_copy_in
    collectives.foreach_reduce_scatter_copy_in = _fsdp_copy_in if enabled else torch_copy_in
    return enabled


class _OneRankReduce:
    """FSDP2's reduce-scatter on one rank, where nothing is summed: the buffer FSDP allocates for the
    reduction's output is the one it just allocated for its input, so FSDP's copy of one into the other is a
    copy of a tensor onto itself, which PyTorch skips, and the sharded gradients are views of the input."""

    def __init__(self) -> None:
        self._input: Tensor | None = None

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        last, self._input = self._input, None
        if last is not None and tuple(last.shape) == tuple(size) and last.dtype == dtype:
            return last  # the output of the reduction whose input ``last`` is (one unit: one device)
        self._input = torch.empty(*size, dtype=dtype, device=device)
        return self._input

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise DistributedError("a one-rank FSDP unit was asked to reduce over several ranks")


def _reduce_in_place_on_one_rank(units: list[nn.Module]) -> None:
    """Give every FSDP unit of a one-rank layout :class:`_OneRankReduce` (a PyTorch without custom
    reduce-scatters keeps its own)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import ReduceScatter
    except ImportError:
        return
    comm_type = type("OneRankReduceScatter", (_OneRankReduce, ReduceScatter), {})
    for unit in units:
        if isinstance(unit, FSDPModule) and hasattr(unit, "set_custom_reduce_scatter"):
            unit.set_custom_reduce_scatter(comm_type())


def _fp32_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if name.endswith(FP32_PARAMS)]


def _average_over_ranks(p: Tensor) -> None:
    if p.grad is not None:
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world_size())


def apply_fsdp(
    model: BlackMamba,
    meshes: Meshes,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_root: bool = False,
    reshard_after_forward: bool | None = None,
    blocks_per_unit: int | None = None,
    fast_copy_in: bool = True,
    one_rank_in_place: bool = True,
) -> BlackMamba:
    """FSDP2 per block, or per ``blocks_per_unit`` consecutive blocks (one all-gather, one reduce-scatter and
    one set of hooks for them all: less host work per step, more memory held at once), bottom-up; then the
    root (embedding, final norm); explicit prefetching in block order. ``blocks_per_unit=None`` is one block
    per unit on several ranks and :data:`ONE_RANK_BLOCKS_PER_UNIT` on one, where every unit stays gathered
    from the forward to the backward anyway, so fewer units cost no memory and save host time. The
    reduce-scatter copy-in runs as ordinary copies (:func:`set_fast_copy_in`, the same values) unless
    ``fast_copy_in`` is false. On one rank the reduction's output is its input (:class:`_OneRankReduce`: one
    copy of every gradient less) unless ``one_rank_in_place`` is false.

    ``reshard_after_forward``: free each block's gathered parameters after its forward and gather them again
    for its backward (less memory, one more all-gather per block and step). ``None`` does so only when the
    parameters are sharded over more than one rank: on one rank there is nothing to save but the compute
    copies, and the second gather is pure cost.

    An MoE that :func:`.expert_parallel.apply_expert_parallel` prepared gets two units of its own before its
    block: its router (dense mesh, fp32) and its experts (the experts' mesh, gradients divided by the world
    size because the all-to-all already summed the contributions of the expert group). Parameters kept in
    fp32 (A_log, D, dt bias) stay outside FSDP when the compute dtype is lower; their gradients are averaged
    by a hook.
    """
    device_type = meshes.dense.device_type
    mp_policy = mp_policy or mixed_precision(device_type)
    dims = meshes.dims
    set_fast_copy_in(fast_copy_in)
    # An MoE block returns its output as a view of the experts' (tokens, d_model) result. FSDP2 (torch >= 2.13)
    # warns that an in-place op on such a view would skip its pre-backward hook; the model adds block outputs
    # out of place only (the FSDP tests compare every gradient with the plain model's), so the warning says
    # nothing about it. Other modules' warnings stay.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDP)?Block(, (FSDP)?Block)*\) returned a view")
    if blocks_per_unit is None:
        blocks_per_unit = ONE_RANK_BLOCKS_PER_UNIT if dims.world_size == 1 else 1
    ignored: set[nn.Parameter] = set()
    if mp_policy.param_dtype not in (None, torch.float32):
        ignored = set(_fp32_params(model))
        for p in ignored:
            if dims.world_size > 1:
                p.register_post_accumulate_grad_hook(_average_over_ranks)
    if isinstance(blocks_per_unit, bool) or not isinstance(blocks_per_unit, int) or blocks_per_unit < 1:
        raise DistributedError(f"blocks per FSDP unit must be a positive whole number, got {blocks_per_unit!r}")
    if reshard_after_forward is None:
        reshard_after_forward = meshes.dense.size() > 1
    common = {"mp_policy": mp_policy, "ignored_params": ignored or None, "reshard_after_forward": reshard_after_forward}
    fp32 = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    units: list[list[FSDPModule]] = []
    group: list[nn.Module] = []

    def close_group() -> None:
        if group:
            placement = _expert_placement([b.mixer for b in group if isinstance(b.mixer, MoE)], meshes)
            modules = group[0] if len(group) == 1 else list(group)
            fully_shard(modules, mesh=meshes.dense, shard_placement_fn=placement, **common)
            units.append([group[0]])
            group.clear()

    for block in model.layers:
        mixer = block.mixer
        if isinstance(mixer, MoE) and getattr(mixer, "expert_group", None) is not None:
            close_group()
            fully_shard(mixer.router, mesh=meshes.dense, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
            fully_shard(
                mixer,
                mesh=meshes.expert_dp_mesh,
                mp_policy=mp_policy,
                shard_placement_fn=_expert_placement([mixer], meshes),
                reshard_after_forward=reshard_after_forward,
            )
            mixer.set_gradient_divide_factor(float(dims.world_size))
            fully_shard(block, mesh=meshes.dense, **common)
            units.append([block, mixer.router, mixer])
            continue
        group.append(block)
        if len(group) == blocks_per_unit:
            close_group()
    close_group()
    fully_shard(model, mesh=meshes.dense, **{**common, "reshard_after_forward": reshard_root})
    _set_prefetch(model, units)
    if dims.world_size == 1 and one_rank_in_place:
        _reduce_in_place_on_one_rank([model, *(m for unit in units for m in unit)])
    return model


def _expert_placement(moes: list[MoE], meshes: Meshes):
    """Shard the expert weights on the expert axis (dim 0), or on dim 1 when the FSDP degree times the
    expert-parallel degree exceeds the number of experts (each rank would otherwise hold padding)."""
    experts = {id(p) for moe in moes for p in (moe.w1, moe.w2)}
    fsdp_ranks = meshes.expert_dp_mesh.size() if meshes.dims.fsdp else 1
    if not moes or fsdp_ranks * meshes.dims.ep <= min(moe.n_experts for moe in moes):
        return None

    def placement(p: nn.Parameter) -> Shard | None:
        return Shard(1) if id(p) in experts else None

    return placement


def _set_prefetch(model: BlackMamba, units: list[list[FSDPModule]]) -> None:
    """Forward: each unit starts the all-gathers of the next block; backward: of the block before it. With
    expert parallelism the all-to-all's host synchronisation would otherwise delay FSDP's own prefetch."""
    if not units:
        return
    model.set_modules_to_forward_prefetch(units[0])
    model.set_modules_to_backward_prefetch(units[-1])
    for i, unit in enumerate(units):
        if i + 1 < len(units):
            unit[0].set_modules_to_forward_prefetch(units[i + 1])
        if i > 0:
            unit[0].set_modules_to_backward_prefetch(units[i - 1])


def parallelize(
    model: BlackMamba,
    meshes: Meshes,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool | None = None,
    blocks_per_unit: int | None = None,
    fast_copy_in: bool = True,
    one_rank_in_place: bool = True,
) -> BlackMamba:
    """Apply the layout of ``meshes`` to a built model, in place: expert parallelism and global routing
    (when there is more than one rank), then FSDP2 (``reshard_after_forward``, ``blocks_per_unit``,
    ``fast_copy_in`` and ``one_rank_in_place`` as in :func:`apply_fsdp`).
    The model must already be on its device."""
    from .expert_parallel import apply_expert_parallel

    meshes.dims.check_model(model.config.n_experts)
    if meshes.dims.world_size > 1:
        apply_expert_parallel(model, meshes)
    return apply_fsdp(
        model, meshes, mp_policy, reshard_after_forward=reshard_after_forward, blocks_per_unit=blocks_per_unit,
        fast_copy_in=fast_copy_in, one_rank_in_place=one_rank_in_place,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ gradients


def _replication(t: Tensor) -> int:
    """How many ranks hold this exact tensor (its local piece)."""
    if isinstance(t, DTensor):
        mesh = t.device_mesh
        copies = 1
        for dim, placement in enumerate(t.placements):
            if isinstance(placement, Replicate):
                copies *= mesh.size(dim)
        return copies * (world_size() // mesh.size())
    return world_size()


def _local_grads(parameters: list[Tensor]) -> dict[tuple[torch.device, int], list[Tensor]]:
    """The local pieces of the parameters' gradients, grouped by device and by how many ranks hold each piece
    (:func:`_replication`): one multi-tensor launch per group, not a few per parameter."""
    groups: dict[tuple[torch.device, int], list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            groups.setdefault((local.device, _replication(p.grad)), []).append(local)
    return groups


@torch.no_grad()
def grad_norm(parameters: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients together, whatever mesh each lives on (sharded, replicated, plain):
    each rank sums the squares of its local pieces (fp32 norms per piece, summed in fp64), counting a piece
    held by k ranks 1/k times, and one all-reduce adds the ranks up."""
    return _norm(_local_grads(list(parameters)))


def _norm(groups: dict[tuple[torch.device, int], list[Tensor]]) -> Tensor:
    """:func:`grad_norm` of gradients already grouped by :func:`_local_grads`."""
    if not groups:
        return torch.zeros((), dtype=torch.float32)
    device = next(iter(groups))[0]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (_, copies), grads in groups.items():
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        total += norms.double().pow(2).sum().to(device) / copies
    if world_size() > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(parameters: list[Tensor], max_norm: float) -> Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` for a model whose parameters live on several meshes (dense,
    experts, replicated fp32 ones): returns the total norm before clipping, and scales every gradient by
    ``max_norm / (norm + 1e-6)`` when that is below 1. ``max_norm <= 0`` only measures."""
    groups = _local_grads(list(parameters))  # once: grouping walks every parameter's DTensor
    norm = _norm(groups)
    if max_norm > 0:
        coef = (max_norm / (norm.double() + 1e-6)).clamp(max=1.0)
        for (device, _), grads in groups.items():
            for dtype in {g.dtype for g in grads}:
                torch._foreach_mul_([g for g in grads if g.dtype == dtype], coef.to(device, dtype))
    return norm
