"""CastOnce: the bf16 weight casts made once per optimizer step train exactly as autocast's per-forward casts."""

import pytest
import torch

from blackmamba.kernels import use_backend
from blackmamba.training.optim import build_optimizer
from blackmamba.training.precision import CAST_SUFFIXES, CastOnce
from tests.helpers import tiny_model


def _steps(cast_once: bool, checkpointing: bool = False, steps: int = 2, micro: int = 2):
    """Parameters and gradients after ``steps`` optimizer steps of ``micro`` micro-batches under CPU bf16
    autocast (fp32 master weights), with or without CastOnce; and the losses."""
    model = tiny_model(seed=3).train()
    model.gradient_checkpointing = checkpointing
    opt = build_optimizer(model, 1e-2, 0.1)
    call = CastOnce(model, opt) if cast_once else model
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, model.config.vocab_size, (steps * micro, 2, 9), generator=gen)
    losses, grads = [], {}
    for s in range(steps):
        for m in range(micro):
            batch = ids[s * micro + m]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = call(batch[:, :-1], targets=batch[:, 1:]).loss
            (loss / micro).backward()
            losses.append(loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    return dict(model.named_parameters()), grads, losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_cast_once_is_bit_exact(checkpointing):
    with use_backend("torch"):
        p0, g0, l0 = _steps(False, checkpointing)
        p1, g1, l1 = _steps(True, checkpointing)
    assert torch.equal(torch.stack(l0), torch.stack(l1))
    assert all(p.dtype == torch.float32 for p in p1.values())  # the master weights stay fp32
    for name in p0:
        assert torch.equal(g0[name], g1[name]), f"gradient of {name}"
        assert torch.equal(p0[name], p1[name]), f"parameter {name}"
    # The weights moved, and the casts were not of nothing: the lowered parameters have gradients.
    lowered = [n for n in g1 if n.endswith(CAST_SUFFIXES)]
    assert lowered and all(g1[n].abs().sum() > 0 for n in lowered)


def test_cast_once_casts_once_per_step_and_refreshes_after_the_step():
    model = tiny_model(seed=1).train()
    opt = build_optimizer(model, 1e-2, 0.0)
    call = CastOnce(model, opt)
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call(ids, targets=ids).loss.backward()
        first = call._casts
        call(ids, targets=ids).loss.backward()
        assert call._casts is first  # the second micro-batch reuses the casts
    w = first["layers.0.mixer.in_proj.weight"]
    assert w.dtype == torch.bfloat16 and torch.equal(w, model.layers[0].mixer.in_proj.weight.to(torch.bfloat16))
    opt.step()
    assert call._casts is None  # the step dropped them: the next forward casts the updated weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        call(ids, targets=ids)
    assert torch.equal(call._casts["layers.0.mixer.in_proj.weight"], model.layers[0].mixer.in_proj.weight.bfloat16())
    call.remove()
    assert call._casts is None


def test_cast_once_leaves_other_calls_to_the_model():
    model = tiny_model(seed=2).train()
    call = CastOnce(model, build_optimizer(model, 1e-2, 0.0))
    ids = torch.randint(1, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(call(ids).logits, model(ids).logits, rtol=0, atol=0)  # fp32: no autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        call(ids)
    assert call._casts is None
