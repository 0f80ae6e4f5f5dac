"""Sweep the launch settings of the single-program Sinkhorn kernel (``blackmamba.kernels.sinkhorn``) on the GPU.

The kernel runs every iteration in one program, so its time grows with the iteration count: in a 2.8B
training run on real text the routing needed 26-31 iterations per MoE layer for a while, and the step slowed
by about 10% (``benchmarks/results/trainer_runs/``). This times a fixed number of iterations (``tol`` 0) for
each setting of :class:`blackmamba.kernels.sinkhorn.Tiles` (rows per tile, warps, pipeline stages of the row
loop, C computed first by a parallel kernel) at 8K, 16K and 64K tokens x 8 experts, next to the reference
loop in PyTorch (which reads its convergence test on the host every iteration), and checks each setting's d1
against the first setting's and the reference's.

Rows (``sinkhorn_iter``): microseconds per iteration, (time at N iterations - time at 1) / (N - 1); the
first setting (``Tiles()``, the kernel's settings before this sweep) is the peer of the others (speedup > 1:
faster than it). :data:`blackmamba.kernels.sinkhorn.TILES` holds the fastest.

    python -m benchmarks.tune.sinkhorn_tiles [--tokens 8192 16384 65536] [--iters 30] [--out FILE]
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from triton.testing import do_bench

from blackmamba.kernels.sinkhorn import Tiles, sinkhorn_scaling_triton
from blackmamba.routing.sinkhorn import sinkhorn_scaling

from ..harness import RESULTS_DIR, Row, argument_parser, max_err, meta_line, require_cuda, run_meta, write_results

BASE = Tiles()  # 256-row tiles, 4 warps, exp in the loop: the kernel's settings before this sweep
SETTINGS = [
    BASE,
    Tiles(256, 4, 2, False),
    Tiles(256, 4, 3, False),
    Tiles(512, 8, 2, False),
    Tiles(1024, 8, 2, False),
    Tiles(1024, 16, 2, False),
    Tiles(2048, 16, 2, False),
    Tiles(256, 4, 2, True),
    Tiles(512, 8, 2, True),
    Tiles(1024, 8, 2, True),
    Tiles(1024, 16, 2, True),
    Tiles(2048, 16, 1, True),
    Tiles(2048, 16, 2, True),
    Tiles(2048, 16, 1, False),
    Tiles(1024, 8, 1, True),
    Tiles(1024, 16, 1, True),
    Tiles(2048, 8, 1, True),
    Tiles(2048, 32, 1, True),
    Tiles(4096, 16, 1, True),
    Tiles(4096, 32, 1, True),
    Tiles(8192, 32, 1, True),
]


def name(t: Tiles) -> str:
    return f"{t.block_t}x{t.warps}w/s{t.stages}{'/cost' if t.cost_first else ''}"


def logits_for(tokens: int, experts: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (1.5 * torch.randn(tokens, experts, generator=g) + torch.linspace(-1.0, 1.0, experts)).cuda()


def per_iteration_us(run, iters: int) -> tuple[float, float]:
    """(us per iteration, us of one call at ``iters``)."""
    one = do_bench(functools.partial(run, 1), rep=100, return_mode="median")
    many = do_bench(functools.partial(run, iters), rep=100, return_mode="median")
    return (many - one) * 1e3 / (iters - 1), many * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 65536], help="router rows")
    parser.add_argument("--iters", type=int, default=30, help="iterations timed (tol 0)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "sinkhorn_tiles.json"), help="results file")
    args = parser.parse_args(argv)
    require_cuda(parser)
    if args.iters < 2:
        parser.error("--iters must be at least 2")
    rows = []
    for tokens in args.tokens:
        logits = logits_for(tokens)
        shape = f"T={tokens}/E=8"
        _, _, d1_ref, _ = sinkhorn_scaling(logits, 0.0, args.iters, "zyphra", 1e-8, "released")
        reference = functools.partial(sinkhorn_scaling, logits, 0.0, init="zyphra", eps=1e-8, criterion="released")
        ref_us, _ = per_iteration_us(lambda n, reference=reference: reference(max_iters=n), args.iters)
        default_us = None
        d1_default = None
        for tiles in SETTINGS:

            def run(n: int, tiles: Tiles = tiles, logits: torch.Tensor = logits) -> tuple[torch.Tensor, torch.Tensor]:
                return sinkhorn_scaling_triton(logits, 0.0, n, "zyphra", 1e-8, "released", tiles)

            d1, iters = run(args.iters)
            assert int(iters) == args.iters
            us, call_us = per_iteration_us(run, args.iters)
            if tiles == BASE:
                default_us, d1_default = us, d1
            err = max_err(d1, d1_ref)
            rows.append(
                Row(
                    "sinkhorn_iter",
                    f"{shape}/{name(tiles)}",
                    "us",
                    us,
                    peer=f"the settings before the sweep, {name(BASE)}",
                    peer_value=default_us,
                    max_err=err,
                    extra={
                        "tiles": tiles._asdict(),
                        "call_us_at_iters": call_us,
                        "iters": args.iters,
                        "vs_default_d1_err": max_err(d1, d1_default),
                        "torch_loop_us_per_iter": ref_us,
                    },
                )
            )
            print(
                f"{shape:<12} {name(tiles):<22} {us:8.2f} us/iter  call {call_us:8.1f} us  "
                f"err vs torch {err:.2e}  (torch loop {ref_us:.1f} us/iter)",
                flush=True,
            )
    meta = run_meta("cuda", iters=args.iters)
    write_results(Path(args.out), meta, rows)
    print(meta_line(meta))
    for tokens in args.tokens:
        mine = [r for r in rows if r.shape.startswith(f"T={tokens}/")]
        best = min(mine, key=lambda r: r.ours)
        print(f"T={tokens}: best {best.shape} {best.ours:.2f} us/iter, {name(BASE)} {mine[0].ours:.2f}")


if __name__ == "__main__":
    main()
