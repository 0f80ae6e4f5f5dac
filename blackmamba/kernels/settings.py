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

GROUPED_GEMMS = ("auto", "triton", "torch", "fused")


def _tiles(table: dict[int, dict]) -> Mapping[int, Mapping[str, int]]:
    return MappingProxyType({tokens: MappingProxyType(dict(cfg)) for tokens, cfg in table.items()})


@dataclass(frozen=True)
class KernelSettings:
    # MoE experts (kernels/moe.py, kernels/moe_decode.py).
    # Grouped GEMM of the "triton" backend: "triton" (kernels/moe.py), "torch" (torch._grouped_mm), "fused"
    # (kernels/moe_fused.py), or "auto", where it applies (CUDA, bf16): with autograd (training), "fused" below
    # fused_train_max_tokens and torch._grouped_mm from there; without, torch._grouped_mm from
    # grouped_mm_min_tokens, else "triton".
    grouped_gemm: str = "auto"
    # results/kernels.json (2026-11-28): _grouped_mm as fast or faster from 2K tokens in the forward; 1K itself was
    # not measured.
    grouped_mm_min_tokens: int = 1024
    # benchmarks.tune.moe_layer, 2.8B widths, forward + backward, two runs on 2026-12-02: at 2K and 4K tokens fused
    # 1.96 / 2.25 ms against _grouped_mm 2.49 / 2.44 (one run); at 8K (a 4x2048 micro-batch) fused 2.78 / 2.62
    # against 3.07 / 2.53 (the two runs disagree); at 16K _grouped_mm 4.57 / 4.49 against 4.81 / 4.90.
    fused_train_max_tokens: int = 8192
    # Tiles of the "fused" training path (kernels/moe_fused.py) for bf16 on the GPU, per kernel: fc1 (two (BM, BN)
    # accumulators, a and b), fc2, dact (fc2's dgrad with the activation's backward), dx, wgrad (BM: rows per step).
    # The best of benchmarks/tune/moe_layer.py --sweep at 16K tokens (2026-12-02): fc1 0.86 ms against 0.97 for
    # the first guess (4 stages), dact 0.97 against 1.17 (BM 128), fc2 0.39 against 0.44 and dx 0.57 against 0.72
    # (BN 128, 4 stages); wgrad's guess stayed the best.
    moe_train_tiles: Mapping[str, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: MappingProxyType({
            "fc1": MappingProxyType(dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=3)),
            "fc2": MappingProxyType(dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3)),
            "dact": MappingProxyType(dict(BM=64, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=4)),
            "dx": MappingProxyType(dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3)),
            "wgrad": MappingProxyType(dict(BM=64, BN=128, BK=128, num_warps=8, num_stages=3)),
        }),
    )  # fmt: skip
    # Inference calls of at most this many tokens take the decode kernels (0: never). results/profile_decode.json:
    # 2.8B decode step b1 1.09 ms with them vs 1.62 ms on the sorted grouped GEMMs, b16 2.37 vs 3.16 ms.
    decode_tokens: int = 64
    # The decode step routes inside the MoE block's norm kernel. results/profile_decode.json: b1 1.09 vs 1.12 ms,
    # b16 2.37 vs 2.40 ms per step without.
    fuse_router: bool = True
    # Tiles of the decode fc1 / fc2 kernels by token count: benchmarks/tune_moe_decode.py (2.8B widths, bf16),
    # T=1 fc1+fc2 19.6 us per layer, T=16 65 us, T=64 89 us (notes/measurements.md, "Decode step profiled"). An
    # entry's DOT=0 runs one token on the CUDA cores: `tune_moe_decode --tokens 1` (results/tune_moe_decode.log,
    # 2026-12-02, PDL) gave fc2 on the CUDA cores, fc1+fc2 14.0 us per layer against 17.4 with both on tl.dot.
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
            1: dict(BN=4, BK=1024, num_warps=8, num_stages=1, DOT=0),
            16: dict(BN=32, BK=256, num_warps=4, num_stages=3),
            64: dict(BN=32, BK=256, num_warps=4, num_stages=4),
        }),
    )  # fmt: skip
    # fc2 splits its reduction over F into this many programs per column tile (split-K in one launch; 1: off), by
    # token count as the tiles. Not yet measured (issue 17: at T=1 fc2 runs 46 programs, one expert's).
    moe_fc2_splits: Mapping[int, int] = field(
        hash=False, default_factory=lambda: MappingProxyType({1: 1, 16: 1, 64: 1})
    )
    # The same tables for float8 experts (layers/quant.py), by token count; empty: the 16-bit tables. A float8
    # weight tile is converted to the activations' dtype in registers before tl.dot, so its best tiles differ.
    # `tune_moe_decode --fp8 --tokens 1 16` (results/tune_moe_decode.log, 2026-12-02, PDL), fc1+fc2 us per layer
    # against the 16-bit tables: T=1 12.5 / 32.2 (both on the CUDA cores), T=16 54.6 / 63.0, T=64 118 / 148
    # (`--tokens 64`; the 2.8B fp8 step at batch 64 3,424 us against 3,991, results/profile_decode_fp8_b64.json).
    moe_fp8_fc1_tiles: Mapping[int, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            1: dict(BF=16, BK=256, num_warps=8, num_stages=1, DOT=0),
            16: dict(BF=32, BK=128, num_warps=4, num_stages=3),
            64: dict(BF=64, BK=128, num_warps=4, num_stages=3),
        }),
    )  # fmt: skip
    moe_fp8_fc2_tiles: Mapping[int, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            1: dict(BN=4, BK=1024, num_warps=4, num_stages=1, DOT=0),
            16: dict(BN=32, BK=256, num_warps=4, num_stages=3),
            64: dict(BN=32, BK=256, num_warps=8, num_stages=3),
        }),
    )  # fmt: skip

    # float8 experts (layers/quant.py) outside the decode kernels run the Triton grouped GEMMs on the float8 weights
    # in place up to this many tokens (kernels/moe.py: moe_experts_fp8); above, they are dequantized to the
    # activations' dtype for the usual path. `profile_decode --fp8 --batches 64 256 --variants`
    # (results/profile_decode_fp8_batches.json): the 2.8B fp8 step at batch 256 4.96 ms with it, 23.0 ms with 0
    # (dequantized); at batch 64 the decode kernels take the experts. The bound itself (prefill lengths) was not swept.
    fp8_grouped_max_tokens: int = 4096

    # Launches of the decode kernels (GEMV, decode MoE, conv and SSM steps, norms) of at most this many rows (tokens)
    # use programmatic dependent launch on sm_90+ (tl_math.pdl_wait): a kernel starts, and reads its weights, while
    # the one before it finishes (0: never). benchmarks.tune.gemv, 2.8B decode step with GEMV projections, us with
    # PDL against without: batch 1 796 / 960 (results/gemv.json), 2 1,230 / 1,280, 4 1,470 / 1,480, 8 1,840 / 1,870
    # (results/gemv_steps.json), 16 2,391 / 2,325 (results/gemv.json): slower at 16.
    pdl_max_rows: int = 8

    # Few-row linear layers (kernels/gemv.py: linear()).
    # The Triton GEMV runs for calls of at most this many rows (0: never). Not yet measured.
    gemv_max_rows: int = 16
    # The GEMV also takes unquantised (bf16/fp16/fp32) weights, among them the Mamba decode step's in_proj, x_proj
    # and out_proj; off, those run F.linear (cuBLAS) and only float8 weights take it. benchmarks.tune.gemv
    # (results/gemv.json, 2026-12-02, no PDL): 2.8B decode step at batch 1 960 us with it against 1,078 on cuBLAS,
    # batch 16 2,325 against 2,366 us.
    gemv_dense: bool = True
    # The decode step's conv runs in the epilogue of in_proj's GEMV (kernels/gemv.py: linear_conv): one launch less
    # per Mamba layer. `profile_decode --batches 1 16 --variants default gemv_conv=0` (results/profile_decode_conv.json
    # and _conv_fp8.json, 2.8B, us per step, on / off): bf16 batch 1 681 / 701, 16 1,984 / 1,995; fp8 batch 1
    # 636 / 661, 16 1,729 / 1,726.
    gemv_conv: bool = True
    # float8 weights take the GEMV kernel up to this many rows (it reads them in place, rows in blocks of 64; above,
    # they are dequantized for F.linear). results/profile_decode_fp8_batches.json: the 2.8B fp8 step at batch 64
    # 4.00 ms with 256 against 5.57 with 16, at batch 256 4.96 against 5.85. Bounds above 256 were not tried.
    gemv_fp8_max_rows: int = 256
    # Split-K until a launch has about this many programs per SM. Not yet measured.
    gemv_programs_per_sm: int = 2
    # Tiles by row count: BN output columns and BK reduction step per program; one row multiplies on the CUDA
    # cores (DOT=1: on tl.dot, padded to 16 rows), more rows on tl.dot (BN >= 16). Not yet measured (guesses;
    # benchmarks/tune/gemv.py --sweep times candidates).
    gemv_tiles: Mapping[int, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            1: dict(BN=8, BK=512, num_warps=4, num_stages=3),
            16: dict(BN=16, BK=256, num_warps=4, num_stages=4),
            64: dict(BN=32, BK=128, num_warps=4, num_stages=4),
        }),
    )  # fmt: skip
    # Tiles for one weight shape: (row-count entry of gemv_tiles, N, K) -> entry, used before gemv_tiles: the fastest
    # of `python -m benchmarks.tune.gemv --sweep` (PDL on; results/gemv.json, 2026-12-02) for the Mamba projections
    # of both released models, in us against the gemv_tiles entry: 2.8B one row in_proj 5.46 / 6.82, x_proj 1.40 /
    # 2.52, out_proj 3.42 / 5.22; 16 rows in_proj 7.78 / 9.49, out_proj 6.14 / 8.75; 1.5B one row x_proj 1.36 / 2.46,
    # out_proj 2.91 / 4.24; 16 rows in_proj 6.15 / 8.12, out_proj 5.15 / 5.89. Where the entry itself won (1.5B
    # in_proj at one row) or within 1% (x_proj at 16 rows), nothing is listed.
    gemv_shape_tiles: Mapping[tuple[int, int, int], Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            (1, 5888, 1472): dict(BN=16, BK=512, num_warps=4, num_stages=1),
            (1, 124, 2944): dict(BN=2, BK=4096, num_warps=8, num_stages=1),
            (1, 1472, 2944): dict(BN=2, BK=2048, num_warps=4, num_stages=1),
            (1, 104, 2304): dict(BN=2, BK=4096, num_warps=8, num_stages=1),
            (1, 1152, 2304): dict(BN=4, BK=2048, num_warps=4, num_stages=1),
            (16, 5888, 1472): dict(BN=16, BK=128, num_warps=4, num_stages=4),
            (16, 1472, 2944): dict(BN=32, BK=128, num_warps=4, num_stages=3),
            (16, 4608, 1152): dict(BN=16, BK=128, num_warps=4, num_stages=4),
            (16, 1152, 2304): dict(BN=32, BK=128, num_warps=4, num_stages=3),
        }),
    )  # fmt: skip
    # gemv_shape_tiles for float8 weights (same keys), used before the 16-bit tables. Without an entry a float8
    # weight takes the 16-bit one, with BK doubled on tl.dot (the same bytes per tile); on the CUDA cores BK stays,
    # since the (BN, BK) fp32 accumulator, not the tile's bytes, sets the registers (sm_90 compile: the 2.8B in_proj
    # entry with BK doubled spills about 1,800 words to local memory). An entry's ACC_K=1 sums each step's
    # products at once (kernels/gemv.py). `python -m benchmarks.tune.gemv --only sweep --sweep-dtype fp8`
    # (results/gemv_fp8_sweep.json, 2026-12-02, PDL on), us against the rule of that run (BK doubled everywhere):
    # 2.8B one row x_proj 1.58 / 1.68, out_proj 3.73 / 4.65; 16 rows in_proj 7.16 / 8.99, x_proj 3.58 / 4.10,
    # out_proj 5.52 / 6.02; 1.5B one row x_proj 1.56 / 1.65, out_proj 3.11 / 5.21; 16 rows in_proj 6.06 / 7.81,
    # x_proj 3.43 / 4.01, out_proj 4.67 / 5.11. Both in_proj at one row: the 16-bit entry won (4.68 us for 2.8B).
    gemv_fp8_shape_tiles: Mapping[tuple[int, int, int], Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            (1, 124, 2944): dict(BN=2, BK=4096, num_warps=4, num_stages=1, ACC_K=1),
            (1, 1472, 2944): dict(BN=4, BK=2048, num_warps=8, num_stages=1),
            (1, 104, 2304): dict(BN=2, BK=4096, num_warps=4, num_stages=1, ACC_K=1),
            (1, 1152, 2304): dict(BN=4, BK=1024, num_warps=4, num_stages=1),
            (16, 5888, 1472): dict(BN=32, BK=128, num_warps=4, num_stages=3),
            (16, 124, 2944): dict(BN=16, BK=256, num_warps=4, num_stages=2),
            (16, 1472, 2944): dict(BN=32, BK=128, num_warps=4, num_stages=3),
            (16, 4608, 1152): dict(BN=64, BK=128, num_warps=4, num_stages=3),
            (16, 104, 2304): dict(BN=16, BK=128, num_warps=4, num_stages=4),
            (16, 1152, 2304): dict(BN=32, BK=128, num_warps=4, num_stages=3),
        }),
    )  # fmt: skip

    # Head + cross-entropy of training (kernels/linear_cross_entropy.py). Tokens per chunk: a chunk's fp32 logits
    # are 412 MB at 2048 tokens and V 50304 (the whole 4x2048 batch's took 1.6 GB). Not yet measured.
    loss_chunk: int = 2048
    # The chunks' elementwise work (logsumexp, softmax - onehot, the cast) under torch.compile. Not yet measured.
    loss_compiled: bool = False

    # Selective scan, Triton (kernels/scan_triton.py); sweeps in benchmarks/results/tune_scan.log.
    # Positions between the states the forward keeps for the backward (a multiple of 4). Set with the backward's
    # 4-position register windows; not swept (fwd+bwd 8x2048 7.2-7.6 ms with it).
    scan_chunk: int = 64
    # (BLOCK_D, num_warps) of the forward (kernels/scan_triton.py, one channel per lane at 32 / 1).
    # results/scan_fwd_variants.json (H200, 2026-12-03, 2.8B widths, bf16): 8x2048 0.694 ms against 0.891 for the
    # kernel it replaced (8 channels per warp, 4 threads per channel), 0.93 at BLOCK_D 16, 0.92 at 64 / 2 warps
    # (2 segments).
    scan_fwd_config: tuple[int, int] = (32, 1)
    # (BLOCK_D, num_warps) of the backward (kernels/scan_bwd_triton.py: parallel over sequence segments, one
    # recompute per chunk; 1 channel and 4 states per thread at N 16, BLOCK_D 8). results/kernels_scan_variants.json:
    # fwd+bwd 8x2048 5.38 ms segmented BLOCK_D 8 vs 6.24 BLOCK_D 16 vs 8.02 the sequential backward (since deleted).
    scan_bwd_seg_config: tuple[int, int] = (8, 1)
    # Sequence segments, "auto" or a number (the forward's and the backward's). Forward at BLOCK_D 32 (ms): 8x2048
    # 1 0.69, 2 0.89; 4x2048 1 0.55, 2 0.67, 4 0.50; 1x2048 4 0.33, 8 0.47; 2x16384 4 2.70,
    # 8 1.82, 16 1.86.
    scan_segments: int | str = "auto"
    # "auto" for the forward: below this many programs the sequence splits until twice as many run; picks the
    # best count measured at 8x2048 (1), 4x2048 (4), 1x2048 (4, the most its length allows) and 2x16384 (8).
    scan_fwd_min_programs: int = 700
    # "auto" for the backward (kernels/scan_bwd_triton.py): splits until about this many programs run.
    scan_min_programs: int = 3000

    # Decode step of the SSM (kernels/scan_triton.py: ssm_update_triton). Tiles by row count (the entry of the
    # smallest count >= the step's rows, else the largest): BLOCK_D channels and ROWS rows per program, num_warps.
    # Empty: one row per program, tl_math.decode_launch_config's block. The fastest of `python -m
    # benchmarks.tune.ssm_update` (2.8B widths, 18 layers per CUDA graph; results/ssm_update.json, 2026-12-02), us
    # per layer: batch 1 1.96, 16 8.29, 64 14.0, 256 36.0 (floor 23.6). The one-row 128-channel block before took 23.5
    # us at 16 and 233 at 256 in the profiled step (results/profile_decode_before_ssm.json). The 2.8B decode step:
    # batch 16 2,320 -> 1,990 us, 256 8,310 -> 3,520 us (that file, then results/profile_decode.json).
    ssm_update_tiles: Mapping[int, Mapping[str, int]] = field(
        hash=False,
        default_factory=lambda: _tiles({
            1: dict(BLOCK_D=16, ROWS=4, num_warps=1),
            16: dict(BLOCK_D=16, ROWS=1, num_warps=1),
            64: dict(BLOCK_D=32, ROWS=1, num_warps=1),
            256: dict(BLOCK_D=32, ROWS=1, num_warps=1),
        }),
    )  # fmt: skip
    # Steps of at most this many rows fold the dt_proj GEMV into the SSM kernel; larger ones run it as one GEMM
    # (cuBLAS) first. Same sweep: folded in is fastest at batch 1 only.
    ssm_fused_dt_max_rows: int = 1

    # Selective scan, PyTorch chunked path (kernels/scan_chunked.py), CPU.
    # Elements per channel block of the in-place inference path: 1x2048 at d_inner 2304 ~0.43 s; blocking beyond
    # 2^17 elements per buffer changes little (notes/measurements.md, "CPU").
    inplace_block_elems: int = 2**20
    # CPU tensors under the "torch" backend take the compiled scan (kernels/scan_cpu.py; the chunked path when no
    # compiler is found). results/cpu.json (--scan both, 2 cores): 1.5B forward 8.09 s vs 11.0 s on the chunked
    # scan; benchmarks/train_cpu.py small 8x256: 2.7K vs 1.6K tokens/s.
    compiled_cpu_scan: bool = True

    def __post_init__(self) -> None:
        if self.grouped_gemm not in GROUPED_GEMMS:
            raise ValueError(f"grouped_gemm must be one of {GROUPED_GEMMS}; got {self.grouped_gemm!r}")
        for name in (
            "grouped_mm_min_tokens",
            "fused_train_max_tokens",
            "decode_tokens",
            "scan_min_programs",
            "scan_fwd_min_programs",
            "gemv_max_rows",
            "gemv_fp8_max_rows",
            "fp8_grouped_max_tokens",
            "pdl_max_rows",
            "ssm_fused_dt_max_rows",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.scan_chunk < 4 or self.scan_chunk % 4:
            raise ValueError(f"scan_chunk must be a positive multiple of 4; got {self.scan_chunk}")
        if self.scan_segments != "auto" and not (isinstance(self.scan_segments, int) and self.scan_segments >= 1):
            raise ValueError(f"scan_segments must be 'auto' or an int >= 1; got {self.scan_segments!r}")
        for name in ("scan_fwd_config", "scan_bwd_seg_config"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"{name} must be (BLOCK_D, num_warps) of positive ints; got {value!r}")
        if self.inplace_block_elems < 1:
            raise ValueError(f"inplace_block_elems must be >= 1; got {self.inplace_block_elems}")
        # Tables given as plain dicts are frozen too.
        object.__setattr__(self, "moe_fc1_tiles", _tiles(self.moe_fc1_tiles))
        object.__setattr__(self, "moe_fc2_tiles", _tiles(self.moe_fc2_tiles))
        object.__setattr__(self, "gemv_tiles", _tiles(self.gemv_tiles))
        object.__setattr__(self, "ssm_update_tiles", _tiles(self.ssm_update_tiles))
        for rows, cfg in self.ssm_update_tiles.items():
            if set(cfg) != {"BLOCK_D", "ROWS", "num_warps"} or min(cfg.values()) < 1 or rows < 1:
                raise ValueError(
                    f"ssm_update_tiles entries must map a row count >= 1 to positive BLOCK_D, ROWS, num_warps; "
                    f"got {rows}: {dict(cfg)}"
                )
        for name in ("gemv_shape_tiles", "gemv_fp8_shape_tiles", "moe_fp8_fc1_tiles", "moe_fp8_fc2_tiles"):
            object.__setattr__(self, name, _tiles(getattr(self, name)))
        object.__setattr__(self, "moe_fc2_splits", MappingProxyType(dict(self.moe_fc2_splits)))
        if self.gemv_programs_per_sm < 1 or min(self.moe_fc2_splits.values(), default=1) < 1:
            raise ValueError(
                f"gemv_programs_per_sm and moe_fc2_splits must be >= 1; got {self.gemv_programs_per_sm}, "
                f"{dict(self.moe_fc2_splits)}"
            )
        if set(self.moe_train_tiles) != {"fc1", "fc2", "dact", "dx", "wgrad"}:
            raise ValueError(f"moe_train_tiles must name fc1, fc2, dact, dx, wgrad; got {sorted(self.moe_train_tiles)}")
        train_tiles = {name: MappingProxyType(dict(cfg)) for name, cfg in self.moe_train_tiles.items()}
        object.__setattr__(self, "moe_train_tiles", MappingProxyType(train_tiles))


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
