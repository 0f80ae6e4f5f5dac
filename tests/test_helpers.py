"""The shared comparison of the tests: relative error against a table, shape and dtype checked, NaN never
passing."""

import pytest
import torch

from .helpers import TOLERANCES, assert_close, rel_err


def test_relative_error_is_measured_on_the_whole_tensor():
    ref = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = ref + 0.5e-5 * ref.norm() / noise.norm() * noise  # relative error 5e-6
    assert rel_err(out, ref) == pytest.approx(5e-6, rel=1e-9)
    assert_close("within", ref, out, torch.float32)
    with pytest.raises(AssertionError, match=r"outside: relative error 5e-06 > 1e-06 \(fp32_same_math\)"):
        assert_close("outside", ref, out, "fp32_same_math")


def test_nan_never_passes():
    ref = torch.randn(8)
    out = ref.clone()
    out[3] = float("nan")
    with pytest.raises(AssertionError, match="y: 1 NaN of 8"):
        assert_close("y", ref, out, "bf16_routing_ties_grad")  # the loosest entry
    with pytest.raises(AssertionError, match="reference has NaN"):
        assert_close("y", out, ref, "bf16_routing_ties_grad")


def test_shape_and_dtype_must_match():
    ref = torch.randn(4, 3)
    with pytest.raises(AssertionError, match=r"shape \(3,\), reference \(4, 3\)"):
        assert_close("y", ref, ref[0], torch.float32)  # would broadcast
    with pytest.raises(AssertionError, match="dtype torch.bfloat16, reference torch.float32"):
        assert_close("y", ref, ref.bfloat16(), torch.bfloat16)
    assert_close("y", ref, ref.bfloat16(), torch.bfloat16, same_dtype=False)


def test_exact_and_zero_references():
    ref = torch.randn(6)
    assert_close("copy", ref, ref.clone(), "exact")
    with pytest.raises(AssertionError, match="copy"):
        assert_close("copy", ref, torch.nextafter(ref, ref + 1), "exact")
    zeros = torch.zeros(5)
    assert_close("zeros", zeros, zeros.clone(), "exact")
    with pytest.raises(AssertionError, match="relative error inf"):
        assert_close("zeros", zeros, torch.full((5,), 1e-9), "bf16_routing_ties_grad")


def test_table_orders_its_entries():
    """Each dtype's entry is looser than the finer dtypes', and the stricter entries are stricter than fp32."""
    assert TOLERANCES["exact"] < TOLERANCES["fp32_same_math"] < TOLERANCES[torch.float32]
    assert TOLERANCES[torch.float32] < TOLERANCES[torch.float16] < TOLERANCES[torch.bfloat16]
