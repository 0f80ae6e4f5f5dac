"""Fast, single-process checks of the distributed pieces (no process group): data slices, the dispatch
layout, layout validation, the MoE's distributed forward against the layer's own, gradient clipping, and
distributed checkpoints (round trip, atomic replacement under faults, a hostile metadata file)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from blackmamba.checkpoint import CheckpointError
from blackmamba.layers import MoE
from blackmamba.training import dcp
from blackmamba.training.distributed import (
    DistributedError,
    ParallelDims,
    clip_grad_norm_,
    describe_failure,
    rank_eval_batches,
    rank_window_starts,
)
from blackmamba.training.expert_parallel import DistributedMoE, dispatch_layout
from blackmamba.training.optim import build_optimizer

from . import harness as h


def test_ranks_read_disjoint_parts_of_the_one_process_batch():
    data = h.token_data()
    whole = data.window_starts(h.SEED, 7, 8, h.SEQ_LEN)
    for world in (1, 2, 4, 8):
        parts = [rank_window_starts(data, h.SEED, 7, 8, h.SEQ_LEN, r, world) for r in range(world)]
        assert all(len(p) == 8 // world for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(DistributedError, match="not a multiple of the 3 ranks"):
        rank_window_starts(data, h.SEED, 7, 8, h.SEQ_LEN, 0, 3)


def test_eval_batches_cover_the_split_once_in_lockstep():
    data = h.token_data(n=1000)
    whole = [x for x, _ in data.sequential_batches(h.SEQ_LEN, 4)]
    per_rank = [list(rank_eval_batches(data, h.SEQ_LEN, 4, None, r, 3)) for r in range(3)]
    assert len({len(p) for p in per_rank}) == 1  # every rank runs the same number of forwards
    real = [x for p in per_rank for x, _, is_real in p if is_real]
    assert len(real) == len(whole)
    assert sorted(x.sum().item() for x in real) == sorted(x.sum().item() for x in whole)


def test_dispatch_layout_by_hand():
    # 2 ranks, 4 experts (2 each). This rank: 3 tokens for e0, 0 for e1, 1 for e2, 2 for e3 -> sends 3 to
    # rank 0 and 3 to rank 1. It receives for its experts (2, 3): from rank 0 [1, 0], from rank 1 [2, 4].
    send, recv, local = dispatch_layout(torch.tensor([3, 0, 1, 2]), torch.tensor([1, 0, 2, 4]), 2)
    assert send == [3, 3] and recv == [1, 6]
    assert local.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_layout_checks_name_the_bad_value():
    with pytest.raises(DistributedError, match="--expert-parallel 3 does not divide the number of ranks"):
        ParallelDims(4, ep=3)
    with pytest.raises(DistributedError, match="does not divide the model's 8 experts"):
        ParallelDims(6, ep=3).check_model(8)
    with pytest.raises(DistributedError, match="--batch-size 6"):
        ParallelDims(4, ep=2, fsdp=True).check_batch(6)
    assert ParallelDims(8, ep=2, fsdp=True).efsdp == 4
    assert "rank 0 of 1 failed with ValueError: boom" in describe_failure(ValueError("boom"))


def test_distributed_moe_on_one_rank_is_the_layer():
    """The distributed forward re-states the MoE's steps; on one rank it must compute exactly what the
    layer does (Sinkhorn, gate, both router losses, counts), forward and backward."""
    torch.manual_seed(0)
    config = h.config()
    moe = MoE(config).train()
    twin = MoE(config).train()
    twin.load_state_dict(moe.state_dict())
    twin.__class__ = DistributedMoE
    twin.routing_group, twin.expert_group, twin.ep_size = None, None, 1
    x = torch.randn(2, 24, config.d_model)
    (y, stats), (y2, stats2) = moe(x), twin(x)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(stats2.aux_loss, stats.aux_loss, rtol=1e-6, atol=0)
    assert torch.equal(stats2.counts_E, stats.counts_E) and stats2.sinkhorn_iters == stats.sinkhorn_iters
    (y.square().sum() + stats.aux_loss).backward()
    (y2.square().sum() + stats2.aux_loss).backward()
    for (name, p), p2 in zip(moe.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


def test_clip_matches_torch_on_one_process():
    model = h.build_model()
    twin = h.build_model()
    x = torch.randint(0, 256, (2, 12))
    for m in (model, twin):
        m(x).logits.square().mean().backward()
    want = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.01)
    got = clip_grad_norm_(list(twin.parameters()), 0.01)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    for p, p2 in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-5, atol=1e-9)


def _trained(steps: int):
    model = h.build_model()
    optimizer = build_optimizer(model, h.LR, h.WEIGHT_DECAY)
    h.train(model, optimizer, h.token_data(n=512), 0, steps)
    return model, optimizer


def test_checkpoint_round_trip_and_offline_export(tmp_path):
    model, optimizer = _trained(1)
    dcp.save(tmp_path / "ck", model, optimizer, {"step": 2, "note": "x"})
    assert dcp.is_dcp_checkpoint(tmp_path / "ck")
    other = h.build_model(seed=5)
    other_opt = build_optimizer(other, h.LR, h.WEIGHT_DECAY)
    assert dcp.load(tmp_path / "ck", other, other_opt) == {"step": 2, "note": "x"}
    for (name, p), p2 in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(p, p2), name
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])
    from blackmamba import load_pretrained

    dcp.dcp_to_pretrained(tmp_path / "ck", tmp_path / "plain")
    plain = load_pretrained(tmp_path / "plain", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True))


@pytest.mark.parametrize("fault", ["write", "commit"])
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    model = h.build_model()
    target = tmp_path / "ck"
    dcp.save(target, model, state={"step": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # new weights to save
    if fault == "write":

        def broken(state, checkpoint_id, **kw):
            (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(dcp.dcp, "save", broken)
    else:

        def broken_swap(new, old):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(dcp.atomic_dir, "swap_in", broken_swap)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {target}"):
        dcp.save(target, model, state={"step": 2})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the temporary folder is gone
    fresh = h.build_model(seed=9)
    assert dcp.load(target, fresh) == {"step": 1}
    assert torch.equal(fresh.embedding.weight, h.build_model().embedding.weight)


def test_save_refuses_a_folder_it_did_not_write(tmp_path):
    model = h.build_model()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to replace it"):
        dcp.save(tmp_path / "notes", model)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("payload", ["code", "path"])
def test_hostile_metadata_is_refused(tmp_path, payload, capsys):
    model = h.build_model()
    target = tmp_path / "ck"
    dcp.save(target, model)
    if payload == "code":
        (target / ".metadata").write_bytes(pickle.dumps(_Exploit()))
        match = "refusing to load builtins.print"
    else:
        metadata = dcp.SafeReader(target).read_metadata()
        for info in metadata.storage_data.values():
            info.relative_path = "../../outside.distcp"
        (target / ".metadata").write_bytes(pickle.dumps(metadata))
        match = "names a data file"
    with pytest.raises(CheckpointError, match=match):
        dcp.load(target, h.build_model())
    assert "pwned" not in capsys.readouterr().out


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of this one process (FSDP2 needs one to build its DTensors), torn down after."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fused_adamw_steps_a_model_with_sharded_and_plain_parameters(one_rank_group):
    """FSDP leaves the fp32 A_log, D and dt bias out as plain tensors beside its DTensors; the fused AdamW
    (what the trainer uses on GPU) refuses a group that mixes them, so each group is split by kind."""
    from torch.distributed.tensor import DTensor

    from blackmamba.training.distributed import Meshes, apply_fsdp, mixed_precision

    model = h.build_model()
    meshes = ParallelDims(1, 1, fsdp=True).build_meshes("cpu")
    policy = mixed_precision("cpu")
    policy = type(policy)(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    apply_fsdp(model, Meshes(meshes.dims, meshes.dense, None), policy)
    kinds = {isinstance(p, DTensor) for p in model.parameters()}
    assert kinds == {True, False}  # the situation that broke the fused optimizer
    optimizer = build_optimizer(model, h.LR, h.WEIGHT_DECAY, fused=True)
    for group in optimizer.param_groups:
        assert len({isinstance(p, DTensor) for p in group["params"]}) == 1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    before = [
        p.detach().clone() if not isinstance(p, DTensor) else p.to_local().detach().clone() for p in model.parameters()
    ]
    model(torch.randint(0, 256, (2, 12))).logits.float().square().mean().backward()
    optimizer.step()
    after = [p.detach() if not isinstance(p, DTensor) else p.to_local().detach() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_default_units_are_four_blocks_on_one_rank(one_rank_group):
    """Without ``blocks_per_unit``, one rank groups ``ONE_RANK_BLOCKS_PER_UNIT`` consecutive blocks per FSDP
    unit (the last group shorter); each group shares one FSDP state."""
    from dataclasses import replace

    from blackmamba.model import BlackMamba
    from blackmamba.training.distributed import ONE_RANK_BLOCKS_PER_UNIT, apply_fsdp

    model = BlackMamba(replace(h.config(), layer_pattern=["mamba", "moe"] * 5))
    apply_fsdp(model, ParallelDims(1, 1, fsdp=True).build_meshes("cpu"))
    states = [id(b._get_fsdp_state()) for b in model.layers]
    sizes = [states.count(s) for s in dict.fromkeys(states)]
    n = len(model.layers)
    assert n > ONE_RANK_BLOCKS_PER_UNIT == 4
    assert sizes == [4] * (n // 4) + ([n % 4] if n % 4 else [])


@pytest.mark.parametrize("blocks_per_unit", [2, 3])
def test_fsdp_units_of_several_blocks_train_like_the_plain_model(one_rank_group, blocks_per_unit):
    """Blocks grouped into FSDP units (one all-gather and one set of hooks per group; a last, shorter group
    when the count does not divide) give the plain model's losses and leave every block inside a unit."""
    from blackmamba.training.distributed import apply_fsdp

    ids = torch.randint(1, 256, (2, 13), generator=torch.Generator().manual_seed(5))
    losses = {}
    for name in ("plain", "grouped"):
        model = h.build_model()
        if name == "grouped":
            meshes = ParallelDims(1, 1, fsdp=True).build_meshes("cpu")
            apply_fsdp(model, meshes, blocks_per_unit=blocks_per_unit)
            assert all(isinstance(b, FSDPModule) for b in model.layers)
        optimizer = build_optimizer(model, h.LR, h.WEIGHT_DECAY, fused=False)
        losses[name] = []
        for _ in range(3):
            out = model(ids[:, :-1], targets=ids[:, 1:])
            (out.loss if out.aux_loss is None else out.loss + out.aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[name].append(out.loss.item())
    assert losses["grouped"] == pytest.approx(losses["plain"], rel=1e-5, abs=1e-6)
    with pytest.raises(DistributedError, match="blocks per FSDP unit"):
        apply_fsdp(h.build_model(), ParallelDims(1, 1, fsdp=True).build_meshes("cpu"), blocks_per_unit=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)])  # fmt: skip
