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


def test_one_rank_reduces_in_the_compute_dtype_with_the_same_gradients(one_rank_group):
    """On one rank FSDP's reduction keeps the bf16 gradients in bf16 (nothing is summed); the fp32 sharded
    gradients equal those of the fp32 reduction bit for bit. More ranks, or fp32 compute, keep the policy."""
    from torch.distributed.tensor import DTensor

    from blackmamba.training.distributed import Meshes, apply_fsdp, mixed_precision, one_rank_policy

    bf16 = type(mixed_precision("cpu"))(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                        cast_forward_inputs=False)  # fmt: skip
    assert one_rank_policy(bf16, 1).reduce_dtype == torch.bfloat16
    assert one_rank_policy(bf16, 2) == bf16 and one_rank_policy(mixed_precision("cpu"), 1) == mixed_precision("cpu")
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    grads = {}
    for fp32_reduce in (False, True):
        model = h.build_model()
        meshes = ParallelDims(1, 1, fsdp=True).build_meshes("cpu")
        apply_fsdp(model, Meshes(meshes.dims, meshes.dense, None), bf16, fp32_reduce_on_one_rank=fp32_reduce)
        model(ids).logits.float().square().mean().backward()
        grads[fp32_reduce] = [p.grad.to_local() for p in model.parameters() if isinstance(p, DTensor)]
    assert grads[False] and all(g.dtype == torch.float32 for g in grads[False])
    for a, b in zip(grads[False], grads[True], strict=True):
        assert torch.equal(a, b)


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
