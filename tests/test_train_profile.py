"""benchmarks.train_profile's bookkeeping on fake kernel lists: parts by kernel name, busy and idle time."""

from types import SimpleNamespace

import pytest
import torch

from benchmarks.train_profile import PARTS, SCOPES, Kernel, breakdown, categorize, kernels_of, scopes_of, timeline

# Names as the H200 profiles show them (shortened where the template arguments run on).
NAMED = {
    "_scan_bwd_seg_kernel": "scan_bwd",
    "_scan_bwd_carry_kernel": "scan_bwd",
    "_scan_fwd_lane_kernel": "scan_fwd",
    "_grouped_gemm_kernel": "grouped_gemm",
    "_grouped_wgrad_kernel": "grouped_gemm",
    "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal"
    "<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >, ...> > >(...)": "grouped_gemm",
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT": "matmul",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
    "__5x_cublas": "matmul",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "FusedAdamMathFunctor<float, 4, (ADAM_MODE)1, false>>(...)": "optimizer",
    "void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
    "::{lambda()#3}::operator()() const::{lambda(float)#1}, ...>(int, ...)": "copy_cast",
    "Memcpy DtoD (Device -> Device)": "copy_cast",
    "Memset (Device)": "copy_cast",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, "
    "true>(...)": "copy_cast",
    "void at::native::index_elementwise_kernel<128, 4, at::native::gpu_index_kernel<...>>(long, ...)": "copy_cast",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
    "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(...)": "loss_head",
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>(...)": (
        "loss_head"
    ),
    "_add_rms_norm_fwd_kernel": "norm",
    "_add_rms_norm_bwd_kernel": "norm",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(...)": "norm",
    "_causal_conv1d_bwd_kernel": "conv",
    "void at::native::(anonymous namespace)::embedding_backward_feature_kernel<float, float, long>(...)": ("embedding"),
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<float, float, float, "
    "at::native::binary_internal::MulFunctor<float> >, ...>(int, ...)": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()(...)>, unsigned int, float, 4> >(...)": "elementwise",
    "triton_poi_fused_add_mul_0": "elementwise",
    "void at_cuda_detail::cub::DeviceRadixSortOnesweepKernel<...>(...)": "other",
}


@pytest.mark.parametrize(("name", "part"), list(NAMED.items()))
def test_kernels_fall_in_their_part(name, part):
    assert categorize(name) == part


def test_timeline_adds_busy_and_idle_time():
    kernels = [
        Kernel("a", 0.0, 10.0),
        Kernel("b", 5.0, 10.0),  # overlaps a: busy 0..15
        Kernel("c", 17.0, 3.0),  # 2 us gap, busy 17..20
        Kernel("d", 45.0, 5.0),  # 25 us gap (> 10), busy 45..50
        Kernel("e", 46.0, 1.0),  # inside d
    ]
    line = timeline(kernels[::-1])  # in any order
    assert line == {"span_us": 50.0, "busy_us": 23.0, "idle_us": 27.0, "gaps_over": 1, "gaps_over_us": 25.0}
    assert timeline([])["busy_us"] == 0.0


def test_breakdown_per_step_parts_launches_and_top_kernels():
    copy, scan, adam = "Memcpy DtoD (Device -> Device)", "_scan_bwd_seg_kernel", "FusedAdamMathFunctor"
    kernels = [Kernel(scan, 0.0, 300.0), Kernel(copy, 310.0, 20.0), Kernel(copy, 330.0, 40.0)]
    kernels += [Kernel(adam, 400.0, 240.0), Kernel("mystery", 700.0, 0.0)]
    report = breakdown(kernels, steps=2, top=2)
    parts = report["parts"]
    assert set(parts) == set(PARTS)
    assert parts["scan_bwd"] == {"ms": 0.15, "launches": 0.5, "share": 0.5}
    assert parts["copy_cast"]["ms"] == pytest.approx(0.03) and parts["copy_cast"]["launches"] == 1.0
    assert parts["optimizer"]["share"] == pytest.approx(0.4)
    assert parts["other"]["launches"] == 0.5 and parts["conv"]["ms"] == 0.0
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0)
    assert report["kernel_ms"] == pytest.approx(0.3) and report["launches"] == 2.5
    assert report["timeline"]["idle_ms"] == pytest.approx((10 + 30 + 60) / 1e3 / 2)
    assert [t["name"] for t in report["top_kernels"]] == [scan, adam]
    with pytest.raises(ValueError, match="steps"):
        breakdown(kernels, steps=0)