def test_reduce_scatter_copy_in_writes_what_torch_chunk_cat_writes(world, dtypes):
    """FSDP's copy-in by ordinary copies against ``torch._chunk_cat``: gradients whose first dimension the
    world size does not divide (zero-padded chunks, some of them empty), one row, several dimensions, a cast
    to the reduction dtype; the output starts out holding other values."""
    from blackmamba.training.distributed import reduce_scatter_copy_in

    grad_dtype, out_dtype = dtypes
    gen = torch.Generator().manual_seed(world)
    shapes = [(5, 3), (8,), (7, 2, 3), (1, 4), (12, 5), (3,)]
    grads = [torch.randn(s, generator=gen).to(grad_dtype) for s in shapes]
    numel = world * sum(-(-g.size(0) // world) * (g.numel() // g.size(0)) for g in grads)
    junk = torch.randn(numel, generator=gen).to(out_dtype)
    want, got = junk.clone(), junk.clone()
    torch._chunk_cat(grads, 0, world, out=want.view(world, -1))
    reduce_scatter_copy_in(grads, 0, world, got.view(world, -1))
    assert torch.equal(got, want)


def test_reduce_scatter_copy_in_leaves_other_cases_to_torch():
    """Another dimension goes to ``torch._chunk_cat`` (the same result); a 0-d or an empty gradient gets
    torch's error, not a partial copy."""
    from blackmamba.training.distributed import reduce_scatter_copy_in

    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen)]
    want = torch.empty(0)
    torch._chunk_cat(grads, 1, 2, out=want)
    got = torch.full_like(want, 5.0)
    reduce_scatter_copy_in(grads, 1, 2, got)
    assert torch.equal(got, want)
    bad = [([torch.randn(4, generator=gen), torch.randn((), generator=gen)], "dim < ndim"),
           ([torch.randn(0, 3, generator=gen), torch.randn(4, 3, generator=gen)], "non-empty")]  # fmt: skip
    for grads, message in bad:
        with pytest.raises(RuntimeError, match=message):
            reduce_scatter_copy_in(grads, 0, 2, torch.empty(2, 5))


