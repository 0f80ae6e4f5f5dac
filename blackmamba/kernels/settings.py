"""Kernel tuning: one frozen, typed settings object that the dispatchers and launchers read at call time.

The switches change which implementation or tile shape runs, never what is computed (up to rounding).
Read them with :func:`get_settings`; change them for a block of code with :func:`use_settings`, which
mirrors :func:`.backend.use_backend`::

    with use_settings(decode_tokens=0, fuse_router=False):
        model.step(tokens, cache)

Each field's comment names the measurement that set its default (H200 runs unless said otherwise; the
numbers are in benchmarks/results/ and notes/measurements.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType

GROUPED_GEMMS = ("auto", "triton", "torch")


def _tiles(table: dict[int, dict]) -> Mapping[int, Mapping[str, int]]:
    return MappingProxyType({tokens: MappingProxyType(dict(cfg)) for tokens, cfg in table.items()})


@dataclass(frozen=True)
class KernelSettings:
    # MoE experts (kernels/moe.py, kernels/moe_decode.py).
    # Grouped GEMM of the "triton" backend; "auto": torch._grouped_mm from grouped_mm_min_tokens where it applies
    # (CUDA, bf16). results/kernels.json: _grouped_mm as fast or faster from 2K tokens (16K fwd+bwd 4.6 vs 6.5 ms).
    grouped_gemm: str = "auto"
    # Same run: 2K tokens is the smallest measured size where _grouped_mm was as fast; 1K itself was not measured.
    grouped_mm_min_tokens: int = 1024
    # Inference calls of at most this many tokens take the decode kernels (0: never). results/profile_decode.json:
    # 2.8B decode step b1 1.09 ms with them vs 1.62 ms on the sorted grouped GEMMs, b16 2.37 vs 3.16 ms.
    decode_tokens: int = 64
    # The decode step routes inside the MoE block's norm kernel. results/profile_decode.json: b1 1.09 vs 1.12 ms,
    # b16 2.37 vs 2.40 ms per step without.
    fuse_router: bool = True
    # Tiles of the decode fc1 / fc2 kernels by token count: benchmarks/tune_moe_decode.py (2.8B widths, bf16),
    # T=1 fc1+fc2 19.6 us per layer, T=16 65 us, T=64 89 us (notes/measurements.md, "Decode step profiled").
    moe_fc1_tiles: Mapping[int, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            1: dict(BF=32, BK=256, num_warps=4, num_stages=3),
            16: dict(BF=64, BK=128, num_warps=4, num_stages=4),
            64: dict(BF=64, BK=128, num_warps=4, num_stages=4),
        }),
    )  # fmt: skip
    moe_fc2_tiles: Mapping[int, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            1: dict(BN=32, BK=512, num_warps=4, num_stages=4),
            16: dict(BN=32, BK=256, num_warps=4, num_stages=3),
            64: dict(BN=32, BK=256, num_warps=4, num_stages=4),
        }),
    )  # fmt: skip

    # Selective scan, Triton (kernels/scan_triton.py); sweeps in benchmarks/results/tune_scan.log.
    # Positions between the states the forward keeps for the backward (a multiple of 4 and of scan_t_sub). Set with
    # the backward's 4-position register windows; not swept (fwd+bwd 8x2048 7.2-7.6 ms with it).
    scan_chunk: int = 64
    # (BLOCK_D, num_warps) of the forward: 8x2048 BLOCK_D 8 / 1 warp 0.82 ms, 16 / 1 1.22 ms, 8 / 2 warps 3.9 ms.
    scan_fwd_config: tuple[int, int] = (8, 1)
    # (BLOCK_D, num_warps) of the backward: 8x2048 fwd+bwd 16 channels 7.35 ms, 8 7.81 ms, 4 10.4 ms.
    scan_bwd_config: tuple[int, int] = (16, 1)
    # Positions per forward loop step: 8x2048 T_SUB 4 0.82 ms, 8 1.01 ms, 16 1.59 ms.
    scan_t_sub: int = 4
    # Sequence segments of the forward, "auto" or a number. 1x2048: 1 0.72, 2 0.58, 4 0.34, 8 0.46 ms;
    # 8x2048: 1 0.87, 2 1.37, 4 1.26 ms; 2x16384: 1 5.7, 4 2.9, 16 2.6 ms.
    scan_segments: int | str = "auto"
    # "auto" splits until about this many programs run: picks the best count at 1x2048 (4) and 8x2048 (1).
    scan_min_programs: int = 3000

    # Selective scan, PyTorch chunked path (kernels/scan_chunked.py), CPU.
    # Elements per channel block of the in-place inference path: 1x2048 at d_inner 2304 ~0.43 s; blocking beyond
    # 2^17 elements per buffer changes little (notes/measurements.md, "CPU").
    inplace_block_elems: int = 2**20

    def __post_init__(self) -> None:
        if self.grouped_gemm not in GROUPED_GEMMS:
            raise ValueError(f"grouped_gemm must be one of {GROUPED_GEMMS}; got {self.grouped_gemm!r}")
        for name in ("grouped_mm_min_tokens", "decode_tokens", "scan_min_programs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.scan_t_sub < 1 or self.scan_chunk < 4 or self.scan_chunk % 4 or self.scan_chunk % self.scan_t_sub:
            raise ValueError(
                f"scan_chunk must be a multiple of 4 and of scan_t_sub; got {self.scan_chunk}, {self.scan_t_sub}"
            )
        if self.scan_segments != "auto" and not (isinstance(self.scan_segments, int) and self.scan_segments >= 1):
            raise ValueError(f"scan_segments must be 'auto' or an int >= 1; got {self.scan_segments!r}")
        for name in ("scan_fwd_config", "scan_bwd_config"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"{name} must be (BLOCK_D, num_warps) of positive ints; got {value!r}")
        if self.inplace_block_elems < 1:
            raise ValueError(f"inplace_block_elems must be >= 1; got {self.inplace_block_elems}")
        # Tables given as plain dicts are frozen too.
        object.__setattr__(self, "moe_fc1_tiles", _tiles(self.moe_fc1_tiles))
        object.__setattr__(self, "moe_fc2_tiles", _tiles(self.moe_fc2_tiles))


FIELDS = tuple(f.name for f in dataclasses.fields(KernelSettings))
_current = KernelSettings()


def get_settings() -> KernelSettings:
    """The settings in force."""
    return _current


@contextmanager
def use_settings(**changes) -> Iterator[KernelSettings]:
    """Run the enclosed code with the named fields changed, then restore the previous settings."""
    global _current
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown kernel setting(s) {unknown}; known: {list(FIELDS)}")
    previous, _current = _current, dataclasses.replace(_current, **changes)
    try:
        yield _current
    finally:
        _current = previous
