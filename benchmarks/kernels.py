"""The Triton kernels against the PyTorch paths, the hardware floors and the reference (run on the GPU machine).

Rows (BlackMamba-2.8B shapes: d_model 1472, d_inner 2944, N 16, conv 4, 8 experts of F 3872, bf16):
  scan_fwd, scan_fwd_bwd   selective scan (softplus(dt + bias), D skip, SiLU(z) gate)  B x L in 1x2048, 8x2048, 2x16384
  conv_fwd                 causal depthwise conv (width 4) + SiLU                       same shapes
  norm_fwd                 residual add + RMSNorm (d_model 1472)                        same shapes
  decode_step              one token through one Mamba mixer (in_proj ... out_proj)     batch 1, 16, 64 (CUDA graphs)
  moe_fwd, moe_fwd_bwd     route -> permute -> fc1 -> gated GELU -> fc2 -> un-permute   T in 1 ... 65536, uniform/skewed

Each row: ours (ms, median of triton.testing.do_bench), one peer measured in the same run, the floor (bytes
over the measured copy bandwidth, or FLOPs over the measured bf16 matmul rate), fraction of the floor,
speedup over the peer, and the max error against the plain reference (max |ours - ref| / max |ref|, the
reference in fp32 on the same inputs). Other peers measured in the same run are kept in "others", printed
after the table.

    python -m benchmarks.kernels [--quick] [--out benchmarks/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from blackmamba.kernels import (
    KernelSettings,
    add_rms_norm,
    add_rms_norm_ref,
    causal_conv1d_ref,
    causal_conv1d_triton,
    moe_experts_grouped_mm,
    moe_experts_ref,
    moe_experts_triton,
    selective_scan_chunked,
    selective_scan_ref,
    selective_scan_triton,
    use_backend,
    use_settings,
)
from blackmamba.kernels.causal_conv1d import causal_conv1d_shifted
from blackmamba.kernels.moe import moe_experts_sorted
from blackmamba.layers import MambaMixer
from blackmamba.model import cast_model

from .harness import (
    RESULTS_DIR,
    Row,
    argument_parser,
    bench_ms,
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
from .kernel_inputs import BF16, CFG, D_IN, D_MODEL, F_FF, E, K, N, scan_inputs


def row(
    benchmark: str,
    shape: str,
    ours: float,
    peer: str,
    peer_value: float,
    floor: float,
    err: float | None,
    **others: float,
) -> Row:
    """A row in milliseconds; peers other than the main one measured in the same run go to ``others``."""
    return Row(benchmark, shape, "ms", ours, peer, peer_value, floor, err, {"others": others})


def scan_rows(batch: int, length: int, bw: float, check_grads: bool) -> list[Row]:
    shape = f"{batch}x{length}"
    x = scan_inputs(batch, length)
    with torch.no_grad():
        ref = selective_scan_ref(**{k: (v.float() if v.dtype == BF16 else v) for k, v in x.items()})
        err = max_err(selective_scan_triton(**x), ref)
        t_ours = bench_ms(lambda: selective_scan_triton(**x))
        t_torch = bench_ms(lambda: selective_scan_chunked(**x))
        del ref
    act = batch * length * D_IN * 2  # one (B, L, D_in) bf16 tensor
    bc = batch * length * 2 * N * 2
    fwd_bytes = 4 * act + bc  # read u, delta, z, B, C; write y
    rows = [row("scan_fwd", shape, t_ours, "torch chunked scan (ours, PyTorch)", t_torch, fwd_bytes / bw * 1e3, err)]

    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in x.items()}
    dy = torch.randn(batch, length, D_IN, device="cuda", dtype=BF16)

    def fwd_bwd(fn):
        out = fn(**leaves)
        return torch.autograd.grad(out, list(leaves.values()), dy)

    ref_grads = None
    if check_grads:
        ref_leaves = {k: (v.detach().float() if v.dtype == BF16 else v.detach()).requires_grad_() for k, v in x.items()}
        ref_grads = torch.autograd.grad(selective_scan_ref(**ref_leaves), list(ref_leaves.values()), dy.float())

    def grads_err() -> float | None:
        if ref_grads is None:
            return None
        return max(max_err(a, b) for a, b in zip(fwd_bwd(selective_scan_triton), ref_grads, strict=True))

    t_torch = bench_ms(lambda: fwd_bwd(selective_scan_chunked))
    t_ours, err = bench_ms(lambda: fwd_bwd(selective_scan_triton)), grads_err()
    bwd_bytes = 7 * act + 2 * bc  # read u, delta, z, dy, B, C; write du, ddelta, dz, dB, dC
    floor = (fwd_bytes + bwd_bytes) / bw * 1e3
    rows.append(row("scan_fwd_bwd", shape, t_ours, "torch chunked scan (ours, PyTorch)", t_torch, floor, err))
    return rows


def conv_row(batch: int, length: int, bw: float) -> Row:
    g = torch.Generator(device="cuda").manual_seed(1)
    xz = torch.randn(batch, length, 2 * D_IN, device="cuda", generator=g).to(BF16)
    x = xz[..., :D_IN]  # the in_proj half, as in the model
    w = torch.randn(D_IN, K, device="cuda", generator=g).to(BF16)
    b = torch.randn(D_IN, device="cuda", generator=g).to(BF16)
    with torch.no_grad():
        y = causal_conv1d_triton(x, w, b, "silu")
        err = max_err(y, causal_conv1d_ref(x.float(), w.float(), b.float(), "silu"))
        t_ours = bench_ms(lambda: causal_conv1d_triton(x, w, b, "silu"))
        t_ref = bench_ms(lambda: causal_conv1d_ref(x, w, b, "silu"))
        compiled = torch.compile(causal_conv1d_shifted)
        t_compiled = bench_ms(lambda: compiled(x, w, b, "silu"))
    floor = 2 * batch * length * D_IN * 2 / bw * 1e3
    return row("conv_fwd", f"{batch}x{length}", t_ours, "torch.compile(shifted conv)", t_compiled, floor, err,
               f_conv1d=t_ref)  # fmt: skip


def norm_row(batch: int, length: int, bw: float) -> Row:
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(batch * length, D_MODEL, device="cuda", generator=g)
    delta = torch.randn(batch * length, D_MODEL, device="cuda", generator=g).to(BF16)
    w = (1 + 0.1 * torch.randn(D_MODEL, device="cuda", generator=g)).to(BF16)
    with torch.no_grad():
        with use_backend("triton"):
            y, _ = add_rms_norm(x, delta, w)
            t_ours = bench_ms(lambda: add_rms_norm(x, delta, w))
        err = max_err(y, add_rms_norm_ref(x, delta, w)[0])
        compiled = torch.compile(add_rms_norm_ref)
        t_compiled = bench_ms(lambda: compiled(x, delta, w))
        t_eager = bench_ms(lambda: add_rms_norm_ref(x, delta, w))
    n = batch * length * D_MODEL
    floor = n * (4 + 2 + 4 + 2) / bw * 1e3  # read x fp32, delta bf16; write residual fp32, y bf16
    return row("norm_fwd", f"{batch}x{length}", t_ours, "torch.compile(reference)", t_compiled, floor, err,
               eager_reference=t_eager)  # fmt: skip


def decode_row(batch: int, bw: float, layers: int = 4) -> Row:
    """One token through ``layers`` different Mamba mixers in a CUDA graph (so the weights are read from
    memory, not L2); the time per mixer is reported."""
    torch.manual_seed(3)
    mixers = [cast_model(MambaMixer(CFG), BF16).cuda() for _ in range(layers)]
    u = torch.randn(batch, D_MODEL, device="cuda", dtype=BF16)
    caches = {b: [m.allocate_cache(batch) for m in mixers] for b in ("triton", "ref")}
    for cs in caches.values():
        for c in cs:
            c.conv_state.normal_()
            c.ssm_state.normal_()
    outs = {}

    def graph(backend):
        def step():
            with use_backend(backend):
                h = u
                for m, c in zip(mixers, caches[backend], strict=True):
                    h = m.step(h, c)
                outs[backend] = h

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            step()  # warm-up (compiles the kernels)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g), torch.no_grad():
            step()
        return g

    graphs = {b: graph(b) for b in ("triton", "ref")}
    # Equal states first, then one step each: the outputs must agree.
    for c_t, c_r in zip(caches["triton"], caches["ref"], strict=True):
        c_t.conv_state.copy_(c_r.conv_state)
        c_t.ssm_state.copy_(c_r.ssm_state)
    graphs["triton"].replay()
    graphs["ref"].replay()
    err = max_err(outs["triton"], outs["ref"])
    t_ours = bench_ms(graphs["triton"].replay) / layers
    t_ref = bench_ms(graphs["ref"].replay) / layers
    m = mixers[0]
    weight_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    state_bytes = 2 * batch * (D_IN * N * 4 + (K - 1) * D_IN * 2)  # read + write both states
    floor = (weight_bytes + state_bytes) / bw * 1e3
    return row("decode_step", f"b{batch}", t_ours, "PyTorch step (CUDA graph)", t_ref, floor, err)


SKEW = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])


def moe_rows(tokens: int, routing: str, bw: float, peak: float, with_bwd: bool) -> list[Row]:
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(tokens, D_MODEL, device="cuda", generator=g).to(BF16)
    wr = (0.02 * torch.randn(E, D_MODEL, device="cuda", generator=g)).to(BF16)
    br = torch.zeros(E, device="cuda")
    w1 = (0.02 * torch.randn(E, 2 * F_FF, D_MODEL, device="cuda", generator=g)).to(BF16)
    w2 = (0.02 * torch.randn(E, D_MODEL, F_FF, device="cuda", generator=g)).to(BF16)
    probs = torch.full((E,), 1.0 / E) if routing == "uniform" else SKEW
    assign = torch.multinomial(probs, tokens, replacement=True, generator=torch.Generator().manual_seed(5)).cuda()

    def layer(experts, x, w1, w2):
        # The router runs (logits, sigmoid, gate gather); the argmax is replaced by the fixed assignment so the
        # load is controlled (uniform or skewed).
        probs_TE = torch.sigmoid(F.linear(x.float(), wr.float(), br))
        gate = probs_TE.gather(1, assign[:, None])[:, 0]
        return experts(x, assign, gate, w1, w2, "gelu")

    a = torch.randn(tokens, D_MODEL, device="cuda", dtype=BF16)
    h = torch.randn(tokens, F_FF, device="cuda", dtype=BF16)
    w1_dense = torch.randn(D_MODEL, 2 * F_FF, device="cuda", dtype=BF16)
    w2_dense = torch.randn(F_FF, D_MODEL, device="cuda", dtype=BF16)

    def dense():
        return (a @ w1_dense, h @ w2_dense)

    shape = f"T={tokens}/{routing}"
    used = int((torch.bincount(assign, minlength=E) > 0).sum())
    flop = 2 * tokens * D_MODEL * 3 * F_FF
    weight_bytes = used * 3 * F_FF * D_MODEL * 2
    act_bytes = tokens * (2 * D_MODEL * 2 + 3 * F_FF * 2 * 2)
    with torch.no_grad():
        y = layer(moe_experts_triton, x, w1, w2)
        err = max_err(y, layer(moe_experts_ref, x.float(), w1.float(), w2.float()))
        t_ours = bench_ms(lambda: layer(moe_experts_triton, x, w1, w2))
        t_dense = bench_ms(dense)
        t_gmm = bench_ms(lambda: layer(moe_experts_grouped_mm, x, w1, w2))
        t_loop = bench_ms(lambda: layer(moe_experts_sorted, x, w1, w2))
    floor = max(flop / peak, (weight_bytes + act_bytes) / bw) * 1e3
    rows = [
        row(
            "moe_fwd",
            shape,
            t_ours,
            "two dense GEMMs of the same shapes",
            t_dense,
            floor,
            err,
            torch_grouped_mm=t_gmm,
            torch_loop_over_experts=t_loop,
        )  # fmt: skip
    ]
    if not with_bwd:
        return rows
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    dy = torch.randn(tokens, D_MODEL, device="cuda", dtype=BF16)

    def fwd_bwd(experts):
        return torch.autograd.grad(layer(experts, *leaves), leaves, dy)

    dense_in = [t.detach().requires_grad_() for t in (a, w1_dense, h, w2_dense)]
    dense_dy = (torch.randn(tokens, 2 * F_FF, device="cuda", dtype=BF16), dy)

    def dense_fwd_bwd():  # both GEMMs and their input and weight gradients
        outs = (dense_in[0] @ dense_in[1], dense_in[2] @ dense_in[3])
        return torch.autograd.grad(outs, dense_in, dense_dy)

    t_ours = bench_ms(lambda: fwd_bwd(moe_experts_triton))
    t_dense = bench_ms(dense_fwd_bwd)
    t_gmm = bench_ms(lambda: fwd_bwd(moe_experts_grouped_mm))
    grads = fwd_bwd(moe_experts_triton)
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, w1, w2)]
    ref_grads = torch.autograd.grad(layer(moe_experts_ref, *ref_leaves), ref_leaves, dy.float())
    err = max(max_err(o, r) for o, r in zip(grads, ref_grads, strict=True))
    rows.append(
        row(
            "moe_fwd_bwd",
            shape,
            t_ours,
            "two dense GEMMs of the same shapes (fwd+bwd)",
            t_dense,
            3 * floor,
            err,
            torch_grouped_mm=t_gmm,
        )  # fmt: skip
    )
    return rows


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["benchmark", "shape", "ours ms", "peer", "peer ms", "speedup", "floor ms", "of floor", "max err"]
    body = [
        [r.benchmark, r.shape, fmt(r.ours), r.peer or "n/a", fmt(r.peer_value), fmt(r.speedup), fmt(r.floor),
         "n/a" if r.fraction_of_floor is None else f"{r.fraction_of_floor:.0%}", fmt(r.max_err)]
        for r in rows
    ]  # fmt: skip
    return header, body


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="benchmarks to run: scan conv norm decode moe (all)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "kernels.json"), help="results file (and .md beside it)")
    parser.add_argument("--scan-fwd", help="forward scan tiles BLOCK_D,WARPS (default: the module's)")
    parser.add_argument("--scan-bwd", help="backward scan tiles BLOCK_D,WARPS (default: the module's)")
    args = parser.parse_args(argv)
    require_cuda(parser)
    scan_settings = {}
    if args.scan_fwd:
        scan_settings["scan_fwd_config"] = tuple(int(v) for v in args.scan_fwd.split(","))
    if args.scan_bwd:
        scan_settings["scan_bwd_seg_config"] = tuple(int(v) for v in args.scan_bwd.split(","))
    with use_settings(**scan_settings) as settings:
        run(args, settings)


def run(args: argparse.Namespace, settings: KernelSettings) -> None:
    """The benchmarks named by ``args``, under the kernel ``settings`` (recorded in the results)."""
    want = set(args.only or ["scan", "conv", "norm", "decode", "moe"])
    bw, peak = gpu_ceilings()
    print(f"measured: copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    shapes = [(8, 2048)] if args.quick else [(1, 2048), (8, 2048), (2, 16384)]
    rows: list[Row] = []

    def log(new: list[Row]) -> None:
        for r in new:
            print(json.dumps(r.to_json()), flush=True)
        rows.extend(new)

    for batch, length in shapes:
        if "scan" in want:
            log(scan_rows(batch, length, bw, check_grads=batch * length <= 16384))
        if "conv" in want:
            log([conv_row(batch, length, bw)])
        if "norm" in want:
            log([norm_row(batch, length, bw)])
        torch.cuda.empty_cache()
    if "decode" in want:
        for batch in [1] if args.quick else [1, 16, 64]:
            log([decode_row(batch, bw)])
    if "moe" in want:
        for tokens in [2048, 16384] if args.quick else [1, 64, 2048, 16384, 65536]:
            for routing in ("uniform", "skewed"):
                log(moe_rows(tokens, routing, bw, peak, with_bwd=tokens >= 2048))
                torch.cuda.empty_cache()
    scan_config = {
        "fwd": settings.scan_fwd_config,
        "bwd_segmented": settings.scan_bwd_seg_config,
    }
    meta = run_meta("cuda", copy_bandwidth_TBps=bw / 1e12, bf16_matmul_TFLOPs=peak / 1e12, scan_config=scan_config)
    header, body = table(rows)
    write_results(Path(args.out), meta, rows, f"{meta_line(meta)}\n\n{markdown_table(header, body)}\n")
    print(f"\n{meta_line(meta)}")
    print(text_table(header, body))
    for r in rows:  # the other peers beside the main figure
        if r.extra.get("others"):
            print(f"{r.benchmark} {r.shape}: " + ", ".join(f"{k} {fmt(v)}" for k, v in r.extra["others"].items()))


if __name__ == "__main__":
    main()
