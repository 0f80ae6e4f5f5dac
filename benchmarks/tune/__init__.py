"""Tile sweeps and profilers for the Triton kernels (GPU only); they print what they find for a person to
act on (a default in ``blackmamba.kernels``, the tiles passed to ``benchmarks.kernels``)."""