def _event(name, device, start=0.0, dur=0.0, device_total=0.0):
    span = SimpleNamespace(start=start, elapsed_us=lambda: dur)
    return SimpleNamespace(name=name, device_type=device, time_range=span, device_time_total=device_total)


def test_kernels_and_scopes_are_read_from_the_profilers_events():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [
        _event("aten::mm", cpu, device_total=99.0),
        _event(SCOPES["forward"], cpu, device_total=3000.0),
        _event(SCOPES["forward"], cpu, device_total=1000.0),
        _event(SCOPES["optimizer"], cpu, device_total=500.0),
        _event("_scan_fwd_lane_kernel", cuda, start=4.0, dur=2.5),
        _event("Memset (Device)", cuda, start=9.0, dur=1.0),
    ]
    prof = SimpleNamespace(events=lambda: events)
    assert kernels_of(prof) == [Kernel("_scan_fwd_lane_kernel", 4.0, 2.5), Kernel("Memset (Device)", 9.0, 1.0)]
    scopes = scopes_of(prof, steps=2)
    assert scopes == {"forward": 2.0, "fused_loss": 0.0, "plain_loss": 0.0, "optimizer": 0.25}


def test_named_ranges_come_off_the_kernel_sums_of_an_older_report():
    from benchmarks.train_profile import is_range, without_ranges

    assert is_range("train::forward") and is_range("Optimizer.step#AdamW.step") and is_range("linear_cross_entropy")
    assert not is_range("_scan_bwd_seg_kernel")
    report = {
        "kernel_ms": 60.0,
        "launches": 7.0,
        "parts": {
            "other": {"ms": 45.0, "launches": 2.0, "share": 0.75},
            "optimizer": {"ms": 15.0, "launches": 5.0, "share": 0.25},
        },
        "top_kernels": [
            {"name": "train::forward", "part": "other", "ms": 40.0, "launches": 1.0},
            {"name": "Optimizer.step#AdamW.step", "part": "optimizer", "ms": 7.0, "launches": 1.0},
            {"name": "adam_kernel", "part": "optimizer", "ms": 8.0, "launches": 4.0},
        ],
        "scopes_ms": {"forward": 3.0, "optimizer": 8.0, "backward_and_rest": 49.0},
        "timeline": {},
    }
    fixed = without_ranges(report)
    assert fixed["parts"]["other"] == {"ms": 5.0, "launches": 1.0, "share": 5.0 / 13.0}
    assert fixed["parts"]["optimizer"]["ms"] == 8.0 and fixed["parts"]["optimizer"]["launches"] == 4.0
    assert fixed["kernel_ms"] == 13.0 and fixed["launches"] == 5.0
    assert fixed["scopes_ms"]["backward_and_rest"] == 2.0
    assert [k["name"] for k in fixed["top_kernels"]] == ["adam_kernel"]
    assert report["parts"]["other"]["ms"] == 45.0  # the input is left as it was


def _round_trip(x):
    return x.to(torch.bfloat16).float()  # two copies in the forward


def test_launch_sources_name_the_line_and_its_backward():
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.train_profile import launch_sources

    x = torch.randn(16, 16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        _round_trip(x).sum().backward()
    rows = launch_sources(prof.events(), 1, parts=("copy_cast",), fragment="tests/test_train_profile.py")
    here = f"test_train_profile.py({_round_trip.__code__.co_firstlineno}): _round_trip"  # how the profiler names it
    forward = [r for r in rows if r["source"].endswith(here)]
    backward = [r for r in rows if r["source"].endswith(here + " (backward)")]
    assert sum(r["launches"] for r in forward) == 2, rows  # the two casts' copies
    assert {r["op"] for r in forward} == {"aten::to"}
    assert sum(r["launches"] for r in backward) >= 2, rows  # the casts' gradients are casts too
