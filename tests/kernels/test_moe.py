"""The MoE experts, every implementation against the loop over experts: the sorted PyTorch path, the Triton
grouped GEMMs and torch._grouped_mm, forward and backward, and the choice between them.

On the CPU the kernels run in Triton's interpreter on tiny shapes; the ``gpu`` tests use the 2.8B
model's widths (D=1472, F=3872, E=8).
"""

import pytest
import torch
import torch.nn.functional as F

import blackmamba.kernels.moe as moe
from blackmamba.kernels import (
    moe_experts,
    moe_experts_fused,
    moe_experts_grouped_mm,
    moe_experts_ref,
    moe_experts_triton,
    use_backend,
    use_settings,
)
from blackmamba.kernels.moe import (
    expert_offsets,
    expert_offsets_ref,
    expert_order,
    expert_order_triton,
    gated_activation,
    gated_activation_ref,
    gated_activation_triton,
    grouped_gemm,
    grouped_gemm_ref,
    grouped_gemm_wgrad,
    grouped_gemm_wgrad_ref,
    moe_experts_sorted,
)

from ..helpers import DEVICE, ON_GPU, assert_close, grad_tolerance, nan_filled
from .common import grads_of


def moe_cpu_inputs(tokens, dim, ff, experts, dtype, skew=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g).to(dtype).requires_grad_()
    if skew:  # most tokens to expert 0, some experts get none
        expert = torch.where(torch.rand(tokens, generator=g) < 0.8, 0, experts - 1)
    else:
        expert = torch.randint(0, experts, (tokens,), generator=g)
    gate = torch.rand(tokens, generator=g).to(dtype).requires_grad_()
    w1 = (torch.randn(experts, 2 * ff, dim, generator=g) / dim**0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(experts, dim, ff, generator=g) / ff**0.5).to(dtype).requires_grad_()
    return x, expert, gate, w1, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,skew", [(1, False), (37, False), (200, True), (64, False)])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_moe_sorted_matches_loop(dtype, tokens, skew, activation):
    x, expert, gate, w1, w2 = moe_cpu_inputs(tokens, 12, 20, 5, dtype, skew=skew, seed=tokens)
    inputs = (x, gate, w1, w2)
    y_ref, g_ref = grads_of(lambda x, g, a, b: moe_experts_ref(x, expert, g, a, b, activation), inputs)
    y, g = grads_of(lambda x, g, a, b: moe_experts_sorted(x, expert, g, a, b, activation), inputs)
    assert_close("y", y_ref, y, dtype)
    for name, a, r in zip(("dx", "dgate", "dw1", "dw2"), g, g_ref, strict=True):
        assert_close(name, r, a, grad_tolerance(dtype))


def test_moe_one_expert_equals_dense_gated_mlp():
    x, _, gate, w1, w2 = moe_cpu_inputs(30, 8, 16, 1, torch.float32)
    expert = torch.zeros(30, dtype=torch.long)
    dense = (F.gelu(x @ w1[0, :16].t()) * (x @ w1[0, 16:].t())) @ w2[0].t() * gate[:, None]
    assert_close("y", dense, moe_experts(x, expert, gate, w1, w2, "gelu"), torch.float32)


def test_gated_activation_halves():
    h = torch.randn(3, 10)
    assert_close("silu gate", F.silu(h[:, :5]) * h[:, 5:], gated_activation(h, "silu"), "fp32_same_math")
    with pytest.raises(ValueError, match="activation"):
        gated_activation(h, "relu")


def test_backend_switch_selects_reference():
    x, expert, gate, w1, w2 = moe_cpu_inputs(10, 4, 6, 3, torch.float32)
    calls = []
    import blackmamba.kernels.moe as moe_mod

    original = moe_mod.moe_experts_ref
    moe_mod.moe_experts_ref = lambda *a: calls.append(1) or original(*a)
    try:
        with use_backend("ref"):
            moe_mod.moe_experts(x, expert, gate, w1, w2)
        moe_mod.moe_experts(x, expert, gate, w1, w2)
    finally:
        moe_mod.moe_experts_ref = original
    assert calls == [1]
    with pytest.raises(ValueError, match="unknown backend"):
        with use_backend("cuda-magic"):
            pass


