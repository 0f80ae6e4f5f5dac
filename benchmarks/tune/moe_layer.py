"""The MoE layer's training step (fwd+bwd) on each grouped-GEMM path against two dense GEMMs of the same FLOPs.

2.8B widths (D=1472, F=3872, E=8), bf16, the router run and a fixed expert assignment (uniform unless
--routing skewed), as the moe rows of benchmarks/kernels.py. Per token count it times, with do_bench
medians: ``triton`` (grouped GEMMs + separate activation, kernels/moe.py), ``torch`` (torch._grouped_mm),
``fused`` (kernels/moe_fused.py) and the peer of issue 16, two dense GEMMs with the same shapes and their
input and weight gradients. Each path's max error (max |ours - ref| / max |ref| over y, dx, dw1, dw2) is
against the loop over experts in fp32 on the same inputs. Then the fused path's six kernels on their own
(ms and TFLOP/s). ``--sweep`` then times candidate tiles of each fused kernel at the largest token count
and prints the best as a ``moe_train_tiles`` setting, until ``--budget-s`` runs out.

    python -m benchmarks.tune.moe_layer [--tokens 4096 16384] [--routing uniform] [--sweep] [--budget-s 110]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from blackmamba.kernels import (
    get_settings,
    moe_experts_fused,
    moe_experts_grouped_mm,
    moe_experts_ref,
    moe_experts_triton,
    use_settings,
)
from blackmamba.kernels.moe import expert_offsets
from blackmamba.kernels.moe_fused import fc1_gated, fc2_dgrad_gated, gemm_scatter, weight_grad

from ..harness import (
    BF16,
    RESULTS_DIR,
    Row,
    argument_parser,
    bench_ms,
    elapsed_s,
    fmt,
    gpu_ceilings,
    log,
    markdown_table,
    max_err,
    meta_line,
    require_cuda,
    run_meta,
    text_table,
    write_results,
)
from ..kernel_inputs import D_MODEL as D
from ..kernel_inputs import F_FF as FF
from ..kernel_inputs import E

DEVICE = "cuda"
IMPLS = {"triton": moe_experts_triton, "torch": moe_experts_grouped_mm, "fused": moe_experts_fused}
SKEW = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])
# Candidate tiles per fused kernel for --sweep: (BM, BN, BK, num_warps, num_stages); the setting's entry is
# timed first. All compile for sm_90 (offline check) without register spills.
CANDIDATES = {
    "fc1": [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 5), (128, 64, 32, 8, 5)],
    "dact": [(128, 32, 64, 8, 4), (64, 64, 64, 8, 4), (128, 64, 32, 8, 5), (64, 64, 64, 4, 4)],
    "fc2": [(128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 32, 8, 5)],
    "dx": [(128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 32, 8, 5)],
    "wgrad": [(64, 128, 64, 4, 4), (32, 128, 128, 8, 4), (64, 256, 128, 8, 3), (128, 128, 64, 8, 3)],
}


def layer_inputs(tokens: int, routing: str) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(4)
    probs = torch.full((E,), 1.0 / E) if routing == "uniform" else SKEW
    assign = torch.multinomial(probs, tokens, replacement=True, generator=torch.Generator().manual_seed(5))
    return dict(
        x=torch.randn(tokens, D, device=DEVICE, generator=g).to(BF16),
        wr=(0.02 * torch.randn(E, D, device=DEVICE, generator=g)).to(BF16),
        w1=(0.02 * torch.randn(E, 2 * FF, D, device=DEVICE, generator=g)).to(BF16),
        w2=(0.02 * torch.randn(E, D, FF, device=DEVICE, generator=g)).to(BF16),
        dy=torch.randn(tokens, D, device=DEVICE, generator=g).to(BF16),
        assign=assign.to(DEVICE),
    )


def layer(experts: Callable, inp: dict, x, w1, w2):
    """Router logits and sigmoid, the gate of the fixed assignment, then the experts (as benchmarks/kernels.py)."""
    probs_TE = torch.sigmoid(F.linear(x.float(), inp["wr"].float()))
    gate = probs_TE.gather(1, inp["assign"][:, None])[:, 0]
    return experts(x, inp["assign"], gate, w1, w2, "gelu")


def fwd_bwd(experts: Callable, inp: dict, leaves: list) -> tuple:
    y = layer(experts, inp, *leaves)
    return (y, *torch.autograd.grad(y, leaves, inp["dy"].to(y.dtype)))


def dense_fwd_bwd(tokens: int) -> tuple[Callable, Callable]:
    """Two dense GEMMs of the experts' shapes, (T, D) x (D, 2F) and (T, F) x (F, D): forward, and forward with
    the input and weight gradients of both (the same FLOPs as the MoE layer's fwd+bwd)."""
    g = torch.Generator(device=DEVICE).manual_seed(6)
    ins = [
        torch.randn(*shape, device=DEVICE, generator=g).to(BF16).requires_grad_()
        for shape in ((tokens, D), (D, 2 * FF), (tokens, FF), (FF, D))
    ]
    dys = [torch.randn(tokens, n, device=DEVICE, generator=g).to(BF16) for n in (2 * FF, D)]

    def fwd():
        with torch.no_grad():
            return ins[0] @ ins[1], ins[2] @ ins[3]

    def both():
        return torch.autograd.grad((ins[0] @ ins[1], ins[2] @ ins[3]), ins, dys)

    return fwd, both


def layer_rows(tokens: int, routing: str, peak: float) -> list[Row]:
    inp = layer_inputs(tokens, routing)
    shape = f"T={tokens}/{routing}"
    leaves = [inp[k].detach().requires_grad_() for k in ("x", "w1", "w2")]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = [t.detach() for t in fwd_bwd(moe_experts_ref, inp, ref_leaves)]
    del ref_leaves
    fwd_ms, both_ms, errs = {}, {}, {}
    for name, fn in IMPLS.items():
        got = fwd_bwd(fn, inp, leaves)  # also compiles
        errs[name] = max(max_err(a, b) for a, b in zip(got, ref, strict=True))
        del got
        with torch.no_grad():
            fwd_ms[name] = bench_ms(lambda fn=fn: layer(fn, inp, *leaves))
        both_ms[name] = bench_ms(lambda fn=fn: fwd_bwd(fn, inp, leaves))
        log(f"{shape} {name}: fwd {fwd_ms[name]:.3f} ms, fwd+bwd {both_ms[name]:.3f} ms, max err {errs[name]:.3g}")
    dense_fwd, dense_both = dense_fwd_bwd(tokens)
    fwd_ms["dense"], both_ms["dense"] = bench_ms(dense_fwd), bench_ms(dense_both)
    log(f"{shape} dense: fwd {fwd_ms['dense']:.3f} ms, fwd+bwd {both_ms['dense']:.3f} ms")
    flop = 2 * tokens * D * 3 * FF
    rows = []
    for bench, times, mult in (("moe_layer_fwd", fwd_ms, 1), ("moe_layer_fwd_bwd", both_ms, 3)):
        fastest = min(IMPLS, key=times.get)
        rows.append(
            Row(bench, shape, "ms", times["fused"], "two dense GEMMs, same FLOPs", times["dense"],
                mult * flop / peak * 1e3, errs["fused"] if mult == 3 else None,
                {"triton": times["triton"], "torch_grouped_mm": times["torch"], "fastest": fastest,
                 "fused_over_dense": times["fused"] / times["dense"],
                 **({"err_triton": errs["triton"], "err_torch": errs["torch"]} if mult == 3 else {})})
        )  # fmt: skip
    return rows


def kernel_calls(tokens: int, routing: str) -> dict[str, tuple[Callable, float]]:
    """Each launch of the fused path on its own, with its FLOPs."""
    inp = layer_inputs(tokens, routing)
    x, w1, w2, dy = inp["x"], inp["w1"], inp["w2"], inp["dy"]
    gate = torch.rand(tokens, device=DEVICE)
    order, offs = expert_offsets(inp["assign"], E)
    h, act = fc1_gated(x, w1, order, offs, "gelu", store_h=True)
    dh, actg, _ = fc2_dgrad_gated(dy, w2, h, gate, order, offs, "gelu")
    gemm = 2 * tokens * D * FF
    return {
        "fc1": (lambda: fc1_gated(x, w1, order, offs, "gelu", store_h=True), 2 * gemm),
        "fc2": (lambda: gemm_scatter(act, w2, offs, order, trans_b=True, kernel="fc2", scale=gate), gemm),
        "dact": (lambda: fc2_dgrad_gated(dy, w2, h, gate, order, offs, "gelu"), gemm),
        "dW2": (lambda: weight_grad(dy, actg, offs, order, gather_a=True), gemm),
        "dx": (lambda: gemm_scatter(dh, w1, offs, order, trans_b=False, kernel="dx"), 2 * gemm),
        "dW1": (lambda: weight_grad(dh, x, offs, order, gather_a=False), 2 * gemm),
    }


def kernel_rows(tokens: int, routing: str, peak: float) -> list[Row]:
    rows = []
    with torch.no_grad():
        for name, (call, flop) in kernel_calls(tokens, routing).items():
            call()
            ms = bench_ms(call)
            rows.append(Row(f"moe_fused_{name}", f"T={tokens}/{routing}", "ms", ms, None, None, flop / peak * 1e3,
                            None, {"tflops": flop / ms * 1e-9}))  # fmt: skip
    return rows


def sweep(tokens: int, routing: str, deadline: float) -> dict[str, dict]:
    """Best tiles per fused kernel (the setting's entry first, then CANDIDATES) while time is left."""
    calls = kernel_calls(tokens, routing)
    uses = {"fc1": ["fc1"], "fc2": ["fc2"], "dact": ["dact"], "dx": ["dx"], "wgrad": ["dW2", "dW1"]}
    best = {}
    for kernel, tiles in CANDIDATES.items():
        current = dict(get_settings().moe_train_tiles[kernel])
        options = [current] + [
            dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=s) | ({} if kernel == "wgrad" else dict(GROUP_M=8))
            for bm, bn, bk, w, s in tiles
        ]
        timed = []
        for cfg in options:
            if elapsed_s() > deadline:
                log(f"sweep: out of time at {kernel}")
                break
            table = {k: dict(v) for k, v in get_settings().moe_train_tiles.items()} | {kernel: cfg}
            with use_settings(moe_train_tiles=table), torch.no_grad():
                ms = 0.0
                for use in uses[kernel]:
                    calls[use][0]()
                    ms += bench_ms(calls[use][0])
            log(f"sweep {kernel} {cfg}: {ms:.3f} ms")
            timed.append((ms, cfg))
        if timed:
            ms, cfg = min(timed, key=lambda t: t[0])
            best[kernel] = dict(cfg, ms=round(ms, 4), default_ms=round(timed[0][0], 4))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="token counts per layer call")
    parser.add_argument("--routing", choices=("uniform", "skewed"), default="uniform", help="expert assignment")
    parser.add_argument("--sweep", action="store_true", help="then time candidate tiles of each fused kernel")
    parser.add_argument("--budget-s", type=float, default=110.0, help="stop the sweep after this many seconds")
    parser.add_argument("--out", default=str(RESULTS_DIR / "moe_layer.json"), help="results file (and .md beside it)")
    args = parser.parse_args(argv)
    require_cuda(parser)
    bw, peak = gpu_ceilings()
    log(f"measured: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    rows: list[Row] = []
    for tokens in args.tokens:
        rows += layer_rows(tokens, args.routing, peak)
        rows += kernel_rows(tokens, args.routing, peak)
        torch.cuda.empty_cache()
    best = sweep(max(args.tokens), args.routing, args.budget_s) if args.sweep else {}
    if best:  # the layer again with the best tiles found
        table = {k: dict(v) for k, v in get_settings().moe_train_tiles.items()}
        table |= {k: {n: v for n, v in cfg.items() if not n.endswith("ms")} for k, cfg in best.items()}
        with use_settings(moe_train_tiles=table):
            swept = layer_rows(max(args.tokens), args.routing, peak)
        for r in swept:
            r.benchmark += "_swept_tiles"
        rows += swept
    tiles = {k: dict(v) for k, v in get_settings().moe_train_tiles.items()}
    meta = run_meta(DEVICE, copy_bandwidth_TBps=bw / 1e12, bf16_matmul_TFLOPs=peak / 1e12, moe_train_tiles=tiles)
    header = ["benchmark", "shape", "fused ms", "triton ms", "torch ms", "dense ms", "fused/dense",
              "fastest or TFLOP/s", "floor ms", "max err fused/triton/torch"]  # fmt: skip
    body = []
    for r in rows:
        x = r.extra
        errs = "/".join(fmt(v) for v in (r.max_err, x.get("err_triton"), x.get("err_torch"))) if r.max_err else ""
        tflops = f"{x['tflops']:.0f} TFLOP/s" if "tflops" in x else ""
        paths = [
            fmt(x.get("triton")),
            fmt(x.get("torch_grouped_mm")),
            fmt(r.peer_value),
            fmt(x.get("fused_over_dense")),
        ]
        body.append([r.benchmark, r.shape, fmt(r.ours), *paths, x.get("fastest", tflops), fmt(r.floor), errs])
    text = text_table(header, body)
    if best:
        text += "\n\nsweep (best per kernel; ms is the sum over its launches):\n" + "\n".join(
            f"  {k}: {v}" for k, v in best.items()
        )
    write_results(Path(args.out), meta, rows, f"{meta_line(meta)}\n\n{markdown_table(header, body)}\n", sweep=best)
    print(f"\n{meta_line(meta)}, wall {elapsed_s():.0f} s")
    print(text)


if __name__ == "__main__":
    main()
