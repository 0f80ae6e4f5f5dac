"""Small numerical helpers shared by the Triton kernels."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # triton is an optional extra: without it the kernels are never launched

    def _jit(fn):
        return fn


@_jit
def softplus(x):
    """log(1 + exp(x)) in fp32, torch's softplus (x above 20 passes through), accurate for negative x too.

    ``log(1 + e)`` loses e's low digits when 1 + e rounds, and the GPU's fast log adds an absolute error of
    about 1e-7: at x = -7 (dt = 1e-3, a common Mamba step) that is a relative error of 1e-4 in dt. Below
    e = 0.1 the series of log1p, to e^7, is used instead (relative truncation error below 2e-8).
    """
    e = tl.exp(tl.minimum(x, 20.0))
    s = tl.minimum(e, 0.1)  # the series is only kept below 0.1; capped so that it never overflows
    series = s * (1.0 + s * (-0.5 + s * (1.0 / 3.0 + s * (-0.25 + s * (0.2 + s * (-1.0 / 6.0 + s / 7.0))))))
    return tl.where(x > 20.0, x, tl.where(e < 0.1, series, tl.log(1.0 + e)))


@_jit
def top1_sigmoid(logits, e_ok, E_P2: tl.constexpr):
    """(expert, gate) of one token from its router logits (E_P2,) fp32, ``e_ok`` masking the padded
    experts: gate = the largest sigmoid, expert = its lowest index on ties (as ``torch.max`` picks)."""
    e = tl.arange(0, E_P2)
    probs = tl.where(e_ok, tl.sigmoid(logits), -1.0)
    best = tl.max(probs, 0)
    return tl.min(tl.where(probs == best, e, E_P2), 0), best
