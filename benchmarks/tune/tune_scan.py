"""Sweep the tile sizes of the selective-scan kernels (median ms of the forward and of forward+backward at
8x2048, 2.8B shape) and of the causal conv forward, on the GPU; print the fastest scan tiles as the
arguments of ``python -m benchmarks.kernels``.

    python -m benchmarks.tune.tune_scan [--fwd 32,1 16,1 ...] [--bwd 16,1 8,1 ...] [--conv 64,128,8 ...]
                                        [--best-out FILE]
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

import torch
from triton.testing import do_bench

from blackmamba.kernels import selective_scan_chunked, use_settings

from ..harness import argument_parser, require_cuda
from ..kernel_inputs import D_IN, scan_inputs

scan = importlib.import_module("blackmamba.kernels.scan_triton")  # the launchers and their segment rule
conv = importlib.import_module("blackmamba.kernels.causal_conv1d")
FWD = [(32, 1), (16, 1), (64, 2)]  # BLOCK_D, num_warps
BWD = [(8, 1), (16, 1), (16, 2), (32, 2)]  # BLOCK_D, num_warps of the backward (kernels/scan_bwd_triton.py)


def conv_sweep(variants: list[tuple[int, int, int]]) -> None:
    x = torch.randn(8, 2048, 2 * D_IN, device="cuda", dtype=torch.bfloat16)[..., :D_IN]
    w = torch.randn(D_IN, 4, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(D_IN, device="cuda", dtype=torch.bfloat16)
    for block_l, block_d, warps in variants:
        run = functools.partial(
            conv.causal_conv1d_fwd_triton, x, w, b, "silu", block_l=block_l, block_d=block_d, num_warps=warps
        )
        t = do_bench(run, rep=50, return_mode="median")
        print(f"conv fwd 8x2048 BLOCK_L {block_l:3} BLOCK_D {block_d:3} warps {warps} | {t:.4f} ms", flush=True)


def segment_sweep(values: list[str]) -> None:
    for batch, length in [(1, 2048), (8, 2048), (2, 16384)] if values else []:
        x = scan_inputs(batch, length)
        with torch.no_grad():
            with use_settings(scan_segments=1):
                ref = scan.selective_scan_triton(**x).float()  # unsplit: the segments must not change the result
            for value in values:
                with use_settings(scan_segments=value if value == "auto" else int(value)) as settings:
                    err = ((scan.selective_scan_triton(**x).float() - ref).abs().max() / ref.abs().max()).item()
                    t = do_bench(functools.partial(scan.selective_scan_triton, **x), rep=50, return_mode="median")
                    used = scan._segments(batch, length, x["u"].shape[-1], settings.scan_fwd_config[0])
                print(f"fwd {batch}x{length} segments {value:>4} ({used}) | {t:.3f} ms | vs unsplit {err:.1e}")


def fwd_settings(variant: tuple[int, int]) -> dict:
    """The kernel settings of a forward variant (BLOCK_D, num_warps)."""
    return dict(scan_fwd_config=variant)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--best-out", help="write '--scan-fwd B,W --scan-bwd B,W' for the fastest here")
    parser.add_argument("--fwd", nargs="*", help="forward variants BLOCK_D,WARPS")
    parser.add_argument("--bwd", nargs="*", help="backward variants BLOCK_D,WARPS")
    parser.add_argument("--conv", nargs="*", default=[], help="conv forward variants BLOCK_L,BLOCK_D,WARPS")
    parser.add_argument("--segments", nargs="*", default=[], help="forward sequence segments to time (or auto)")
    args = parser.parse_args(argv)
    require_cuda(parser)
    fwd_variants = [tuple(int(v) for v in a.split(",")) for a in args.fwd] if args.fwd else FWD
    bwd_variants = [tuple(int(v) for v in a.split(",")) for a in args.bwd] if args.bwd else BWD
    for variant, width in [(v, 2) for v in fwd_variants] + [(v, 2) for v in bwd_variants]:
        if len(variant) != width:
            parser.error(f"a variant needs {width} numbers; got {','.join(map(str, variant))}")
    x = scan_inputs(8, 2048)
    with torch.no_grad():
        ref = selective_scan_chunked(**{k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in x.items()})
    fwd = {}
    for variant in fwd_variants:
        block, warps = variant
        with torch.no_grad(), use_settings(**fwd_settings(variant)):
            err = ((scan.selective_scan_triton(**x).float() - ref).abs().max() / ref.abs().max()).item()
            fwd[variant] = do_bench(lambda: scan.selective_scan_triton(**x), rep=50, return_mode="median")
        name = f"BLOCK_D {block:3} warps {warps}"
        print(f"fwd     {name} | {fwd[variant]:.3f} ms | err {err:.1e}", flush=True)
    best_fwd = min(fwd, key=fwd.get)
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    dy = torch.randn_like(x["u"])
    bwd = {}
    for cfg in bwd_variants:
        with use_settings(**fwd_settings(best_fwd), scan_bwd_seg_config=cfg):
            bwd[cfg] = do_bench(
                lambda: torch.autograd.grad(scan.selective_scan_triton(**leaves), list(leaves.values()), dy),
                rep=50,
                return_mode="median",
            )
        print(f"fwd+bwd BLOCK_D {cfg[0]:3} warps {cfg[1]}         | {bwd[cfg]:.3f} ms", flush=True)
    best_bwd = min(bwd, key=bwd.get)
    conv_sweep([tuple(int(v) for v in a.split(",")) for a in args.conv])
    with use_settings(**fwd_settings(best_fwd)):  # the segments with the fastest forward tiles
        segment_sweep(args.segments)
    best = f"--scan-fwd {','.join(map(str, best_fwd))} --scan-bwd {','.join(map(str, best_bwd))}"
    print("best:", best)
    if args.best_out:
        Path(args.best_out).write_text(best + "\n")


if __name__ == "__main__":
    main()
