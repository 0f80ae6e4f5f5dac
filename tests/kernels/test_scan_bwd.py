"""The Triton scan's backward (kernels/scan_bwd_triton.py: split over sequence segments) against the reference's
autograd: y, the final state and the gradients of u, delta, A, B, C, D, z, delta_bias and the initial state.

tests/kernels/test_scan.py runs the defaults (fp32 and bf16, awkward shapes, 2 and 3 segments); these cover the
backward's own cases. In the interpreter the chunk is 8 positions (4 without the optional inputs), so the sequence
splits into several chunks with a ragged last one; d_inner is never a multiple of the channel block.
"""

import pytest
import torch

from blackmamba.kernels import selective_scan_ref, selective_scan_triton, use_settings

from ..helpers import assert_close
from .test_scan import run_with_grads, scan_inputs

pytest.importorskip("triton")


def check(inputs, dtype, softplus=True):
    y, h, grads = run_with_grads(lambda **kw: selective_scan_triton(**kw, delta_softplus=softplus), inputs)
    y_ref, h_ref, grads_ref = run_with_grads(lambda **kw: selective_scan_ref(**kw, delta_softplus=softplus), inputs)
    assert_close("y", y_ref, y, dtype)
    assert_close("final state", h_ref, h, dtype)
    assert grads.keys() == grads_ref.keys()
    for name, ref in grads_ref.items():
        assert_close(f"d{name}", ref, grads[name], torch.float32 if dtype == torch.float32 else "bf16_grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_one_segment(poisoned, dtype):
    """One segment: no carry pass, the whole sequence (3 chunks of 8, the last ragged) in one program."""
    with use_settings(scan_chunk=8, scan_segments=1):
        check(scan_inputs(1, 21, 9, 5, dtype, seed=3, with_state=False), dtype)


def test_backward_wide_tile(poisoned):
    """BLOCK_D 16 at N 16 (a tile the tuning sweep times): 8 states per thread, B_t and C_t loaded in the step,
    not a step ahead; three segments, the carry folded over two later ones."""
    with use_settings(scan_chunk=8, scan_bwd_seg_config=(16, 1), scan_segments=3):
        check(scan_inputs(1, 21, 20, 16, torch.float32, seed=7), torch.float32)


def test_backward_without_optional_inputs(poisoned):
    inputs = scan_inputs(2, 11, 6, 4, torch.float32, seed=4, with_state=False)
    inputs.update(D=None, z=None, delta_bias=None)
    inputs["delta"] = inputs["delta"].abs() + 0.05  # positive dt without softplus
    with use_settings(scan_chunk=4, scan_segments=2):
        check(inputs, torch.float32, softplus=False)


@pytest.mark.gpu
@pytest.mark.parametrize("changes", [{}, dict(scan_segments=3), dict(scan_bwd_seg_config=(16, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_full_shape(poisoned, changes, dtype):
    with use_settings(**changes):
        check(scan_inputs(2, 1000, 2944, 16, dtype, device=torch.device("cuda")), dtype)
