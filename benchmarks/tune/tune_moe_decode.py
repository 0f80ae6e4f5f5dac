"""Tile sweep for the decode-time MoE kernels (blackmamba/kernels/moe_decode.py) on the GPU.

2.8B widths (D=1472, F=3872, E=8), bf16, random weights and uniform routing. Each timing replays a CUDA
graph of LAYERS MoE layers with their own weights, so the experts are read from HBM and not from L2, as
in the real decode step. Per token count (the table entry of that count) the sweep varies fc1's tiles
with fc2's current entry, then fc2's with the best fc1. It prints microseconds per layer for the four
fastest of each, then per token count the best pair, the bandwidth it reaches on the bytes of the
experts in use, and the router's time.

    python -m benchmarks.tune.tune_moe_decode [--tokens 1 16 64]
"""

from __future__ import annotations

import itertools

import torch

from blackmamba.kernels import get_settings, use_settings
from blackmamba.kernels.moe_decode import moe_experts_decode_triton, route_top1_triton

from ..harness import argument_parser, cuda_event_us, cuda_graph, fmt, text_table
from ..kernel_inputs import D_MODEL as D
from ..kernel_inputs import F_FF as F
from ..kernel_inputs import E

LAYERS = 8
# (BF or BN, BK, num_warps, num_stages)
SPACE = {"fc1": ([16, 32, 64], [128, 256], [4, 8], [3, 4]), "fc2": ([16, 32], [256, 512, 1024], [4, 8], [2, 3, 4])}


def layer_weights(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w1 = torch.randn(E, 2 * F, D, device="cuda", generator=g, dtype=torch.bfloat16) / D**0.5
    w2 = torch.randn(E, D, F, device="cuda", generator=g, dtype=torch.bfloat16) / F**0.5
    return w1, w2


def time_layers(fn, reps: int = 20) -> float:
    """Microseconds per call of ``fn`` (which runs all layers), from a CUDA graph."""
    return cuda_event_us(cuda_graph(fn).replay, reps)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64], help="token counts to tune")
    args = parser.parse_args(argv)
    weights = [layer_weights(i) for i in range(LAYERS)]
    fc1_space = [dict(BF=bf, BK=bk, num_warps=w, num_stages=s)
                 for bf, bk, w, s in itertools.product(*SPACE['fc1'])]  # fmt: skip
    fc2_space = [dict(BN=bn, BK=bk, num_warps=w, num_stages=s)
                 for bn, bk, w, s in itertools.product(*SPACE['fc2'])]  # fmt: skip
    best_rows, all_rows = [], []
    # The tile tables under test (token count -> tiles), as the moe_fc1_tiles / moe_fc2_tiles settings.
    tables = {"fc1": dict(get_settings().moe_fc1_tiles), "fc2": dict(get_settings().moe_fc2_tiles)}

    def timed(run) -> float:
        with use_settings(moe_fc1_tiles=tables["fc1"], moe_fc2_tiles=tables["fc2"]):
            return time_layers(run) / LAYERS

    for tokens in args.tokens:
        block = max(16, 1 << (tokens - 1).bit_length())
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, D, device="cuda", generator=g, dtype=torch.bfloat16)
        expert = torch.randint(0, E, (tokens,), device="cuda", generator=g)
        gate = torch.rand(tokens, device="cuda", generator=g)
        used = expert.unique().numel()
        moved = LAYERS * used * 3 * F * D * 2  # bytes of the experts in use (W1 both halves, W2)

        def run(x=x, expert=expert, gate=gate):
            for w1, w2 in weights:
                moe_experts_decode_triton(x, expert, gate, w1, w2, "gelu")

        best = {}
        for name, space in (("fc1", fc1_space), ("fc2", fc2_space)):
            table = tables[name]
            results = []
            for cfg in space:
                table[tokens] = cfg
                try:
                    us = timed(run)
                except Exception as exc:  # a tile that does not fit (shared memory) is skipped
                    print(f"{name} {cfg}: {type(exc).__name__}", flush=True)
                    continue
                results.append((us, cfg))
            results.sort(key=lambda r: r[0])
            all_rows += [[str(tokens), name, str(c), fmt(t)] for t, c in results[:4]]  # the fastest four
            us, cfg = results[0]
            table[tokens] = cfg
            best[name] = cfg
        us = timed(run)
        router_w = torch.randn(E, D, device="cuda", dtype=torch.bfloat16)
        router_b = torch.randn(E, device="cuda", dtype=torch.bfloat16)

        def route(x=x, w=router_w, b=router_b):
            for _ in range(LAYERS):
                route_top1_triton(x, w, b)

        router_us = time_layers(route) / LAYERS
        best_rows.append([str(tokens), str(block), str(used), fmt(us), fmt(moved / LAYERS / us / 1e3),
                          fmt(router_us), str(best["fc1"]), str(best["fc2"])])  # fmt: skip
    print(text_table(["tokens", "fc", "config", "us per layer"], all_rows))
    print()
    header = ["tokens", "block", "experts used", "fc1+fc2 us", "GB/s", "router us", "best fc1", "best fc2"]
    print(text_table(header, best_rows))


if __name__ == "__main__":
    main()