def test_fast_copy_in_under_fsdp_gives_the_same_gradients(one_rank_group, monkeypatch):
    """``apply_fsdp`` routes FSDP's copy-in through :func:`reduce_scatter_copy_in`: FSDP calls it, and the
    sharded gradients equal those of PyTorch's own copy-in (``fast_copy_in=False``) bit for bit."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives
    from torch.distributed.tensor import DTensor

    from blackmamba.training import distributed as d

    calls = []
    original = d.reduce_scatter_copy_in
    monkeypatch.setattr(d, "reduce_scatter_copy_in", lambda *a: calls.append(1) or original(*a))
    bf16 = type(d.mixed_precision("cpu"))(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)  # fmt: skip
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    grads = {}
    try:
        for fast in (True, False):
            calls.clear()
            model = h.build_model()
            meshes = d.ParallelDims(1, 1, fsdp=True).build_meshes("cpu")
            d.apply_fsdp(model, meshes, bf16, blocks_per_unit=2, fast_copy_in=fast)
            model(ids).logits.float().square().mean().backward()
            grads[fast] = [p.grad.to_local() for p in model.parameters() if isinstance(p, DTensor)]
            assert bool(calls) == fast
    finally:
        d.set_fast_copy_in(True)
    assert grads[True]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.equal(a, b)
    assert _fsdp_collectives.foreach_reduce_scatter_copy_in is d._fsdp_copy_in
    assert d.set_fast_copy_in(False) is False
    assert _fsdp_collectives.foreach_reduce_scatter_copy_in is not d._fsdp_copy_in
    assert d.set_fast_copy_in(True) is True


def test_one_rank_reduction_output_is_its_input():
    """The one-rank reduce-scatter's allocator hands back the input buffer for the output allocated right
    after it (same size, dtype, device) and a fresh buffer otherwise; it refuses to reduce over ranks."""
    from blackmamba.training.distributed import _OneRankReduce

    comm = _OneRankReduce()
    cpu = torch.device("cpu")
    first = comm.allocate((6,), dtype=torch.float32, device=cpu)
    assert comm.allocate((6,), dtype=torch.float32, device=cpu) is first
    second = comm.allocate((6,), dtype=torch.float32, device=cpu)
    assert second is not first
    assert comm.allocate((6,), dtype=torch.bfloat16, device=cpu) is not second  # another dtype: a new buffer
    assert comm.allocate((3,), dtype=torch.float32, device=cpu).shape == (3,)
    with pytest.raises(DistributedError, match="one-rank FSDP unit"):
        comm(output_tensor=first, input_tensor=first, group=None, op=None)


@pytest.mark.parametrize("reduce_dtype", [torch.float32, torch.bfloat16])
def test_one_rank_in_place_reduction_gives_the_same_gradients(one_rank_group, reduce_dtype):
    """Every FSDP unit of a one-rank layout reduces in place; over two accumulated micro-batches the sharded
    gradients equal those of FSDP's own copy (``one_rank_in_place=False``) bit for bit, with fp32 or bf16
    reduction of bf16 gradients."""
    from torch.distributed.tensor import DTensor

    from blackmamba.training import distributed as d

    bf16 = type(d.mixed_precision("cpu"))(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype,
                                          cast_forward_inputs=False)  # fmt: skip
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randint(1, 256, (2, 12), generator=gen) for _ in range(2)]
    grads = {}
    for in_place in (True, False):
        model = h.build_model()
        meshes = d.ParallelDims(1, 1, fsdp=True).build_meshes("cpu")
        d.apply_fsdp(model, meshes, bf16, blocks_per_unit=2, one_rank_in_place=in_place)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        comms = [g._reduce_scatter_comm for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
        assert comms and all(isinstance(c, d._OneRankReduce) == in_place for c in comms)
        for ids in batches:
            model(ids).logits.float().square().mean().backward()
        grads[in_place] = [p.grad.to_local() for p in model.parameters() if isinstance(p, DTensor)]
    assert grads[True] and all(g.dtype == torch.float32 for g in grads[True])
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.equal(a, b)


def test_fsdp_blocks_do_not_warn_about_their_view_outputs(one_rank_group):
    """FSDP2's warning about a wrapped module returning a view is silenced for our blocks only (they are added
    out of place); with the filter taken away the same forward warns, and other modules' warnings still show."""
    import warnings

    from blackmamba.training.distributed import apply_fsdp

    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = h.build_model()
        apply_fsdp(model, ParallelDims(1, 1, fsdp=True).build_meshes("cpu"))
        model(ids).logits.float().square().mean().backward()
        silenced = [str(w.message) for w in caught if "returned a view" in str(w.message)]
        warnings.warn("FSDP2-wrapped module (Other) returned a view tensor.", UserWarning, stacklevel=1)
        warnings.filters[:] = [f for f in warnings.filters if not (f[1] and "FSDP2-wrapped" in f[1].pattern)]
        model(ids).logits.float().square().mean().backward()
    messages = [str(w.message) for w in caught]
    assert silenced == []
    assert any(m.startswith("FSDP2-wrapped module (Other)") for m in messages)
    if torch.__version__ >= (2, 13):  # the version whose FSDP2 checks module outputs for views
        assert any("Block" in m and "returned a view" in m for m in messages)