N_EXPERTS = 4


def routing(tokens: int, experts: int, skew: bool, g: torch.Generator, device=DEVICE) -> torch.Tensor:
    """Uniform routing, or skewed: most tokens to expert 0, the rest to the last, the others empty."""
    if skew:
        expert = torch.where(torch.rand(tokens, generator=g) < 0.8, 0, experts - 1)
    else:
        expert = torch.randint(0, experts, (tokens,), generator=g)
    return expert.to(device)


def moe_inputs(tokens, dim, ff, experts, dtype, skew, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g).to(device, dtype).requires_grad_()
    gate = torch.rand(tokens, generator=g).to(device, dtype).requires_grad_()
    w1 = (torch.randn(experts, 2 * ff, dim, generator=g) / dim**0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(experts, dim, ff, generator=g) / ff**0.5).to(device, dtype).requires_grad_()
    return x, routing(tokens, experts, skew, g, device), gate, w1, w2


def forward_and_grads(fn, x, expert, gate, w1, w2, activation="gelu"):
    y = fn(x, expert, gate, w1, w2, activation)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    return y, torch.autograd.grad(y, (x, gate, w1, w2), dy)


@pytest.mark.parametrize("tokens,experts", [(0, 8), (1, 8), (37, 8), (100, 3), (70, 1)])
def test_expert_order_kernel_matches_the_sort(tokens, experts):
    """The counting sort gives the stable sort's order and offsets, and ``rank`` inverts the order (several
    token blocks: the interpreter's block is 16 tokens)."""
    expert = torch.randint(0, experts, (tokens,), generator=torch.Generator().manual_seed(tokens)).to(DEVICE)
    order, offs, rank = expert_order_triton(expert, experts)
    order_ref, offs_ref = expert_offsets_ref(expert, experts)
    assert torch.equal(order, order_ref) and torch.equal(offs, offs_ref)
    assert offs.dtype == torch.int32 and order.dtype == rank.dtype == torch.long
    assert torch.equal(order[rank], torch.arange(tokens, device=DEVICE))


def test_expert_order_keeps_valid_tokens_in_place_of_bad_ids():
    """Ids outside [0, E) (a caller's bug) go after every expert's rows: the valid tokens keep the order and
    offsets they would have alone."""
    expert = torch.tensor([2, -1, 0, 7, 2, 0, 3], device=DEVICE)
    order, offs, rank = expert_order_triton(expert, 4)
    valid = torch.tensor([0, 2, 4, 5, 6], device=DEVICE)
    order_ref, offs_ref = expert_offsets_ref(expert[valid], 4)
    assert torch.equal(offs, offs_ref) and torch.equal(order[:5], valid[order_ref])
    assert sorted(order[5:].tolist()) == [1, 3] and torch.equal(order[rank], torch.arange(7, device=DEVICE))


