"""The few-row linear kernel (kernels/gemv.py) against its reference: dense and fp8 weights, split-K, dispatch.

On the CPU the kernel runs in Triton's interpreter on tiny, awkward widths (N and K not multiples of the
tiles); the ``gpu`` tests use the 2.8B Mamba projections and a CUDA graph.
"""

import os
import subprocess
import sys

import pytest
import torch

from blackmamba.errors import BlackMambaError
from blackmamba.kernels import gemv, get_settings, use_backend, use_settings
from blackmamba.kernels.causal_conv1d import causal_conv1d_update, conv_update_triton
from blackmamba.kernels.gemv import (
    COUNTERS,
    GemvError,
    dequantize,
    linear,
    linear_conv,
    linear_conv_triton,
    linear_reference,
    linear_triton,
    split_k,
)

from ..helpers import DEVICE, ON_GPU, assert_close

FP8 = torch.float8_e4m3fn
SHAPES = [(18, 70), (5, 33)]  # (N, K): neither a multiple of the interpreter's tiles (BN 4 or 16, BK 32)
TOL_FP8 = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}


def gemv_inputs(rows, n, k, dtype, seed=0, device=DEVICE, lead=()):
    """x (*lead, rows, K), a dense weight (N, K) in ``dtype``, an e4m3 weight with its fp32 scales (N,)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    w8 = (4 * torch.randn(n, k, generator=g)).to(FP8).to(device)
    scale = (torch.rand(n, generator=g) + 0.5).div(4 * k**0.5).to(device)
    return x, w, w8, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_linear_triton_matches_reference(poisoned, dtype, rows, n, k):
    x, w, w8, scale = gemv_inputs(rows, n, k, dtype, seed=rows)
    assert_close("dense", linear_reference(x, w), linear_triton(x, w), dtype)
    assert_close("fp8", linear_reference(x, w8, scale), linear_triton(x, w8, scale), TOL_FP8[dtype])
    assert_close("scaled dense", linear_reference(x, w, scale), linear_triton(x, w, scale), dtype)


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 5])
def test_split_k_is_deterministic_and_leaves_counters_zeroed(poisoned, splits, rows):
    x, w, w8, scale = gemv_inputs(rows, 9, 100, torch.float32, seed=splits)  # K = 100: up to 4 splits of 32
    ref = linear_reference(x, w8, scale)
    first = linear_triton(x, w8, scale, splits=splits)
    assert_close("y", ref, first, torch.float32)
    assert torch.equal(first, linear_triton(x, w8, scale, splits=splits))
    counters = gemv._counters.get(x.device)
    assert splits == 1 or (counters is not None and not counters.any())


def test_one_row_on_the_dot_path(poisoned):
    x, w, w8, scale = gemv_inputs(1, 21, 45, torch.bfloat16)
    tiles = {1: dict(BN=16, BK=64, num_warps=4, num_stages=1, DOT=1)}
    with use_settings(gemv_tiles=tiles):
        assert gemv._config(tiles, 1, torch.bfloat16, torch.bfloat16, x.is_cuda)["DOT"] == 1
        assert_close("fp8", linear_reference(x, w8, scale), linear_triton(x, w8, scale), torch.bfloat16)


def test_leading_dims_strides_and_many_rows(poisoned):
    x, w, w8, scale = gemv_inputs(35, 10, 40, torch.float32, lead=(2,))  # 70 rows: two row blocks of 64
    y = linear_triton(x, w8, scale)
    assert y.shape == (2, 35, 10)
    assert_close("many rows", linear_reference(x, w8, scale), y, torch.float32)
    wide = torch.randn(3, 80, device=DEVICE)
    assert_close("strided x", linear_reference(wide[:, ::2], w), linear_triton(wide[:, ::2], w), torch.float32)
    w_cols = w.t().contiguous().t()  # the same values, column-major
    assert_close("strided weight", linear_reference(x, w), linear_triton(x, w_cols), torch.float32)
    assert linear_triton(x[:, :0], w).shape == (2, 0, 10)


def test_split_k_plan():
    assert split_k(tiles=16, k=2944, block_k=512, target=264) == (6, 512)  # x_proj, one row, on an H200
    assert split_k(tiles=368, k=1472, block_k=256, target=264) == (1, 1472)  # enough tiles: no split
    assert split_k(tiles=COUNTERS + 1, k=4096, block_k=16, target=10**9) == (1, 4096)
    for tiles, k, block_k, target in [(3, 100, 32, 40), (92, 2944, 256, 264), (1, 7, 16, 64)]:
        splits, per = split_k(tiles, k, block_k, target)
        assert per % block_k == 0 or splits == 1
        assert splits * per >= k > (splits - 1) * per  # every split has work


def test_tile_choice_on_the_gpu():
    bf16, fp32 = torch.bfloat16, torch.float32
    table = {1: dict(BN=8, BK=512, num_warps=4, num_stages=3), 16: dict(BN=8, BK=256, num_warps=4, num_stages=4)}
    one = gemv._config(table, 1, bf16, bf16, True)
    assert one["DOT"] == 0 and one["BN"] == 8
    assert gemv._config(table, 1, FP8, bf16, True)["BK"] == one["BK"]  # CUDA cores: the accumulator's registers
    few = gemv._config(table, 3, bf16, bf16, True)  # the entry for 16 rows, on tl.dot: BN raised to 16
    assert few["DOT"] == 1 and few["BN"] == 16 and few["BK"] == 256
    assert gemv._config(table, 3, FP8, bf16, True)["BK"] == 2 * few["BK"]  # tl.dot: the same bytes per step
    assert gemv._config(table, 40, bf16, bf16, True)["BK"] == 256  # more rows than any entry: the largest
    for w_dtype in (fp32, FP8):
        wide = gemv._config(table, 16, w_dtype, fp32, True)
        assert wide["BK"] <= 128 and wide["num_stages"] <= 3  # fp32 tiles: half the depth in shared memory


def test_shape_tiles_take_precedence_for_their_shape_only():
    bf16 = torch.bfloat16
    table = {1: dict(BN=8, BK=512, num_warps=4, num_stages=3), 16: dict(BN=16, BK=256, num_warps=4, num_stages=4)}
    shapes = {(1, 124, 2944): dict(BN=2, BK=4096, num_warps=8, num_stages=1),
              (16, 124, 2944): dict(BN=32, BK=128, num_warps=4, num_stages=3)}  # fmt: skip
    assert gemv._config(table, 1, bf16, bf16, True, (124, 2944), shapes)["BK"] == 4096
    assert gemv._config(table, 1, bf16, bf16, True, (124, 2048), shapes)["BK"] == 512  # another shape: the rows'
    few = gemv._config(table, 3, bf16, bf16, True, (124, 2944), shapes)  # 3 rows use the 16-row entries
    assert few["BN"] == 32 and few["BK"] == 128 and few["DOT"] == 1
    fp8_shapes = {(1, 124, 2944): dict(BN=4, BK=2048, num_warps=8, num_stages=1, ACC_K=1),
                  (16, 124, 2944): dict(BN=16, BK=256, num_warps=4, num_stages=2)}  # fmt: skip
    one8 = gemv._config(table, 1, FP8, bf16, True, (124, 2944), shapes, fp8_shapes)  # taken as it is
    assert (one8["BN"], one8["BK"], one8["ACC_K"], one8["DOT"]) == (4, 2048, 1, 0)
    assert gemv._config(table, 16, FP8, bf16, True, (124, 2944), shapes, fp8_shapes)["BK"] == 256  # not doubled
    assert gemv._config(table, 1, bf16, bf16, True, (124, 2944), shapes, fp8_shapes)["BK"] == 4096  # 16-bit: its own
    assert gemv._config(table, 16, FP8, bf16, True, (124, 2048), shapes, fp8_shapes)["BK"] == 512  # no entry: rule


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_one_row_summed_each_step(poisoned, dtype, n, k):
    """ACC_K=1 (each step's products summed at once) on dense and fp8 weights, from the fp8 table and from
    gemv_tiles, against the reference; the plan carries it."""
    x, w, w8, scale = gemv_inputs(1, n, k, dtype, seed=n)
    tiles = {**get_settings().gemv_tiles, 1: dict(BN=8, BK=512, num_warps=4, num_stages=1, ACC_K=1)}
    with use_settings(gemv_tiles=tiles, gemv_shape_tiles={}):
        assert gemv._acc_k(gemv.launch_plan(x, w), 1) == 1
        assert_close("dense", linear_reference(x, w), linear_triton(x, w), dtype)
    fp8_tiles = {(1, n, k): dict(BN=8, BK=512, num_warps=4, num_stages=1, ACC_K=1)}
    with use_settings(gemv_fp8_shape_tiles=fp8_tiles):
        assert gemv.launch_plan(x, w8)["ACC_K"] == 1 and gemv.launch_plan(x, w).get("ACC_K", 0) != 1
        assert_close("fp8", linear_reference(x, w8, scale), linear_triton(x, w8, scale), TOL_FP8[dtype])


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of calls :func:`linear` made to the kernel's launcher."""
    calls = []
    launch = gemv.linear_triton

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(gemv, "linear_triton", counted)
    return calls


def test_linear_dispatch(kernel_calls):
    x, w, w8, scale = gemv_inputs(3, 12, 20, torch.float32)
    with use_backend("triton"):
        with use_settings(gemv_dense=False):
            linear(x, w)  # dense weights stay on F.linear unless gemv_dense
        assert len(kernel_calls) == 0
        assert_close("fp8", linear_reference(x, w8, scale), linear(x, w8, scale), torch.float32)
        assert len(kernel_calls) == 1
        with use_settings(gemv_dense=True):
            assert_close("dense", linear_reference(x, w), linear(x, w), torch.float32)
            assert len(kernel_calls) == 2
            with use_settings(gemv_max_rows=2):
                linear(x, w, scale)  # 3 rows > 2 (a scaled 16-bit weight)
                assert len(kernel_calls) == 2
                linear(x, w8, scale)  # float8: gemv_fp8_max_rows
                assert len(kernel_calls) == 3
            with use_settings(gemv_fp8_max_rows=2):
                assert_close("fp8 3 rows > 2", linear_reference(x, w8, scale), linear(x, w8, scale), torch.float32)
            assert len(kernel_calls) == 3
            x_grad = x.detach().requires_grad_()
            y = linear(x_grad, w)  # autograd: F.linear
            assert len(kernel_calls) == 3
            (g,) = torch.autograd.grad(y.sum(), x_grad)
            assert_close("grad", w.sum(0).expand_as(x), g, torch.float32)
    with use_backend("ref"), use_settings(gemv_dense=True):
        assert torch.equal(linear(x, w8, scale), linear_reference(x, w8, scale))
    assert len(kernel_calls) == 3


def test_torch_fallback_dequantizes_to_the_input_dtype():
    x, _, w8, scale = gemv_inputs(40, 12, 20, torch.bfloat16)  # 40 rows: more than gemv_max_rows
    with use_backend("torch"):
        y = linear(x, w8, scale)
    assert y.dtype == torch.bfloat16
    assert_close("fallback", linear_reference(x, w8, scale), y, torch.bfloat16)
    assert_close("dequantize", w8.float() * scale[:, None], dequantize(w8, scale), "exact")


def test_bad_input_is_named():
    x, w, w8, scale = gemv_inputs(2, 6, 8, torch.float32)
    cases = [
        ((x, w[0]), "weight must be"),
        ((x[:, :5], w), r"x must be \(\.\.\., 8\)"),
        ((x, w8), "need their per-output-channel scales"),
        ((x, w8, scale[:5]), "scale must be"),
        ((x, w8, scale.double()), "scale must be"),
        ((x.bfloat16(), w, scale), "share a dtype"),
        ((x.double(), w8, scale), "bf16, fp16 or fp32"),
    ]
    for args, match in cases:
        with pytest.raises(GemvError, match=match):
            linear_triton(*args)
    assert issubclass(GemvError, BlackMambaError) and issubclass(GemvError, ValueError)
    with pytest.raises(GemvError, match="scales"):
        linear_reference(x, w8)


def conv_inputs(rows, dim, width, state_dtype, slots=None, seed=0, device=DEVICE):
    """Conv windows (S, W-1, D) in ``state_dtype`` (S = rows, or 2 rows more for a pool with ``slots``),
    taps (D, W) and a bias (D,), fp32."""
    g = torch.Generator().manual_seed(seed)
    pool = rows if slots is None else rows + 2
    state = torch.randn(pool, width - 1, dim, generator=g).to(device, state_dtype)
    return state, (torch.randn(dim, width, generator=g) / 2).to(device), torch.randn(dim, generator=g).to(device)


def unfused_conv(x, w, scale, state, cw, cb, slots):
    """The reference of linear_conv: the projection, then the conv step on its first D columns."""
    y = linear_reference(x, w, scale)
    dim = cw.shape[0]
    return causal_conv1d_update(y[:, :dim], state, cw, cb, "silu", slots), y[:, dim:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("weights", ["dense", "fp8"])
@pytest.mark.parametrize("pool", [False, True])
def test_linear_conv_matches_reference(poisoned, dtype, rows, weights, pool):
    """The conv in the GEMV's epilogue against the projection and the reference conv step: the conv outputs,
    the passed-through columns and the shifted windows. D = 9 of N = 18 outputs: the conv's last tile also
    holds columns past it (BN 4 on one row, 16 on tl.dot); K = 33 is no multiple of the steps."""
    n, k, dim, width = 18, 33, 9, 4
    x, w, w8, scale = gemv_inputs(rows, n, k, dtype, seed=rows)
    w, scale = (w, None) if weights == "dense" else (w8, scale)
    slots = torch.tensor([2, 0, 4][:rows], device=DEVICE) if pool else None
    state, cw, cb = conv_inputs(rows, dim, width, dtype, slots, seed=rows + 1)
    ref_state = state.clone()
    ref_x, ref_z = unfused_conv(x, w, scale, ref_state, cw, cb, slots)
    out_x, out_z = linear_conv_triton(x, w, state, cw, cb, scale, "silu", slots)
    tol = dtype if weights == "dense" else TOL_FP8[dtype]
    assert_close("conv output", ref_x, out_x, tol)
    assert_close("passed-through columns", ref_z, out_z, tol)
    assert_close("windows", ref_state, state, tol)
    if pool:  # windows no row uses are left as they were
        untouched = [s for s in range(state.shape[0]) if s not in slots.tolist()]
        assert torch.equal(state[untouched], ref_state[untouched])


@pytest.mark.parametrize("splits", [2, 3])
def test_linear_conv_split_k_and_no_bias(poisoned, splits):
    """Split-K: the last program of a tile runs the epilogue; without a bias and with a window of 2."""
    x, w, _, _ = gemv_inputs(1, 14, 100, torch.float32, seed=splits)
    state, cw, _ = conv_inputs(1, 14, 2, torch.float32, seed=splits)
    ref_state = state.clone()
    ref_x, ref_z = unfused_conv(x, w, None, ref_state, cw, None, None)
    out_x, out_z = linear_conv_triton(x, w, state, cw, None, splits=splits)
    assert out_z.shape == (1, 0)  # every output column is a conv channel here
    assert_close("conv output", ref_x, out_x, torch.float32)
    assert_close("windows", ref_state, state, torch.float32)


def test_linear_conv_dispatch(monkeypatch):
    """linear_conv takes the fused launch where the GEMV applies and gemv_conv is on; else the projection and
    the conv step: the same results either way."""
    fused = []
    launch = gemv.linear_conv_triton
    monkeypatch.setattr(gemv, "linear_conv_triton", lambda *a, **kw: fused.append(1) or launch(*a, **kw))
    x, w, _, _ = gemv_inputs(2, 12, 20, torch.float32)
    state, cw, cb = conv_inputs(2, 6, 4, torch.float32)
    results = []
    for backend, conv_on in (("triton", True), ("triton", False), ("ref", True)):
        s = state.clone()
        with use_backend(backend), use_settings(gemv_dense=True, gemv_conv=conv_on):
            results.append((*linear_conv(x, w, s, cw, cb), s))
    assert len(fused) == 1
    for other in results[1:]:
        for name, a, b in zip(("conv output", "other columns", "windows"), results[0], other, strict=True):
            assert_close(name, b, a, torch.float32)


def test_linear_conv_bad_input_is_named():
    x, w, _, _ = gemv_inputs(2, 12, 20, torch.float32)
    state, cw, cb = conv_inputs(2, 6, 4, torch.float32)
    cases = [
        ((x, w, state[:, :2], cw, cb), "conv_state"),
        ((x, w, state, cw, cb[:3]), "conv_bias"),
        ((x, w, torch.randn(2, 3, 13), torch.randn(13, 4), None), "13 channels must be among the weight's 12"),
        ((x[None], w, state, cw, cb), r"x must be \(B, K\)"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            linear_conv_triton(*args)
    with pytest.raises(GemvError, match="unknown activation"):
        linear_conv_triton(x, w, state, cw, cb, activation="relu")


# Lowers the kernels to cubins for an H200 (Triton's interpreter accepts more than its compiler). It runs in a
# fresh process: the compiler cannot run where TRITON_INTERPRET has set Triton up for the interpreter.
COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from blackmamba.kernels import gemv, moe_decode

def compile_for_sm90(kernel, pointers, consts, dims=()):
    signature = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ptx"]
    assert "atom" in ptx or not consts.get("SPLIT", 1) > 1, "no split-K counter"

flags = dict(DOT_F32=False, PRECISION="ieee")
no_conv = dict(CONV=False, CONV_K=1, CONV_BIAS=False, CONV_SILU=False, CONV_SLOTS=False, CONV_RNE=False)
conv = dict(CONV=True, CONV_K=4, CONV_BIAS=True, CONV_SILU=True, CONV_SLOTS=True, CONV_RNE=False)
conv_ptrs = dict(conv_state_ptr="*bf16", conv_w_ptr="*fp32", conv_b_ptr="*fp32", slots_ptr="*i64")
for weight, rows, acc_k, epilogue in (("bf16", 1, 256, no_conv), ("fp8e4nv", 1, 1, no_conv),
                                      ("fp8e4nv", 16, 0, no_conv), ("bf16", 1, 256, conv), ("bf16", 16, 0, conv)):
    compile_for_sm90(gemv._gemv_kernel, dict(x_ptr="*bf16", w_ptr=f"*{weight}", scale_ptr="*fp32", y_ptr="*bf16",
                     part_ptr="*fp32", count_ptr="*i32", **conv_ptrs),
                     dict(HAS_SCALE=weight != "bf16", SPLIT=3, BM=rows, BN=16, BK=256, ACC_K=acc_k, PDL=True,
                          stride_w_k=1, **flags, **epilogue))
common = dict(w_ptr="*fp8e4nv", scale_ptr="*fp32", expert_ptr="*i64", h_ptr="*bf16", x_ptr="*bf16")
for dot, bt in ((True, 16), (False, 1)):  # tokens on tl.dot, and one token on the CUDA cores
    compile_for_sm90(moe_decode._decode_fc1_kernel, common,
                     dict(ACT=0, ROUND=True, HAS_SCALE=True, BT=bt, BF=32, BK=256, PDL=True, DOT=dot, stride_w_d=1,
                          **flags))
    compile_for_sm90(moe_decode._decode_fc2_kernel, dict(common, gate_ptr="*fp32", y_ptr="*bf16", part_ptr="*fp32",
                     count_ptr="*i32"), dict(HAS_SCALE=True, SPLIT=4, BT=bt, BN=32, BK=256, PDL=True, DOT=dot,
                                             stride_w_f=1, **flags))
"""


@pytest.mark.slow
@pytest.mark.skipif(ON_GPU, reason="the gpu tests run the kernels themselves")
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# 2.8B Mamba projections: in_proj, x_proj, out_proj as (N, K).
PROJECTIONS = {"in_proj": (5888, 1472), "x_proj": (124, 2944), "out_proj": (1472, 2944)}


@pytest.mark.gpu
@pytest.mark.parametrize("proj", list(PROJECTIONS))
@pytest.mark.parametrize("rows", [1, 4, 16, 64, 256])
def test_full_size_projections(poisoned, proj, rows):
    n, k = PROJECTIONS[proj]
    x, w, w8, scale = gemv_inputs(rows, n, k, torch.bfloat16, device="cuda")
    ref = linear_reference(x.float(), w.float())
    assert_close("bf16", ref, linear_triton(x, w), torch.bfloat16, same_dtype=False)
    assert_close("fp32", ref, linear_triton(x.float(), w.float()), torch.float32)
    ref8 = linear_reference(x.float(), w8, scale)
    assert_close("fp8", ref8, linear_triton(x, w8, scale), torch.bfloat16, same_dtype=False)


@pytest.mark.gpu
def test_split_k_in_a_cuda_graph():
    """x_proj (split-K) and in_proj captured in one graph, replayed on new inputs: each replay equals eager."""
    x, w, w8, scale = gemv_inputs(1, *PROJECTIONS["x_proj"], torch.bfloat16, device="cuda")
    _, w_in, _, _ = gemv_inputs(1, *PROJECTIONS["in_proj"], torch.bfloat16, device="cuda")
    x_in = torch.randn(1, w_in.shape[1], device="cuda", dtype=torch.bfloat16)
    with use_settings(gemv_dense=True):
        run = lambda: (linear(x, w8, scale), linear(x, w), linear(x_in, w_in))  # noqa: E731
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = run()
        for seed in range(3):
            x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
            x_in.copy_(torch.randn(x_in.shape, generator=torch.Generator().manual_seed(seed + 10)))
            graph.replay()
            for name, out, eager in zip(("fp8", "bf16", "in_proj"), outs, run(), strict=True):
                assert_close(name, eager, out, "exact")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_full_size_linear_conv_equals_the_two_launches(poisoned, rows, weights):
    """The 2.8B in_proj with its conv (D = 2944, W = 4) in one launch against the GEMV and the conv step kernel
    run one after the other, on a pool of windows: the projection and the windows bit for bit; the conv output
    the same fp32 arithmetic, which the compiler may contract into multiply-adds differently in the two kernels
    (16 rows: one bf16 rounding of a value near 0 differed on the H200)."""
    n, k = PROJECTIONS["in_proj"]
    x, w, w8, scale = gemv_inputs(rows, n, k, torch.bfloat16, device="cuda")
    w, scale = (w, None) if weights == "bf16" else (w8, scale)
    slots = torch.randperm(rows + 2, device="cuda")[:rows]
    state, cw, cb = conv_inputs(rows, n // 2, 4, torch.bfloat16, slots, device="cuda")
    ref_state = state.clone()
    y = linear_triton(x, w, scale)
    ref_x = conv_update_triton(y[:, : n // 2], ref_state, cw, cb, "silu", slots)
    out_x, out_z = linear_conv_triton(x, w, state, cw, cb, scale, "silu", slots)
    assert_close("in_proj z", y[:, n // 2 :], out_z, "exact")
    assert_close("conv output", ref_x, out_x, "fp32_same_math")
    assert_close("windows", ref_state, state, "exact")
