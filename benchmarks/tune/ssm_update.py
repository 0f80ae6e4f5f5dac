"""Launch layouts of the SSM decode step (kernels/scan_triton.py: ssm_update_triton) on the GPU.

BlackMamba widths (2.8B: D_in 2944, rank 92; 1.5B: D_in 2304, rank 72; N 16), bf16 activations as views into
one in_proj and one x_proj output (as in the model's step), fp32 states, A from A_log. Each timing replays a
CUDA graph of LAYERS steps on their own states and weights, as the decode step runs them, so the states come
from HBM: microseconds per layer. Per batch it times the current settings ("current"), then every layout of
``--block-d`` x ``--rows`` x ``--warps`` with dt_proj folded into the kernel ("fused") and run as one GEMM
before it ("gemm"), and prints the fastest. The floor is one read and one write of the fp32 state plus the
inputs, over the measured copy bandwidth. max err is max |ours - ref| / max |ref| of y and of the new state
against the PyTorch reference (selective_state_update, dt in fp32) on the first layer's inputs. The best
layout per batch is what the ``ssm_update_tiles`` and ``ssm_fused_dt_max_rows`` settings hold.

    python -m benchmarks.tune.ssm_update [--preset 2.8b] [--batches 1 16 64 256]
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from blackmamba.kernels import get_settings, selective_state_update, ssm_update_triton, use_settings

from ..harness import (
    RESULTS_DIR,
    Row,
    argument_parser,
    cuda_event_us,
    cuda_graph,
    fmt,
    gpu_ceilings,
    markdown_table,
    max_err,
    meta_line,
    require_cuda,
    run_meta,
    text_table,
    write_results,
)

LAYERS = 18
SHAPES = {"2.8b": (2944, 92), "1.5b": (2304, 72)}
N = 16


def layer_inputs(batch: int, dim: int, rank: int, seed: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, device="cuda", generator=g)

    xz = rand(batch, 2 * dim).bfloat16()
    xdbl = rand(batch, rank + 2 * N).bfloat16()
    return dict(
        state=rand(batch, dim, N),
        x=xz[:, :dim],
        z=xz[:, dim:],
        dt_low=xdbl[:, :rank],
        B=xdbl[:, rank : rank + N],
        C=xdbl[:, rank + N :],
        A_log=torch.log(torch.arange(1, N + 1, device="cuda", dtype=torch.float32)).repeat(dim, 1),
        D=rand(dim),
        dt_weight=rand(dim, rank, scale=rank**-0.5).bfloat16(),
        dt_bias=rand(dim) - 4,
    )


def step(t: dict) -> torch.Tensor:
    return ssm_update_triton(
        t["state"], t["x"], t["dt_low"], t["A_log"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
        dt_weight=t["dt_weight"], a_from_log=True,
    )  # fmt: skip


def errors(t: dict, changes: dict) -> float:
    """The worse of y's and the state's max err against the reference, on a copy of the first layer's state."""
    ours, ref = dict(t, state=t["state"].clone()), t["state"].clone()
    with use_settings(**changes):
        y = step(ours)
    dt = F.linear(t["dt_low"].float(), t["dt_weight"].float())
    A = -torch.exp(t["A_log"])
    y_ref = selective_state_update(ref, t["x"], dt, A, t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True)
    return max(max_err(y, y_ref), max_err(ours["state"], ref))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--preset", default="2.8b", choices=sorted(SHAPES), help="model widths")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256], help="rows per step")
    parser.add_argument("--block-d", type=int, nargs="+", default=[16, 32, 64, 128], help="BLOCK_D candidates")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="ROWS candidates")
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4], help="num_warps candidates")
    parser.add_argument("--out", default=str(RESULTS_DIR / "ssm_update.json"), help="results file (and .md)")
    args = parser.parse_args(argv)
    require_cuda(parser)
    if min(args.batches + args.block_d + args.rows + args.warps) < 1:
        parser.error("--batches, --block-d, --rows and --warps must be >= 1")
    dim, rank = SHAPES[args.preset]
    bandwidth, _ = gpu_ceilings()
    meta = run_meta("cuda", shape=f"{args.preset}: D_in {dim}, rank {rank}, N {N}")
    rows, sweep, layouts_of = [], [], {}
    for batch in args.batches:
        layers = [layer_inputs(batch, dim, rank, seed) for seed in range(LAYERS)]

        def timed(changes: dict, layers: list[dict] = layers) -> float:
            with use_settings(**changes):
                graph = cuda_graph(lambda: [step(t) for t in layers])
            return cuda_event_us(graph.replay, 50, warmup=3) / LAYERS

        layouts = {"current": {}}
        for block, per, warps, dt in itertools.product(args.block_d, args.rows, args.warps, ("fused", "gemm")):
            if dt == "fused" and per > 1 and block * 128 > 256 * 32 * warps:
                continue  # W_dt's (BLOCK_D, 128) block would take over 256 registers a thread
            tiles = {1 << 30: dict(BLOCK_D=block, ROWS=per, num_warps=warps)}
            fused_max = get_settings().ssm_fused_dt_max_rows if dt == "fused" else 0
            layouts[f"D{block}/R{per}/w{warps}/{dt}"] = dict(ssm_update_tiles=tiles, ssm_fused_dt_max_rows=fused_max)
        layouts_of.update(layouts)
        times = {}
        for name, changes in layouts.items():
            try:
                times[name] = timed(changes)
            except Exception as exc:  # a layout that does not compile (registers, shared memory) is skipped
                print(f"batch {batch} {name}: {type(exc).__name__}", flush=True)
        ranked = sorted(times, key=times.get)
        best = ranked[0]
        state_bytes = 2 * batch * dim * N * 4
        io_bytes = batch * (3 * dim + rank + 2 * N) * 2  # x, z, y and the x_proj slice, bf16
        floor_us = 1e6 * (state_bytes + io_bytes) / bandwidth
        err = errors(layers[0], layouts[best])
        rows.append(
            Row("ssm_update", f"{args.preset}/b{batch}", "us", times[best], peer="current settings",
                peer_value=times["current"], floor=floor_us, max_err=err,
                extra=dict(layout=best, current_err=errors(layers[0], {})))
        )  # fmt: skip
        sweep += [dict(batch=batch, layout=name, us=times[name]) for name in ranked]
        shown = dict.fromkeys(ranked[:6] + ["current"])
        print(text_table(["batch", "layout", "us per layer"], [[str(batch), name, fmt(times[name])] for name in shown]))
    best = best_settings(rows, layouts_of)
    print(f"\nsettings of the fastest layouts: {json.dumps(best)}")
    header = ["shape", "best layout", "us", "current us", "floor us", "of floor", "max err"]
    body = [[r.shape, r.extra["layout"], fmt(r.ours), fmt(r.peer_value), fmt(r.floor), fmt(r.fraction_of_floor),
             fmt(r.max_err)] for r in rows]  # fmt: skip
    print()
    print(text_table(header, body))
    markdown = f"{meta_line(meta)}\n\n{markdown_table(header, body)}\n"
    write_results(Path(args.out), meta, rows, markdown, sweep=sweep, best_settings=best)


def best_settings(rows: list[Row], layouts_of: dict[str, dict]) -> dict:
    """The settings that give each batch its fastest layout: ``ssm_update_tiles`` keyed by the batch, and
    ``ssm_fused_dt_max_rows``, the largest batch whose fastest layout folds dt_proj in (0: none does)."""
    tiles, fused_max = {}, 0
    for r in rows:
        if r.extra["layout"] == "current":
            continue
        batch = int(r.shape.rsplit("/b", 1)[1])
        tiles[batch] = dict(layouts_of[r.extra["layout"]]["ssm_update_tiles"][1 << 30])
        if r.extra["layout"].endswith("/fused"):
            fused_max = max(fused_max, batch)
    return {"ssm_update_tiles": tiles, "ssm_fused_dt_max_rows": fused_max}


if __name__ == "__main__":
    main()
