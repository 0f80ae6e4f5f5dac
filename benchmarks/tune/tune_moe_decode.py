"""Tile sweep for the decode-time MoE kernels (blackmamba/kernels/moe_decode.py) on the GPU.

2.8B widths (D=1472, F=3872, E=8), bf16, random weights and uniform routing. Each timing replays a CUDA
graph of LAYERS MoE layers with their own weights, so the experts are read from HBM and not from L2, as
in the real decode step. Per token count (the table entry of that count) the sweep varies fc1's tiles
with fc2's current entry, then fc2's with the best fc1. It prints microseconds per layer for the four
fastest of each, then per token count the best pair, the bandwidth it reaches on the bytes of the
experts in use, and the router's time. One token also tries the CUDA-core path (DOT=0 entries).
``--fp8`` tunes the float8 experts' tables (moe_fp8_fc1_tiles, moe_fp8_fc2_tiles) on the same weights
quantized (layers/quant.py), starting from the current choice.

    python -m benchmarks.tune.tune_moe_decode [--tokens 1 16 64] [--fp8]
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch

from blackmamba.kernels import get_settings, use_settings
from blackmamba.kernels.moe_decode import decode_tiles, moe_experts_decode_triton, route_top1_triton
from blackmamba.layers.quant import quantize_tensor

from ..harness import argument_parser, cuda_event_us, cuda_graph, elapsed_s, fmt, require_cuda, text_table
from ..kernel_inputs import D_MODEL as D
from ..kernel_inputs import F_FF as F
from ..kernel_inputs import E

LAYERS = 8
# (BF or BN, BK, num_warps, num_stages)
SPACE = {"fc1": ([16, 32, 64], [128, 256], [4, 8], [3, 4]), "fc2": ([16, 32], [256, 512, 1024], [4, 8], [2, 3, 4])}
SPACE_FP8 = {"fc1": ([16, 32, 64], [128, 256, 512], [4, 8], [3]), "fc2": ([16, 32], [256, 512, 1024], [4, 8], [3])}
# One token on the CUDA cores (DOT=0): (BF or BN, BK) pairs, each with 4 and 8 warps.
ONE_TOKEN = {
    "fc1": [(2, 512), (2, 1024), (4, 256), (4, 512), (4, 1024), (8, 256), (8, 512), (8, 1024), (16, 256), (16, 512)],
    "fc2": [(1, 2048), (1, 4096), (2, 1024), (2, 2048), (2, 4096), (4, 512), (4, 1024), (4, 2048), (4, 4096),
            (8, 512), (8, 1024), (8, 2048), (16, 512), (16, 1024)],
}  # fmt: skip


def one_token_space(name: str) -> list[dict]:
    col = "BF" if name == "fc1" else "BN"
    return [{col: c, "BK": bk, "num_warps": w, "num_stages": 1, "DOT": 0} for c, bk in ONE_TOKEN[name] for w in (4, 8)]


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
    parser.add_argument("--fp8", action="store_true", help="float8 experts (the moe_fp8_fc1/fc2_tiles tables)")
    parser.add_argument("--max-s", type=float, default=1e9, help="start no candidate after this many seconds")
    parser.add_argument("--best-out", help="write the tuned tables here as a profile_decode --variants string")
    args = parser.parse_args(argv)
    require_cuda(parser)
    weights = [layer_weights(i) for i in range(LAYERS)]
    if args.fp8:  # (w1, w2, s1, s2) per layer
        weights = [
            (q1[0], q2[0], q1[1], q2[1]) for q1, q2 in ((quantize_tensor(a), quantize_tensor(b)) for a, b in weights)
        ]
    space = SPACE_FP8 if args.fp8 else SPACE
    fc1_space = [dict(BF=bf, BK=bk, num_warps=w, num_stages=s)
                 for bf, bk, w, s in itertools.product(*space['fc1'])]  # fmt: skip
    fc2_space = [dict(BN=bn, BK=bk, num_warps=w, num_stages=s)
                 for bn, bk, w, s in itertools.product(*space['fc2'])]  # fmt: skip
    best_rows, all_rows = [], []
    # The tile tables under test (token count -> tiles), as the moe_fc1_tiles / moe_fc2_tiles settings (with
    # --fp8 moe_fp8_fc1_tiles / moe_fp8_fc2_tiles, starting from what float8 experts take now).
    names = ("moe_fp8_fc1_tiles", "moe_fp8_fc2_tiles") if args.fp8 else ("moe_fc1_tiles", "moe_fc2_tiles")
    tables = {"fc1": dict(get_settings().moe_fc1_tiles), "fc2": dict(get_settings().moe_fc2_tiles)}
    if args.fp8:
        for tokens in {*tables["fc1"], *args.tokens}:
            tables["fc1"][tokens], tables["fc2"][tokens] = decode_tiles(tokens, torch.bfloat16, True, True)
    bytes_per = 1 if args.fp8 else 2

    def timed(run) -> float:
        with use_settings(**{names[0]: tables["fc1"], names[1]: tables["fc2"]}):
            return time_layers(run) / LAYERS

    for tokens in args.tokens:
        block = max(16, 1 << (tokens - 1).bit_length())
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, D, device="cuda", generator=g, dtype=torch.bfloat16)
        expert = torch.randint(0, E, (tokens,), device="cuda", generator=g)
        gate = torch.rand(tokens, device="cuda", generator=g)
        used = expert.unique().numel()
        moved = LAYERS * used * 3 * F * D * bytes_per  # bytes of the experts in use (W1 both halves, W2)

        def run(x=x, expert=expert, gate=gate):
            for w in weights:
                if args.fp8:
                    moe_experts_decode_triton(x, expert, gate, w[0], w[1], "gelu", w1_scale=w[2], w2_scale=w[3])
                else:
                    moe_experts_decode_triton(x, expert, gate, w[0], w[1], "gelu")

        current_us = timed(run)
        best = {}
        for name, candidates in (("fc1", fc1_space), ("fc2", fc2_space)):
            table = tables[name]
            if tokens == 1:  # the CUDA-core entries first (--max-s may stop the list)
                candidates = [*one_token_space(name), *candidates]
            results = []
            for cfg in [dict(table[tokens]), *candidates]:  # the current entry first
                if elapsed_s() > args.max_s:
                    print(f"{name} T={tokens}: stopped after {len(results)} candidates (--max-s)", flush=True)
                    break
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
        best_rows.append([str(tokens), str(block), str(used), fmt(current_us), fmt(us), fmt(moved / LAYERS / us / 1e3),
                          fmt(router_us), str(best["fc1"]), str(best["fc2"])])  # fmt: skip
    print(text_table(["tokens", "fc", "config", "us per layer"], all_rows))
    print()
    print(f"{'float8' if args.fp8 else '16-bit'} experts; settings {names[0]}, {names[1]}")
    header = ["tokens", "block", "experts used", "current us", "fc1+fc2 us", "GB/s", "router us", "best fc1",
              "best fc2"]  # fmt: skip
    print(text_table(header, best_rows))
    if args.best_out:
        variant = ";".join(f"{name}={json.dumps({str(k): dict(v) for k, v in tables[fc].items()})}"
                           for name, fc in zip(names, ("fc1", "fc2"), strict=True))  # fmt: skip
        Path(args.best_out).write_text(variant)


if __name__ == "__main__":
    main()
