"""The fused MoE training path (kernels/moe_fused.py) against the loop over experts, forward and every gradient.

On the CPU the kernels run in Triton's interpreter on tiny, awkward shapes (D 19, F 21, experts without
tokens, token counts that are not a multiple of the tiles); the ``gpu`` tests use the 2.8B widths.
"""

import pytest
import torch

import blackmamba.kernels.moe_fused as moe_fused
from blackmamba.kernels import moe_experts, moe_experts_fused, moe_experts_ref, use_backend, use_settings
from blackmamba.kernels.moe import expert_offsets, gated_activation
from blackmamba.kernels.moe_fused import fc1_gated, fc2_dgrad_gated, tiles_for

from ..helpers import DEVICE, assert_close, grad_tolerance
from .test_moe import D_28B, E_28B, F_28B, fp32_reference, moe_inputs

DIM, FF, EXPERTS = 19, 21, 4  # F spans two 16-column tiles of the interpreter
NAMES = ("dx", "dgate", "dw1", "dw2")


def forward_and_grads(fn, x, expert, gate, w1, w2, activation="gelu"):
    """y and the gradients of <y, dy> for a random dy, for the inputs that require them (None for the others)."""
    y = fn(x, expert, gate, w1, w2, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    leaves = [t for t in (x, gate, w1, w2) if t.requires_grad]
    grads = iter(torch.autograd.grad(y, leaves, dy)) if leaves else iter(())
    return y, [next(grads) if t.requires_grad else None for t in (x, gate, w1, w2)]


def assert_matches_loop(inputs, dtype, activation="gelu"):
    y_ref, g_ref = forward_and_grads(moe_experts_ref, *inputs, activation)
    y, grads = forward_and_grads(moe_experts_fused, *inputs, activation)
    assert_close("y", y_ref, y, dtype)
    for name, got, want in zip(NAMES, grads, g_ref, strict=True):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_close(name, want, got, grad_tolerance(dtype))
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,skew,activation", [(1, False, "gelu"), (37, True, "silu"), (50, False, "gelu_tanh"), (37, True, "gelu")]
)
def test_fused_matches_loop(poisoned, dtype, tokens, skew, activation):
    inputs = moe_inputs(tokens, DIM, FF, EXPERTS, dtype, skew, seed=tokens)
    grads = assert_matches_loop(inputs, dtype, activation)
    if skew:  # experts 1 and 2 have no tokens: their weight gradients are exactly zero
        dw1, dw2 = grads[2], grads[3]
        assert (dw1[1:3] == 0).all() and (dw2[1:3] == 0).all()
        assert (dw1[0] != 0).any() and (dw2[-1] != 0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_torch(poisoned, dtype):
    """The two new kernels on their own: fc1 (h and the activation) and fc2's dgrad with its epilogue."""
    x, expert, gate, w1, w2 = (t.detach() for t in moe_inputs(41, DIM, FF, EXPERTS, dtype, skew=True, seed=3))
    order, offs = expert_offsets(expert, EXPERTS)
    h, act = fc1_gated(x, w1, order, offs, "gelu", store_h=True)
    ff = FF
    h_ref = torch.cat([x[order][i : i + 1].float() @ w1[e].float().t() for i, e in enumerate(expert[order].tolist())])
    assert_close("h", h_ref.to(dtype), h, dtype)
    assert_close("act", gated_activation(h_ref, "gelu").to(dtype), act, dtype)
    _, act_only = fc1_gated(x, w1, order, offs, "gelu", store_h=False)
    assert_close("act without h", act, act_only, "exact")

    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dh, actg, dgate = fc2_dgrad_gated(dy, w2, h, gate, order, offs, "gelu")
    g = torch.stack([dy[t].float() @ w2[expert[t]].float() for t in order.tolist()])  # (T, F) sorted
    hf = h.float().requires_grad_()
    act_ref = gated_activation(hf, "gelu")
    (dh_ref,) = torch.autograd.grad(act_ref, hf, g * gate[order].float()[:, None])
    assert_close("dh", dh_ref.to(dtype), dh, grad_tolerance(dtype))
    assert_close("gate * act", (act_ref * gate[order].float()[:, None]).detach().to(dtype), actg, dtype)
    dgate_ref = torch.empty(len(order)).index_copy_(0, order, (act_ref.detach() * g).sum(1))
    assert_close("dgate", dgate_ref.to(dtype), dgate, grad_tolerance(dtype))
    assert dh.shape == (41, 2 * ff) and actg.shape == (41, ff)


@pytest.mark.parametrize(
    "needs", [(True, False, False, False), (False, True, True, False), (False, False, False, True)]
)
def test_fused_gradients_of_some_inputs(poisoned, needs):
    """Each kernel output is only computed when some input asks for it; the others come back None."""
    inputs = list(moe_inputs(23, DIM, FF, EXPERTS, torch.float32, skew=False, seed=5))
    for i, need in zip((0, 2, 3, 4), needs, strict=True):
        inputs[i] = inputs[i].detach().requires_grad_(need)
    assert_matches_loop(inputs, torch.float32)


def test_fused_inference_matches_loop(poisoned):
    inputs = moe_inputs(29, DIM, FF, EXPERTS, torch.bfloat16, skew=True, seed=6)
    with torch.no_grad():
        y = moe_experts_fused(*inputs, "silu")
        assert_close("y", moe_experts_ref(*inputs, "silu"), y, torch.bfloat16)


def test_fused_fp32_gate_under_autocast(poisoned):
    """The layer's case: fp32 weights and gate, the experts in autocast's bf16 (the output too)."""
    x, expert, gate, w1, w2 = moe_inputs(21, DIM, FF, EXPERTS, torch.float32, skew=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y_ref, g_ref = forward_and_grads(moe_experts_ref, x, expert, gate, w1, w2)
        y, grads = forward_and_grads(moe_experts_fused, x, expert, gate, w1, w2)
    assert y.dtype == torch.bfloat16
    assert_close("y", y_ref, y, torch.bfloat16)
    for name, got, want in zip(NAMES, grads, g_ref, strict=True):
        assert got.dtype == want.dtype == torch.float32, name
        assert_close(name, want, got, "bf16_grad")


def test_fused_takes_strided_inputs(poisoned):
    x, expert, gate, w1, w2 = moe_inputs(17, DIM, FF, EXPERTS, torch.float32, skew=False)
    x_strided = x.detach().t().contiguous().t().requires_grad_()  # column-major
    gate_strided = torch.stack([gate.detach(), gate.detach()], 1)[:, 1].requires_grad_()
    w2_strided = w2.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert_matches_loop((x_strided, expert, gate_strided, w1, w2_strided), torch.float32)


def test_fused_without_tokens():
    x, expert, gate, w1, w2 = moe_inputs(0, DIM, FF, EXPERTS, torch.float32, skew=False)
    y, grads = forward_and_grads(moe_experts_fused, x, expert, gate, w1, w2)
    assert y.shape == (0, DIM)
    assert grads[2].shape == w1.shape and (grads[2] == 0).all() and (grads[3] == 0).all()


def test_fused_rejects_bad_input():
    x, expert, gate, w1, w2 = moe_inputs(5, DIM, FF, EXPERTS, torch.float32, skew=False)
    with pytest.raises(ValueError, match="activation"):
        moe_experts_fused(x, expert, gate, w1, w2, "relu")
    with pytest.raises(ValueError, match="weights"):
        moe_experts_fused(x, expert, gate, w1[:, :, :-1], w2)


def test_grouped_gemm_setting_selects_fused(monkeypatch):
    x, expert, gate, w1, w2 = moe_inputs(9, DIM, FF, EXPERTS, torch.float32, skew=False)
    calls = []
    monkeypatch.setattr(moe_fused, "moe_experts_fused", lambda *a: calls.append("fused") or moe_experts_ref(*a))
    with use_backend("triton"):
        moe_experts(x, expert, gate, w1, w2)  # "auto" does not pick it (yet)
        with use_settings(grouped_gemm="fused"):
            moe_experts(x, expert, gate, w1, w2)
    assert calls == ["fused"]


def test_tiles_follow_the_settings():
    tiles = {k: dict(v) for k, v in moe_fused.get_settings().moe_train_tiles.items()}
    tiles["fc1"].update(BM=64, BN=32)
    with use_settings(moe_train_tiles=tiles):
        assert tiles_for("fc1", 65536, 8, torch.bfloat16, on_gpu=True)["BN"] == 32
        assert tiles_for("fc1", 65536, 8, torch.bfloat16, on_gpu=True)["BM"] == 64
    small = tiles_for("dx", 40, 8, torch.bfloat16, on_gpu=True)  # 5 tokens per expert: 16-row tiles
    assert small["BM"] == 16 and small["num_warps"] <= 4
    fp32 = tiles_for("wgrad", 65536, 8, torch.float32, on_gpu=True)
    assert fp32["BK"] == moe_fused.get_settings().moe_train_tiles["wgrad"]["BK"] // 2
    with pytest.raises(ValueError, match="kernel"):
        tiles_for("fc3", 1, 1, torch.float32, on_gpu=True)
    with pytest.raises(ValueError, match="moe_train_tiles"), use_settings(moe_train_tiles={"fc1": tiles["fc1"]}):
        pass


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2048, 16384])
@pytest.mark.parametrize("skew", [False, True])
def test_fused_full_size_bf16(poisoned, tokens, skew):
    inputs = moe_inputs(tokens, D_28B, F_28B, E_28B, torch.bfloat16, skew, device="cuda")
    y_ref, g_ref = fp32_reference(*inputs)
    y, grads = forward_and_grads(moe_experts_fused, *inputs)
    assert y.dtype == torch.bfloat16
    assert_close("y", y_ref, y, torch.bfloat16, same_dtype=False)
    for name, got, want in zip(NAMES, grads, g_ref, strict=True):
        assert got.dtype == torch.bfloat16, name
        assert_close(name, want, got, "bf16_grad", same_dtype=False)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 17, 2048])
def test_fused_full_size_fp32(poisoned, tokens):
    inputs = moe_inputs(tokens, D_28B, F_28B, E_28B, torch.float32, skew=tokens > 64, device="cuda")
    assert_matches_loop(inputs, torch.float32)
