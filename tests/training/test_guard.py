"""The non-finite guard that reads a step's values one step late (blackmamba/training/guard.py).

PyTorch's fused AdamW runs on CPU too and takes the same device-side ``found_inf`` there, so the deferred
path is tested here: the skipped update, the late read, and the trainer with it (the trainer picks the fused
optimizer on GPU only; these tests hand it one on CPU)."""

import math

import pytest
import torch
from safetensors.torch import load_file

import blackmamba.training.trainer as trainer
from blackmamba.training.guard import FiniteGuard, StepValues
from blackmamba.training.optim import build_optimizer, clip_gradients
from blackmamba.training.trainer import TrainingError, train

from .helpers import checkpoint_names, metric_rows, prepare_tiny_data, tiny_args


class Diverged(Exception):
    pass


def diverged(what: str, values: StepValues) -> Exception:
    return Diverged(f"{what} at step {values.step}")


def setup(fused: bool, seed: int = 0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(7, 3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1, fused=fused)
    return p, opt, FiniteGuard(opt, diverged)


def values(loss: float, norm: float) -> torch.Tensor:
    return torch.tensor([loss, 0.25, loss + 0.25, norm], dtype=torch.float64)


def test_deferred_guard_skips_the_bad_update_on_the_device_and_raises_a_step_late():
    p, opt, guard = setup(fused=True)
    assert guard.deferred
    p.grad = torch.randn(7, 3)
    assert guard.check(1, values(2.0, 1.5)) == []  # nothing read yet
    opt.step()
    assert guard.settle() == []  # the newest step stays pending
    after_good = p.detach().clone()
    assert not torch.equal(after_good, setup(fused=True)[0].detach())  # the good step moved the weights

    p.grad = torch.full((7, 3), math.nan)
    assert guard.check(2, values(3.0, math.nan)) == []
    opt.step()  # skipped on the device: found_inf is 1
    assert torch.equal(p.detach(), after_good)
    assert opt.state[p]["step"].item() == 1  # the step count is not advanced either
    assert [v.step for v in guard.settle()] == [1]  # step 1 read, finite; step 2 still pending
    with pytest.raises(Diverged, match="norm at step 2"):
        guard.flush()
    assert guard.pending == []


def test_deferred_guard_reads_values_exactly_and_in_order():
    p, opt, guard = setup(fused=True)
    for step in range(1, 4):
        p.grad = torch.randn(7, 3)
        guard.check(step, values(1.0 / step, float(step)))
        opt.step()
    read = guard.flush()
    assert [v.step for v in read] == [1, 2, 3]
    assert read[2] == StepValues(3, 1.0 / 3, 0.25, 1.0 / 3 + 0.25, 3.0)


def test_deferred_guard_stops_at_a_non_finite_loss_with_a_finite_norm():
    p, opt, guard = setup(fused=True)
    before = p.detach().clone()
    p.grad = torch.randn(7, 3)
    guard.check(1, values(math.inf, 2.0))
    opt.step()
    assert torch.equal(p.detach(), before)  # a non-finite objective alone skips the update too
    with pytest.raises(Diverged, match="loss at step 1"):
        guard.flush()


def test_plain_guard_reads_before_the_update():
    p, opt, guard = setup(fused=False)
    assert not guard.deferred
    assert guard.check(1, values(2.0, 1.0)) == [StepValues(1, 2.0, 0.25, 2.25, 1.0)]
    with pytest.raises(Diverged, match="loss at step 2"):
        guard.check(2, values(math.nan, 1.0))
    with pytest.raises(ValueError, match="4 values"):
        guard.check(3, torch.ones(3, dtype=torch.float64))


def test_deferred_and_plain_guards_give_the_same_updates():
    weights = []
    for fused_guard in (True, False):
        p, opt, _ = setup(fused=True, seed=3)
        guard = FiniteGuard(opt, diverged)
        guard.deferred = fused_guard
        gen = torch.Generator().manual_seed(5)
        for step in range(1, 6):
            p.grad = torch.randn(7, 3, generator=gen)
            guard.check(step, values(1.0, 1.0))
            opt.step()
            guard.settle()
        guard.flush()
        weights.append(p.detach().clone())
    assert torch.equal(weights[0], weights[1])


# ---------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The trainer with PyTorch's fused AdamW on CPU, as it has on GPU; ``deferred`` picks the guard's mode."""

    def fused(*args, **kw):
        kw["fused"] = True
        return build_optimizer(*args, **kw)

    monkeypatch.setattr(trainer, "build_optimizer", fused)
    modes = {"deferred": True}

    class Guard(FiniteGuard):
        def __init__(self, optimizer, diverged):
            super().__init__(optimizer, diverged)
            assert self.deferred  # the fused optimizer takes found_inf
            self.deferred = modes["deferred"]

    monkeypatch.setattr(trainer, "FiniteGuard", Guard)
    return modes


def test_trainer_reading_a_step_late_trains_exactly_as_reading_each_step(data_dir, tmp_path, fused_on_cpu):
    kw = dict(max_steps=12, log_every=5, eval_every=6, save_every=6)  # steps 1-4, 7-9 and 11 are read late
    clock = {"tokens_per_s", "mfu"}
    rows, runs = {}, {}
    for deferred in (True, False):
        fused_on_cpu["deferred"] = deferred
        runs[deferred] = tmp_path / f"deferred-{deferred}"
        train(tiny_args(data_dir, runs[deferred], **kw))
        rows[deferred] = [{k: v for k, v in row.items() if k not in clock} for row in metric_rows(runs[deferred])]
    assert [row["step"] for row in rows[True] if "loss" in row] == [5, 10, 12]
    assert rows[True] == rows[False]
    names = checkpoint_names(runs[True])
    assert names == checkpoint_names(runs[False]) == ["step-00000006", "step-00000012"]
    for name in names:
        a = load_file(runs[True] / "checkpoints" / name / "model.safetensors")
        b = load_file(runs[False] / "checkpoints" / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trainer_reading_late_stops_at_the_same_step_and_saves_nothing_bad(data_dir, tmp_path, fused_on_cpu):
    messages = {}
    for deferred in (True, False):
        fused_on_cpu["deferred"] = deferred
        run = tmp_path / f"deferred-{deferred}"
        train(tiny_args(data_dir, run, max_steps=6, save_every=6))
        before = checkpoint_names(run)
        with pytest.raises(TrainingError, match="non-finite") as info:
            train(tiny_args(data_dir, run, resume=True, max_steps=30, lr=1e30, min_lr=0.0, warmup=0, clip=0,
                            log_every=100, save_every=3))  # fmt: skip
        assert checkpoint_names(run) == before  # the bad state never reached the disk
        assert f"the last good checkpoint is {run / 'checkpoints' / before[-1]}" in str(info.value)
        messages[deferred] = str(info.value).replace(str(run), "RUN")
    assert messages[True] == messages[False]  # the same step, the same message


# ------------------------------------------------------------------------------------ clipping in the step


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])  # clipping active, inactive, off
def test_clipping_by_the_fused_step_matches_clip_grad_norm(max_norm):
    """The fused optimizer's ``grad_scale`` clips as torch.nn.utils.clip_grad_norm_ + a plain step do."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(33, 5), (7,), (2, 3, 4)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) * 3 for s in shapes] for _ in range(3)]
    results = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=fused)
        norms = []
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            norms.append(clip_gradients(opt, params, max_norm))
            opt.step()
            if max_norm > 0:  # the gradients the step used (the fused kernel writes them back): the clipped ones
                coef = min(1.0, max_norm / (float(norms[-1]) + 1e-6))
                torch.testing.assert_close(params[0].grad, step_grads[0] * coef)
        results[fused] = (params, norms)
        if fused:
            assert (opt.grad_scale is None) == (max_norm <= 0)
    for a, b in zip(*(results[f][0] for f in (True, False)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    expected = [torch.linalg.vector_norm(torch.cat([g.flatten() for g in step])) for step in grads]
    for norms in (results[True][1], results[False][1]):
        torch.testing.assert_close(torch.stack(norms), torch.stack(expected))
    if max_norm == 0.05:  # the clip really bites: an unclipped run ends elsewhere
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        assert not torch.allclose(params[0], results[True][0][0], rtol=1e-4, atol=1e-5)
