"""Sweep the selective-scan kernel tile sizes on the GPU (median ms of the forward and of forward+backward at
8x2048, 2.8B shape) and print the fastest as the arguments of ``benchmarks/kernels.py``.

    python benchmarks/tune_scan.py [--best-out FILE]
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import scan_inputs  # noqa: E402

scan = importlib.import_module("blackmamba.kernels.selective_scan")
FWD = [(32, 1, 8), (32, 1, 4), (64, 2, 8), (16, 1, 8)]  # BLOCK_D, num_warps, T_SUB
BWD = [(8, 1), (16, 1), (16, 2), (32, 2)]  # BLOCK_D, num_warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best-out", help="write '--scan-fwd B,W,T --scan-bwd B,W' for the fastest here")
    args = parser.parse_args()
    x = scan_inputs(8, 2048)
    with torch.no_grad():
        ref = scan.selective_scan_chunked(**{k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in x.items()})
    fwd = {}
    for block, warps, t_sub in FWD:
        scan.SCAN_FWD_CONFIG, scan.SCAN_T_SUB = (block, warps), t_sub
        with torch.no_grad():
            err = ((scan.selective_scan_triton(**x).float() - ref).abs().max() / ref.abs().max()).item()
            fwd[(block, warps, t_sub)] = do_bench(lambda: scan.selective_scan_triton(**x), rep=50, return_mode="median")
        print(
            f"fwd     BLOCK_D {block:3} warps {warps} T_SUB {t_sub} | {fwd[block, warps, t_sub]:.3f} ms | err {err:.1e}"
        )
    best_fwd = min(fwd, key=fwd.get)
    scan.SCAN_FWD_CONFIG, scan.SCAN_T_SUB = best_fwd[:2], best_fwd[2]
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    dy = torch.randn_like(x["u"])
    bwd = {}
    for cfg in BWD:
        scan.SCAN_BWD_CONFIG = cfg
        bwd[cfg] = do_bench(
            lambda: torch.autograd.grad(scan.selective_scan_triton(**leaves), list(leaves.values()), dy),
            rep=50,
            return_mode="median",
        )
        print(f"fwd+bwd BLOCK_D {cfg[0]:3} warps {cfg[1]}         | {bwd[cfg]:.3f} ms", flush=True)
    best_bwd = min(bwd, key=bwd.get)
    best = f"--scan-fwd {','.join(map(str, best_fwd))} --scan-bwd {','.join(map(str, best_bwd))}"
    print("best:", best)
    if args.best_out:
        Path(args.best_out).write_text(best + "\n")


if __name__ == "__main__":
    main()