def test_expert_order_past_the_counting_sort(monkeypatch):
    """Past COUNTING_SORT_MAX_TOKENS the order comes from the sort, with the same results."""
    expert = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    small = expert_order(expert, 5)
    monkeypatch.setattr(moe, "COUNTING_SORT_MAX_TOKENS", 39)
    for a, b in zip(small, expert_order(expert, 5), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(small[:2], expert_offsets(expert, 5), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
def test_gated_activation_kernel_matches_reference(dtype, activation):
    # F = 21: a masked column tile; h a strided view (every other row of a wider tensor).
    g = torch.Generator().manual_seed(3)
    h = (2 * torch.randn(2 * 9, 50, generator=g)).to(DEVICE, dtype)[::2, 4:46]
    y = gated_activation_triton(h, activation)
    assert y.shape == (9, 21) and y.dtype == dtype
    assert_close("act(a) * b", gated_activation_ref(h, activation), y, dtype)
    with pytest.raises(ValueError, match="activation"):
        gated_activation_triton(h, "relu")


def test_expert_offsets_group_tokens_stably():
    expert = torch.tensor([2, 0, 3, 0, 2, 2, 0])
    order, offs = expert_offsets(expert, 5)
    assert offs.dtype == torch.int32
    assert offs.tolist() == [0, 3, 3, 6, 7, 7]  # experts 1 and 4 are empty
    assert order.tolist() == torch.argsort(expert, stable=True).tolist()


# (trans_b, gather A rows, scatter C rows, scale C rows): fc1, fc2, dX of fc2, dX of fc1, plain.
GEMM_VARIANTS = [(True, True, False, False), (True, False, True, True), (False, True, False, False),
                 (False, False, True, False), (True, False, False, False)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("trans_b,gather,scatter,scale", GEMM_VARIANTS)
def test_grouped_gemm_matches_loop(dtype, tokens, trans_b, gather, scatter, scale):
    g = torch.Generator().manual_seed(tokens)
    k_red, n_out = 24, 40
    order, offs = expert_offsets(routing(tokens, N_EXPERTS, skew=True, g=g), N_EXPERTS)
    a = torch.randn(tokens, k_red, generator=g).to(DEVICE, dtype)
    b_shape = (N_EXPERTS, n_out, k_red) if trans_b else (N_EXPERTS, k_red, n_out)
    b = torch.randn(b_shape, generator=g).to(DEVICE, dtype)
    s = torch.rand(tokens, generator=g).to(DEVICE) if scale else None
    kw = dict(trans_b=trans_b, a_rows=order if gather else None, c_rows=order if scatter else None, c_scale=s)
    out = grouped_gemm(a, b, offs, **kw, out=nan_filled((tokens, n_out), dtype))
    assert_close("out", grouped_gemm_ref(a, b, offs, **kw), out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("gather_a,gather_b", [(False, False), (True, False), (False, True)])
def test_grouped_gemm_wgrad_matches_loop(dtype, tokens, gather_a, gather_b):
    g = torch.Generator().manual_seed(tokens)
    n_out, k_out = 40, 24
    order, offs = expert_offsets(routing(tokens, N_EXPERTS, skew=True, g=g), N_EXPERTS)
    a = torch.randn(tokens, n_out, generator=g).to(DEVICE, dtype)
    b = torch.randn(tokens, k_out, generator=g).to(DEVICE, dtype)
    s = torch.rand(tokens, generator=g).to(DEVICE) if gather_a else None  # dW2 scales dy by the gate
    kw = dict(a_rows=order if gather_a else None, b_rows=order if gather_b else None, a_scale=s)
    out = grouped_gemm_wgrad(a, b, offs, **kw, out=nan_filled((N_EXPERTS, n_out, k_out), dtype))
    expected = grouped_gemm_wgrad_ref(a, b, offs, **kw)
    assert (expected[1:3] == 0).all()  # empty experts get zero gradients
    assert_close("out", expected, out, dtype)
    assert_close("empty experts", expected[1:3], out[1:3], "exact")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 33])
@pytest.mark.parametrize("trans_b,gather,scatter,scale", GEMM_VARIANTS)
def test_grouped_gemm_fp8_b_matches_loop(dtype, tokens, trans_b, gather, scatter, scale):
    """B in e4m3 with a scale per (expert, output column) against the loop on B dequantized in fp32."""
    g = torch.Generator().manual_seed(tokens + 7)
    k_red, n_out = 24, 40
    order, offs = expert_offsets(routing(tokens, N_EXPERTS, skew=True, g=g), N_EXPERTS)
    a = torch.randn(tokens, k_red, generator=g).to(DEVICE, dtype)
    b_shape = (N_EXPERTS, n_out, k_red) if trans_b else (N_EXPERTS, k_red, n_out)
    b8 = (4 * torch.randn(b_shape, generator=g)).to(torch.float8_e4m3fn).to(DEVICE)
    b_scale = ((torch.rand(N_EXPERTS, n_out, generator=g) + 0.5) / 16).to(DEVICE)
    s = torch.rand(tokens, generator=g).to(DEVICE) if scale else None
    kw = dict(trans_b=trans_b, a_rows=order if gather else None, c_rows=order if scatter else None, c_scale=s,
              b_scale=b_scale)  # fmt: skip
    out = grouped_gemm(a, b8, offs, **kw, out=nan_filled((tokens, n_out), dtype))
    assert_close("out", grouped_gemm_ref(a, b8, offs, **kw), out, dtype)


def test_grouped_gemm_rejects_bad_shapes():
    offs = torch.zeros(N_EXPERTS + 1, dtype=torch.int32, device=DEVICE)
    b = torch.randn(N_EXPERTS, 8, 6, device=DEVICE)
    with pytest.raises(ValueError, match="grouped_gemm"):
        grouped_gemm(torch.randn(3, 8, device=DEVICE), b, offs)  # K is 6 with trans_b
    with pytest.raises(ValueError, match="grouped_gemm"):
        grouped_gemm(torch.randn(3, 6, device=DEVICE), b, offs.long())
    with pytest.raises(ValueError, match="grouped_gemm_wgrad"):
        grouped_gemm_wgrad(torch.randn(3, 8, device=DEVICE), torch.randn(3, 5, device=DEVICE), offs, out=b)
    b8, a = b.to(torch.float8_e4m3fn), torch.randn(3, 6, device=DEVICE)
    with pytest.raises(ValueError, match="b_scale"):
        grouped_gemm(a, b8, offs)  # float8 B without its scales
    with pytest.raises(ValueError, match="b_scale"):
        grouped_gemm(a, b, offs, b_scale=torch.ones(N_EXPERTS, 8, device=DEVICE))  # scales for a 16/32-bit B
    with pytest.raises(ValueError, match="b_scale"):
        grouped_gemm(a, b8, offs, b_scale=torch.ones(N_EXPERTS, 6, device=DEVICE))  # (E, K), not (E, N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,skew,activation", [(1, False, "gelu"), (7, True, "silu"), (33, True, "gelu"), (33, False, "gelu_tanh")]
)
def test_moe_triton_matches_loop(poisoned, dtype, tokens, skew, activation):
    inputs = moe_inputs(tokens, 24, 20, N_EXPERTS, dtype, skew, seed=tokens)
    y_ref, g_ref = forward_and_grads(moe_experts_ref, *inputs, activation)
    with use_backend("triton"):
        y, grads = forward_and_grads(moe_experts, *inputs, activation)
    assert_close("y", y_ref, y, dtype)
    for name, got, want in zip(("dx", "dgate", "dw1", "dw2"), grads, g_ref, strict=True):
        assert_close(name, want, got, grad_tolerance(dtype))


def test_moe_triton_fp32_gate_under_autocast(poisoned):
    """The layer's case: fp32 weights and gate, the experts in autocast's bf16 (the output too)."""
    x, expert, gate, w1, w2 = moe_inputs(7, 24, 20, N_EXPERTS, torch.float32, skew=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y_ref, g_ref = forward_and_grads(moe_experts_ref, x, expert, gate, w1, w2)
        y, grads = forward_and_grads(moe_experts_triton, x, expert, gate, w1, w2)
    assert y.dtype == torch.bfloat16
    assert_close("y", y_ref, y, torch.bfloat16)
    for name, got, want in zip(("dx", "dgate", "dw1", "dw2"), grads, g_ref, strict=True):
        assert_close(name, want.float(), got.float(), "bf16_grad")


def test_moe_triton_takes_strided_inputs(poisoned):
    x, expert, gate, w1, w2 = moe_inputs(7, 24, 20, N_EXPERTS, torch.float32, skew=False)
    x_strided = x.detach().t().contiguous().t().requires_grad_()  # column-major
    gate_strided = torch.stack([gate.detach(), gate.detach()], 1)[:, 1].requires_grad_()
    inputs = (x_strided, expert, gate_strided, w1, w2)
    y_ref, g_ref = forward_and_grads(moe_experts_ref, *inputs)
    y, grads = forward_and_grads(moe_experts_triton, *inputs)
    assert_close("y", y_ref, y, torch.float32)
    for name, got, want in zip(("dx", "dgate", "dw1", "dw2"), grads, g_ref, strict=True):
        assert_close(name, want, got, torch.float32)


def test_moe_experts_picks_the_grouped_gemm(monkeypatch):
    x, expert, gate, w1, w2 = moe_inputs(9, 24, 20, N_EXPERTS, torch.float32, skew=False)
    calls = []
    monkeypatch.setattr(moe, "moe_experts_triton", lambda *a: calls.append("triton") or moe_experts_ref(*a))
    monkeypatch.setattr(moe, "moe_experts_grouped_mm", lambda *a: calls.append("torch") or moe_experts_ref(*a))
    with use_backend("triton"):
        moe_experts(x, expert, gate, w1, w2)  # "auto": fp32 (or CPU) tensors take ours
        with use_settings(grouped_gemm="torch"):
            moe_experts(x, expert, gate, w1, w2)
        with pytest.raises(ValueError, match="grouped_gemm"), use_settings(grouped_gemm="cutlass"):
            moe_experts(x, expert, gate, w1, w2)
    with use_backend("torch"):
        moe_experts(x, expert, gate, w1, w2)
    assert calls == ["triton", "torch"]


@pytest.mark.skipif(ON_GPU, reason="checks the CPU guard")
def test_grouped_mm_forward_on_cpu_and_its_guard():
    x, expert, gate, w1, w2 = moe_inputs(33, 24, 20, N_EXPERTS, torch.float32, skew=True)
    with torch.no_grad():
        y_ref = moe_experts_ref(x, expert, gate, w1, w2)
        assert_close("y", y_ref, moe_experts_grouped_mm(x, expert, gate, w1, w2), torch.float32)
    with pytest.raises(NotImplementedError, match="CUDA"):
        moe_experts_grouped_mm(x, expert, gate, w1, w2)


# The 2.8B model's expert widths.
D_28B, F_28B, E_28B = 1472, 3872, 8


def fp32_reference(x, expert, gate, w1, w2):
    """The loop over experts in fp32 from the same (rounded) inputs, with grads in the inputs' dtype."""
    leaves = [t.detach().float().requires_grad_() for t in (x, gate, w1, w2)]
    y, grads = forward_and_grads(moe_experts_ref, leaves[0], expert, *leaves[1:])
    return y, grads


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [moe_experts_triton, moe_experts_grouped_mm])
@pytest.mark.parametrize("tokens", [2048, 16384])
@pytest.mark.parametrize("skew", [False, True])
def test_moe_grouped_full_size_bf16(poisoned, impl, tokens, skew):
    inputs = moe_inputs(tokens, D_28B, F_28B, E_28B, torch.bfloat16, skew, device="cuda")
    y_ref, g_ref = fp32_reference(*inputs)
    y, grads = forward_and_grads(impl, *inputs)
    assert y.dtype == torch.bfloat16
    assert_close("y", y_ref, y, torch.bfloat16, same_dtype=False)
    for name, got, want in zip(("dx", "dgate", "dw1", "dw2"), grads, g_ref, strict=True):
        assert got.dtype == torch.bfloat16, name
        assert_close(name, want, got, "bf16_grad", same_dtype=False)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 3, 17, 64, 2048])
