"""The trainer's step on a GPU issues no host sync (run on the device machine; CI has no GPU).

A step as ``blackmamba train`` takes it (bf16 autocast forward with the fused loss, backward, the gradient
norm with clipping left to the optimizer's step, the non-finite guard, fused AdamW) runs under
``torch.cuda.set_sync_debug_mode("error")``: any ``.item()``, ``.tolist()``, a synchronising copy or a stream
sync inside it raises. Only the guard's late read waits, on an event recorded behind the step it reads,
outside the checked region."""

import math

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.training.guard import FiniteGuard, StepValues
from blackmamba.training.optim import build_optimizer, clip_gradients

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def diverged(what: str, values: StepValues) -> Exception:
    return RuntimeError(f"non-finite {what} at step {values.step}")


def one_step(model, optimizer, guard, x, y, step: int) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, targets=y)
        objective = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    objective.backward()
    norm = clip_gradients(optimizer, [p for p in model.parameters() if p.grad is not None], 1.0)
    aux = out.aux_loss.detach() if out.aux_loss is not None else torch.zeros_like(out.loss)
    values = torch.stack([out.loss.detach(), aux, objective.detach()]).double()
    guard.check(step, torch.cat([values, norm.double().reshape(1)]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_training_step_issues_no_host_sync_and_reads_a_step_late():
    torch.manual_seed(0)
    config = BlackMambaConfig.from_preset("tiny", vocab_size=512)
    model = BlackMamba(config).cuda().train()
    optimizer = build_optimizer(model, 1e-3, 0.1, fused=True)
    guard = FiniteGuard(optimizer, diverged)
    assert guard.deferred
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, 512, (4, 65), generator=gen).cuda() for _ in range(4)]
    for step in (1, 2):  # warm-up: Triton compiles, lazy initialisation
        one_step(model, optimizer, guard, batches[step][:, :-1], batches[step][:, 1:], step)
    guard.flush()
    read = []
    for step in range(3, 9):
        ids = batches[step % 4]
        torch.cuda.set_sync_debug_mode("error")
        try:
            one_step(model, optimizer, guard, ids[:, :-1], ids[:, 1:], step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        read += guard.settle()
        assert [v.step for v in read][-1:] == ([step - 1] if step > 3 else [])
    read += guard.flush()
    assert [v.step for v in read] == list(range(3, 9))
    assert all(math.isfinite(v.loss) and v.grad_norm > 0 for v in read)


def test_a_non_finite_step_is_skipped_on_the_gpu_and_stops_the_next_read():
    torch.manual_seed(0)
    model = BlackMamba(BlackMambaConfig.from_preset("tiny", vocab_size=512)).cuda().train()
    optimizer = build_optimizer(model, 1e-3, 0.1, fused=True)
    guard = FiniteGuard(optimizer, diverged)
    ids = torch.randint(1, 512, (2, 33), generator=torch.Generator().manual_seed(2)).cuda()
    one_step(model, optimizer, guard, ids[:, :-1], ids[:, 1:], 1)
    guard.flush()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.embedding.weight[ids[0, 0]] = math.nan  # the next forward's loss and gradients are NaN
    bad_row = model.embedding.weight[ids[0, 0]].clone()
    one_step(model, optimizer, guard, ids[:, :-1], ids[:, 1:], 2)
    for name, p in model.named_parameters():  # the update was skipped on the device
        if name == "embedding.weight":
            p = p.detach().clone()
            p[ids[0, 0]] = before[name][ids[0, 0]]
            assert torch.isnan(bad_row).all()
        assert torch.equal(p.detach(), before[name]), name
    with pytest.raises(RuntimeError, match="non-finite (loss|norm) at step 2"):
        guard.flush()
