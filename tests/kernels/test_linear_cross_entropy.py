"""The chunked head + cross-entropy against F.linear + F.cross_entropy on the whole logits."""

import pytest
import torch
import torch.nn.functional as F

from blackmamba.kernels import linear_cross_entropy, linear_cross_entropy_ref, use_backend
from tests.helpers import assert_close, grad_tolerance, tiny_model


def _inputs(t, d, v, dtype, seed=0, ignored=()):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(t, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.25).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (t,), generator=g)
    targets[list(ignored)] = -100
    return h, w, targets


def _loss_and_grads(fn, h, w, targets, **kw):
    loss = fn(h, w, targets, **kw)
    return loss, torch.autograd.grad(loss * 1.7, (h, w))  # a backward with an incoming scalar other than 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("t", "d", "v", "chunk"), [(1, 8, 5, 4), (63, 24, 101, 16), (50, 40, 77, 50), (9, 16, 33, 64)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_cross_entropy_on_the_logits(dtype, t, d, v, chunk, reduction):
    h, w, targets = _inputs(t, d, v, dtype, ignored=[0, t // 2] if t > 2 else ())
    ref, ref_grads = _loss_and_grads(linear_cross_entropy_ref, h, w, targets, reduction=reduction)
    out, grads = _loss_and_grads(linear_cross_entropy, h, w, targets, reduction=reduction, chunk_size=chunk)
    assert out.dtype == torch.float32
    assert_close("loss", ref, out, torch.float32)
    for name, r, o in zip(("dh", "dw"), ref_grads, grads, strict=True):
        assert_close(name, r, o, grad_tolerance(dtype))


def test_fp32_master_weights_under_autocast():
    """As the trainer calls it: fp32 final-norm output and fp32 embedding, bf16 autocast."""
    h, w, targets = _inputs(70, 32, 130, torch.float32, seed=1, ignored=[5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = _loss_and_grads(linear_cross_entropy_ref, h, w, targets)
        out, grads = _loss_and_grads(linear_cross_entropy, h, w, targets, chunk_size=32)
    assert_close("loss", ref, out, torch.float32)
    for name, r, o in zip(("dh", "dw"), ref_grads, grads, strict=True):
        assert o.dtype == torch.float32, name  # the gradients of fp32 inputs come back fp32
        assert_close(name, r, o, "bf16_grad")


def test_reference_backend_and_no_grad():
    h, w, targets = _inputs(20, 8, 30, torch.float32, seed=2)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, targets, chunk_size=7)
    assert not out.requires_grad
    ref = F.cross_entropy((h @ w.t()).float(), targets)
    assert_close("loss", ref.detach(), out, torch.float32)
    with use_backend("ref"):
        loss = linear_cross_entropy(h, w, targets, chunk_size=7)
    assert loss.grad_fn is not None and "Nll" in type(loss.grad_fn).__name__  # the plain path ran


def test_bad_arguments_are_named():
    h, w, targets = _inputs(6, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w[:, :5], targets)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, targets[:4])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, targets, chunk_size=0)


def test_model_loss_equals_cross_entropy_of_its_logits():
    model = tiny_model(seed=4).train()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, model.config.vocab_size, (3, 12), generator=g)
    x, y = ids[:, :-1], ids[:, 1:]
    params = [p for p in model.parameters()]
    out = model(x)
    assert out.loss is None
    ref = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    fused = model(x, targets=y)
    assert fused.logits is None
    grads = torch.autograd.grad(fused.loss, params, allow_unused=True)
    assert_close("loss", ref.detach(), fused.loss.detach(), torch.float32)
    for (name, _), r, o in zip(model.named_parameters(), ref_grads, grads, strict=True):
        assert (r is None) == (o is None), name
        if r is not None:
            assert_close(name, r, o, "fp32_model_grad")
    with pytest.raises(ValueError, match="targets"):
        model(x, targets=y[:, :5])


@pytest.mark.slow
def test_compiled_glue_matches_the_eager_chunks():
    """loss_compiled: the chunks' elementwise work under torch.compile (inductor; on the CPU a C++ build)."""
    from blackmamba.kernels import use_settings

    h, w, targets = _inputs(40, 16, 70, torch.bfloat16, seed=3, ignored=[2])
    eager, eager_grads = _loss_and_grads(linear_cross_entropy, h, w, targets, chunk_size=16)
    with use_settings(loss_compiled=True):
        out, grads = _loss_and_grads(linear_cross_entropy, h, w, targets, chunk_size=16)
    assert_close("loss", eager, out, torch.float32)
    for name, r, o in zip(("dh", "dw"), eager_grads, grads, strict=True):
        assert_close(name, r, o, torch.bfloat16)