def test_moe_triton_full_size_fp32(poisoned, tokens):
    """Decode sizes (1-64 tokens, most experts empty) and a prefill, in fp32 against the loop."""
    inputs = moe_inputs(tokens, D_28B, F_28B, E_28B, torch.float32, skew=tokens > 64, device="cuda")
    y_ref, g_ref = forward_and_grads(moe_experts_ref, *inputs)
    y, grads = forward_and_grads(moe_experts_triton, *inputs)
    assert_close("y", y_ref, y, torch.float32)
    for name, got, want in zip(("dx", "dgate", "dw1", "dw2"), grads, g_ref, strict=True):
        assert_close(name, want, got, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b,gather,scatter,scale", GEMM_VARIANTS)
def test_grouped_gemm_full_size(trans_b, gather, scatter, scale):
    g = torch.Generator().manual_seed(0)
    tokens, k_red, n_out = 4096, D_28B, 2 * F_28B
    order, offs = expert_offsets(routing(tokens, E_28B, skew=True, g=g, device="cuda"), E_28B)
    a = torch.randn(tokens, k_red, generator=g).to("cuda", torch.bfloat16)
    b_shape = (E_28B, n_out, k_red) if trans_b else (E_28B, k_red, n_out)
    b = torch.randn(b_shape, generator=g).to("cuda", torch.bfloat16)
    s = torch.rand(tokens, generator=g).cuda() if scale else None
    kw = dict(trans_b=trans_b, a_rows=order if gather else None, c_rows=order if scatter else None, c_scale=s)
    out = grouped_gemm(a, b, offs, **kw, out=nan_filled((tokens, n_out), torch.bfloat16, "cuda"))
    assert_close("out", grouped_gemm_ref(a, b, offs, **kw), out, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("gather_a,gather_b", [(False, False), (True, False), (False, True)])
def test_grouped_gemm_wgrad_full_size(gather_a, gather_b):
    g = torch.Generator().manual_seed(0)
    tokens, n_out, k_out = 4096, D_28B, F_28B
    order, offs = expert_offsets(routing(tokens, E_28B, skew=True, g=g, device="cuda"), E_28B)
    a = torch.randn(tokens, n_out, generator=g).to("cuda", torch.bfloat16)
    b = torch.randn(tokens, k_out, generator=g).to("cuda", torch.bfloat16)
    s = torch.rand(tokens, generator=g).cuda() if gather_a else None
    kw = dict(a_rows=order if gather_a else None, b_rows=order if gather_b else None, a_scale=s)
    out = grouped_gemm_wgrad(a, b, offs, **kw, out=nan_filled((E_28B, n_out, k_out), torch.bfloat16, "cuda"))
    assert_close("out", grouped_gemm_wgrad_ref(a, b, offs, **kw), out, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", [moe_experts_triton, moe_experts_grouped_mm, moe_experts_fused])
def test_moe_grouped_never_syncs_with_the_host(impl):
    x, expert, gate, w1, w2 = moe_inputs(2048, D_28B, F_28B, E_28B, torch.bfloat16, skew=True, device="cuda")
    dy = torch.randn(x.shape, device="cuda", dtype=x.dtype)
    torch.autograd.grad(impl(x, expert, gate, w1, w2), (x, gate, w1, w2), dy)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.autograd.grad(impl(x, expert, gate, w1, w2), (x, gate, w1, w2), dy)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_auto_grouped_gemm_choice():
    w1 = torch.empty(N_EXPERTS, 32, 24, dtype=torch.bfloat16)
    assert moe._grouped_gemm_choice(torch.empty(4096, 24, dtype=torch.bfloat16), w1) == "triton"  # not CUDA
    if ON_GPU:
        w1 = w1.cuda()
        assert moe._grouped_gemm_choice(torch.empty(4096, 24, device="cuda", dtype=torch.bfloat16), w1) == "torch"
        assert moe._grouped_gemm_choice(torch.empty(64, 24, device="cuda", dtype=torch.bfloat16), w1) == "triton"
        assert moe._grouped_gemm_choice(torch.empty(4096, 24, device="cuda"), w1.float()) == "triton"
        # With autograd (training): the fused path below fused_train_max_tokens, _grouped_mm from there.
        w1_train = w1.clone().requires_grad_()
        limit = moe.get_settings().fused_train_max_tokens
        for tokens, expected in ((64, "fused"), (limit - 1, "fused"), (limit, "torch")):
            x = torch.empty(tokens, 24, device="cuda", dtype=torch.bfloat16)
            assert moe._grouped_gemm_choice(x, w1_train) == expected
            with torch.no_grad():
                assert moe._grouped_gemm_choice(x, w1_train) == ("triton" if tokens < 1024 else "torch")
