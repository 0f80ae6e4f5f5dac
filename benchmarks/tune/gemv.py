"""Issue 17's decode kernels on the GPU: the few-row GEMV against cuBLAS, the fp8 and split-K MoE decode
kernels, and the 2.8B decode step with the GEMV off and on.

Rows (BlackMamba-2.8B widths, random weights, bf16 activations):
  gemv_bf16, gemv_fp8  in_proj (5888 x 1472), x_proj (124 x 2944), out_proj (1472 x 2944) at M = 1, 4, 16 rows:
                       kernels/gemv.py on bf16 or e4m3 weights (per-row fp32 scales) against cuBLAS (F.linear,
                       bf16); floor = the bytes of the weight (bf16 or fp8), x and y over the copy bandwidth
  moe_decode_bf16, moe_decode_fp8
                       fc1 + fc2 of the decode MoE (kernels/moe_decode.py) at T = 1, 16 tokens with fc2 in 1, 2,
                       4, 8 splits of F (the best reported, the others in "splits_us"), against the current bf16
                       kernels (one split); floor = the bytes of the experts in use
  decode_step          model.step of the whole 2.8B model (the Decoder's CUDA graph, replayed back to back) at
                       batch 1 and 16: the projections on the GEMV (gemv_dense), the decode kernels launched
                       with PDL (pdl_max_rows), and both, against F.linear projections without PDL; floor = the bytes of
                       the weights a step reads (experts: the expected number in use, uniform routing)

A kernel timing replays a CUDA graph of calls on different copies of the weights, at least 200 MB of them, so
that they come from HBM and not from the 60 MB L2, as in a decode step: microseconds per call, launch gaps
included. max err is max |ours - ref| / max |ref| against the fp32 reference on the same (dequantized)
weights; for decode_step, the logits of each variant against the first. ``--sweep`` (or the section "sweep")
also times candidate GEMV tiles on the Mamba projections of both released models, with PDL on (``--sweep-pdl``
for off or both), on bf16 weights or their fp8 quantization (``--sweep-dtype``), and prints the fastest per
shape (the gemv_shape_tiles and gemv_fp8_shape_tiles settings). Sections stop starting after ``--max-s``.

    python -m benchmarks.tune.gemv [--only gemv moe step sweep] [--batches 1 16] [--step-variants pdl|moe]
                                   [--sweep] [--sweep-dtype bf16|fp8|both]
"""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from blackmamba.config import BlackMambaConfig
from blackmamba.generation.decoder import Decoder, SamplingOptions
from blackmamba.kernels import get_settings, use_settings
from blackmamba.kernels.gemv import launch_plan, linear_reference, linear_triton
from blackmamba.kernels.moe_decode import moe_experts_decode_ref, moe_experts_decode_triton
from blackmamba.layers.quant import quantize_tensor

from ..harness import (
    BF16,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    cuda_event_us,
    cuda_graph,
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
from ..kernel_inputs import D_IN, D_MODEL, F_FF, E, N, R

PROJECTIONS = {"in_proj": (2 * D_IN, D_MODEL), "x_proj": (R + 2 * N, D_IN), "out_proj": (D_MODEL, D_IN)}
ROWS = (1, 4, 16)
TOKENS = (1, 16)
SPLITS = (1, 2, 4, 8)
COLD_BYTES = 200e6  # weights per timed graph: well above the 60 MB L2
CUBLAS = "cuBLAS F.linear (bf16)"


def copies_for(nbytes: int, most: int = 256) -> int:
    """How many copies of a weight of ``nbytes`` make a graph read at least :data:`COLD_BYTES` (at least 4)."""
    return max(4, min(most, int(COLD_BYTES // nbytes) + 1))


def graph_us(fn, args: list[tuple], reps: int = 30) -> float:
    """Microseconds per call of ``fn(*a)`` for each ``a`` in ``args``, all captured in one CUDA graph, replayed."""
    graph = cuda_graph(lambda: [fn(*a) for a in args])
    return cuda_event_us(graph.replay, reps) / len(args)


def moe_fp8(x, expert, gate, w1, w2, s1, s2):
    return moe_experts_decode_triton(x, expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)


def row(benchmark: str, shape: str, ours: float, peer: str, peer_us: float, floor: float, err: float, **extra) -> Row:
    return Row(benchmark, shape, "us", ours, peer, peer_us, floor, err, extra)


def gemv_rows(bw: float) -> list[Row]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in PROJECTIONS.items():
        copies = copies_for(n * k * 2)
        weights = [(torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(BF16) for _ in range(copies)]
        quantized = [quantize_tensor(w) for w in weights]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", generator=gen).to(BF16)
            err = max_err(linear_triton(x, weights[0]), linear_reference(x.float(), weights[0].float()))
            w8, s = quantized[0]
            err8 = max_err(linear_triton(x, w8, s), linear_reference(x.float(), w8, s))
            t_cublas = graph_us(partial(F.linear, x), [(w,) for w in weights])
            t_ours = graph_us(partial(linear_triton, x), [(w,) for w in weights])
            t_fp8 = graph_us(partial(linear_triton, x), quantized)
            io = 2 * m * (k + n)
            shape = f"{name} {n}x{k} M={m}"
            plan, plan8 = launch_plan(x, weights[0]), launch_plan(x, w8)
            rows.append(row("gemv_bf16", shape, t_ours, CUBLAS, t_cublas, (2 * n * k + io) / bw * 1e6, err,
                            plan=plan))  # fmt: skip
            rows.append(row("gemv_fp8", shape, t_fp8, CUBLAS, t_cublas, (n * k + 4 * n + io) / bw * 1e6, err8,
                            plan=plan8))  # fmt: skip
            log(f"{shape}: cuBLAS {t_cublas:.2f} us, bf16 {t_ours:.2f} us, fp8 {t_fp8:.2f} us")
    return rows


PDL_ON, PDL_OFF = dict(pdl_max_rows=64), dict(pdl_max_rows=0)  # PDL for every decode launch, or for none
MOE_VARIANTS = {"": PDL_OFF, "_pdl": PDL_ON}  # row name suffix -> kernel settings; the first (one split) is the peer


def moe_rows(bw: float) -> list[Row]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    expert_bytes = 3 * F_FF * D_MODEL * 2
    copies = 8  # one expert read per copy at T=1: 8 x 34 MB
    w1s = [(torch.randn(E, 2 * F_FF, D_MODEL, device="cuda", generator=gen) / D_MODEL**0.5).to(BF16)
           for _ in range(copies)]  # fmt: skip
    w2s = [(torch.randn(E, D_MODEL, F_FF, device="cuda", generator=gen) / F_FF**0.5).to(BF16) for _ in range(copies)]
    q1s, q2s = [quantize_tensor(w) for w in w1s], [quantize_tensor(w) for w in w2s]
    for tokens in TOKENS:
        x = torch.randn(tokens, D_MODEL, device="cuda", generator=gen).to(BF16)
        expert = torch.randint(0, E, (tokens,), device="cuda", generator=gen)
        gate = torch.rand(tokens, device="cuda", generator=gen)
        used = int(expert.unique().numel())

        tokens_in = (x, expert, gate)
        fp8_args = [(a[0], b[0], a[1], b[1]) for a, b in zip(q1s, q2s, strict=True)]
        (w1, s1), (w2, s2) = q1s[0], q2s[0]
        ref = moe_experts_decode_ref(x.float(), expert, gate, w1s[0].float(), w2s[0].float())
        ref8 = moe_experts_decode_ref(x.float(), expert, gate, w1, w2, w1_scale=s1, w2_scale=s2)
        io = tokens * D_MODEL * 4
        shape = f"T={tokens} ({used} experts)"
        current = None
        for tag, variant in MOE_VARIANTS.items():
            with use_settings(**variant):
                bf16_us = {s: moe_us(tokens_in, list(zip(w1s, w2s, strict=True)), s, fp8=False) for s in SPLITS}
                fp8_us = {s: moe_us(tokens_in, fp8_args, s, fp8=True) for s in SPLITS}
                with use_settings(moe_fc2_splits={64: min(bf16_us, key=bf16_us.get)}):
                    err = max_err(moe_experts_decode_triton(x, expert, gate, w1s[0], w2s[0]), ref)
                with use_settings(moe_fc2_splits={64: min(fp8_us, key=fp8_us.get)}):
                    err8 = max_err(moe_experts_decode_triton(x, expert, gate, w1, w2, w1_scale=s1, w2_scale=s2), ref8)
            current = bf16_us[1] if current is None else current  # the peer: bf16, one split, no PDL
            for name, times, e, nbytes in ((f"moe_decode_bf16{tag}", bf16_us, err, expert_bytes),
                                           (f"moe_decode_fp8{tag}", fp8_us, err8, expert_bytes // 2)):  # fmt: skip
                best = min(times, key=times.get)
                rows.append(row(name, shape, times[best], "bf16, fc2 in one split, no PDL", current,
                                (used * nbytes + io) / bw * 1e6, e, best_splits=best,
                                splits_us={str(s): t for s, t in times.items()}))  # fmt: skip
            log(f"MoE T={tokens} {tag or 'no PDL'}: bf16 by splits {fmt_times(bf16_us)}; fp8 {fmt_times(fp8_us)}")
    return rows


def moe_us(tokens_in: tuple, weights: list[tuple], splits: int, fp8: bool) -> float:
    """Microseconds per decode MoE call (fc1 + fc2) on each set of expert weights, fc2 in ``splits`` splits."""
    with use_settings(moe_fc2_splits={64: splits}):  # read when the graph is captured
        return graph_us(partial(moe_fp8 if fp8 else moe_experts_decode_triton, *tokens_in), weights)


def fmt_times(times: dict[int, float]) -> str:
    return ", ".join(f"{s}: {t:.1f} us" for s, t in times.items())


STEP_VARIANTS = {  # name -> kernel settings of a decode-step variant; the first is the peer of the others
    "cuBLAS projections": dict(gemv_dense=False, **PDL_OFF),
    "GEMV": dict(gemv_dense=True, **PDL_OFF),
    "cuBLAS projections + PDL": dict(gemv_dense=False, **PDL_ON),
    "GEMV + PDL": dict(gemv_dense=True, **PDL_ON),
    "GEMV + PDL, gemv_tiles only": dict(gemv_dense=True, gemv_shape_tiles={}, **PDL_ON),
}
# Issue 17's MoE question at larger batches: the decode kernels (at most 64 tokens) against the sorted grouped
# GEMM path, under the defaults otherwise. ``--step-variants moe``.
MOE_STEP_VARIANTS = {
    "defaults (MoE decode kernels to 64 tokens)": dict(),
    "MoE on the grouped GEMM (decode_tokens=0)": dict(decode_tokens=0),
}
STEP_VARIANT_SETS = {"pdl": STEP_VARIANTS, "moe": MOE_STEP_VARIANTS}
STEP_BATCHES = (1, 16)


def step_rows(
    bw: float, steps: int = 100, batches: tuple[int, ...] = STEP_BATCHES, variants: dict | None = None
) -> list[Row]:
    """The 2.8B decode step (CUDA graph, replayed back to back) under each of ``variants`` (default
    :data:`STEP_VARIANTS`), against the first; max err: the logits of one eager step against the first
    variant's."""
    variants = STEP_VARIANTS if variants is None else variants
    model = build_model("blackmamba-2.8b", "cuda", BF16)
    cfg = model.config
    rows = []
    expert_bytes = 3 * cfg.d_ff * cfg.d_model * 2
    n_moe = cfg.layer_pattern.count("moe")
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    names = list(variants)
    for batch in batches:
        used = cfg.n_experts * (1 - (1 - 1 / cfg.n_experts) ** batch)  # expected experts in use, uniform routing
        floor = (all_bytes - n_moe * (cfg.n_experts - used) * expert_bytes) / bw * 1e6
        tokens = torch.randint(1, 50000, (batch,), device="cuda")
        us, logits = {}, {}
        for name in names * 2:  # each variant twice, interleaved: the second time is kept (host and clocks settle)
            with use_settings(**variants[name]), torch.inference_mode():
                decoder = Decoder(model, SamplingOptions(), use_graphs=True)  # a fresh graph per setting
                slot = decoder.start(model.allocate_cache(batch), tokens, None)
                us[name] = cuda_event_us(lambda decoder=decoder, slot=slot: decoder.step(slot, None), steps, warmup=10)
                logits[name] = model.step(tokens, model.allocate_cache(batch)).float()
                del decoder, slot
        peer = names[0]
        for name in names[1:]:
            rows.append(row("decode_step", f"2.8B b{batch} {name}", us[name], peer, us[peer], floor,
                            max_err(logits[name], logits[peer]), tokens_per_s=batch * 1e6 / us[name],
                            tokens_per_s_peer=batch * 1e6 / us[peer]))  # fmt: skip
        log(f"decode step b{batch}: " + ", ".join(f"{n} {us[n]:.0f} us" for n in names))
    return rows


def sweep_shapes() -> dict[str, tuple[int, int]]:
    """The Mamba projections (N, K) of both released models, by name."""
    shapes = {}
    for preset in ("blackmamba-2.8b", "blackmamba-1.5b"):
        c = BlackMambaConfig.from_preset(preset)
        tag = preset.removeprefix("blackmamba-")
        shapes[f"{tag} in_proj"] = (2 * c.d_inner, c.d_model)
        shapes[f"{tag} x_proj"] = (c.dt_rank + 2 * c.d_state, c.d_inner)
        shapes[f"{tag} out_proj"] = (c.d_model, c.d_inner)
    return shapes


def sweep_candidates(fp8: bool) -> dict[int, list[dict]]:
    """Candidate tiles per row count (1 and 16). float8 tiles also go twice as deep on one row (the same bytes
    as a 16-bit tile) and try ACC_K=1 there (each step's products summed at once: fewer registers)."""
    one_row = [
        dict(BN=bn, BK=bk, num_warps=w, num_stages=1)
        for bn, bk, w in itertools.product([2, 4, 8, 16, 32], [256, 512, 1024, 2048, 4096], [4, 8])
        if 1024 <= bn * bk <= 16384
    ]
    rows16 = [
        dict(BN=bn, BK=bk, num_warps=4, num_stages=st)
        for bn, bk, st in itertools.product([16, 32, 64], [64, 128, 256], [2, 3, 4])
    ]
    if fp8:
        one_row = [
            dict(BN=bn, BK=bk, num_warps=w, num_stages=1, **({"ACC_K": 1} if acc1 else {}))
            for bn, bk, w, acc1 in itertools.product(
                [2, 4, 8, 16], [512, 1024, 2048, 4096, 8192], [4, 8], [False, True]
            )  # fmt: skip
            if 4096 <= bn * bk <= 16384
        ]
        rows16 = [
            dict(BN=bn, BK=bk, num_warps=4, num_stages=st)
            for bn, bk, st in itertools.product([16, 32, 64], [128, 256, 512], [2, 3, 4])
            if bn * bk <= 16384
        ]
    return {1: one_row, 16: rows16}


def sweep(bw: float, pdl_modes: tuple[bool, ...] = (True,), fp8: bool = False, max_s: float = 1e9) -> list[list[str]]:
    """Candidate GEMV tiles per row count (1 and 16), timed on the Mamba projections of both released models
    (bf16 weights, or their float8 quantization with ``fp8``), with PDL off and on (back-to-back calls in a
    graph: with PDL each call's weights stream in while the one before ends). The lines of a table: per shape,
    the fastest entry and its time against the current settings' choice (gemv_tiles alone for bf16, every
    table for fp8). The gemv_shape_tiles (bf16) or gemv_fp8_shape_tiles setting takes the fastest. Candidates
    stop starting after ``max_s`` seconds of the run."""
    candidates = sweep_candidates(fp8)
    gen = torch.Generator(device="cuda").manual_seed(2)
    shapes = sweep_shapes()
    weights = {}
    for name, (n, k) in shapes.items():
        copies = copies_for(n * k * (1 if fp8 else 2))
        dense = [(torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(BF16) for _ in range(copies)]
        weights[name] = [quantize_tensor(w) for w in dense] if fp8 else [(w,) for w in dense]
        del dense
    tag = "fp8" if fp8 else "bf16"
    lines = []
    for (m, configs), pdl in itertools.product(candidates.items(), pdl_modes):
        xs = {name: torch.randn(m, k, device="cuda", generator=gen).to(BF16) for name, (_, k) in shapes.items()}
        times: dict[str, list[tuple[float, dict | None]]] = {name: [] for name in shapes}
        for cfg in [None, *configs]:  # None: the current settings
            if elapsed_s() > max_s:
                log(f"sweep {tag} M={m}: stopped after {len(times[next(iter(shapes))])} entries (--max-s)")
                break
            if cfg is None:
                changes = {} if fp8 else dict(gemv_shape_tiles={})
            elif fp8:
                changes = dict(gemv_fp8_shape_tiles={(m, *shape): cfg for shape in shapes.values()})
            else:
                changes = dict(gemv_tiles={**get_settings().gemv_tiles, m: cfg}, gemv_shape_tiles={})
            with use_settings(**changes, **(PDL_ON if pdl else PDL_OFF)):
                for name, ws in weights.items():
                    try:
                        times[name].append((graph_us(partial(linear_triton, xs[name]), ws), cfg))
                    except Exception as exc:  # a tile that does not fit (shared memory) is skipped
                        log(f"sweep {tag} M={m} {cfg} {name}: {type(exc).__name__}")
        for name, (n, k) in shapes.items():
            if not times[name]:
                continue
            best_us, best = min(times[name], key=lambda t: t[0])
            current_us = times[name][0][0] if times[name][0][1] is None else float("nan")
            lines.append([tag, f"{m}{' PDL' if pdl else ''}", name, f"({m}, {n}, {k})",
                          "current" if best is None else str(best), fmt(best_us), fmt(current_us)])  # fmt: skip
            log(f"sweep {tag} M={m} pdl={pdl} {name}: {best} {best_us:.2f} us (current {current_us:.2f})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        choices=["gemv", "moe", "step", "sweep"],
        help="sections to run: gemv moe step sweep (default: the first three)",
    )
    parser.add_argument("--sweep", action="store_true", help="also time candidate GEMV tiles (a few minutes more)")
    parser.add_argument("--sweep-pdl", choices=["on", "off", "both"], default="on",
                        help="sweep with PDL on (default), off, or both")  # fmt: skip
    parser.add_argument(
        "--sweep-dtype",
        choices=["bf16", "fp8", "both"],
        default="bf16",
        help="weights of the sweep: bf16 (gemv_shape_tiles), fp8 (gemv_fp8_shape_tiles), or both",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=list(STEP_BATCHES), help="decode step batches")
    parser.add_argument("--step-variants", choices=sorted(STEP_VARIANT_SETS), default="pdl",
                        help="pdl: GEMV and PDL on/off; moe: MoE decode kernels vs grouped GEMM")  # fmt: skip
    parser.add_argument("--max-s", type=float, default=100.0, help="start no section after this many seconds")
    parser.add_argument("--out", default=str(RESULTS_DIR / "gemv.json"), help="results file (and .md beside it)")
    args = parser.parse_args(argv)
    require_cuda(parser)
    if min(args.batches) < 1:
        parser.error(f"--batches must be >= 1, got {args.batches}")
    want = args.only or ["gemv", "moe", "step"]
    run_sweep = args.sweep or "sweep" in want
    bw, _ = gpu_ceilings()
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    rows: list[Row] = []
    skipped = []
    step = partial(step_rows, batches=tuple(args.batches), variants=STEP_VARIANT_SETS[args.step_variants])
    sections = {"gemv": gemv_rows, "moe": moe_rows, "step": step}
    for name in [w for w in want if w != "sweep"]:
        if elapsed_s() > args.max_s:
            skipped.append(name)
            continue
        with torch.no_grad():
            rows += sections[name](bw)
        torch.cuda.empty_cache()
    pdl_modes = {"on": (True,), "off": (False,), "both": (False, True)}[args.sweep_pdl]
    sweep_lines = []
    for fp8 in {"bf16": (False,), "fp8": (True,), "both": (False, True)}[args.sweep_dtype] if run_sweep else ():
        sweep_lines += sweep(bw, pdl_modes, fp8=fp8, max_s=args.max_s + 120)
    settings = get_settings()
    meta = run_meta("cuda", copy_bandwidth_TBps=bw / 1e12, skipped=skipped, wall_s=elapsed_s(),
                    gemv_tiles={str(k): dict(v) for k, v in settings.gemv_tiles.items()},
                    gemv_shape_tiles={str(k): dict(v) for k, v in settings.gemv_shape_tiles.items()},
                    gemv_fp8_shape_tiles={str(k): dict(v) for k, v in settings.gemv_fp8_shape_tiles.items()},
                    gemv_programs_per_sm=settings.gemv_programs_per_sm)  # fmt: skip
    header = ["benchmark", "shape", "ours us", "peer", "peer us", "speedup", "floor us", "of floor", "max err"]
    body = [[r.benchmark, r.shape, fmt(r.ours), r.peer or "n/a", fmt(r.peer_value), fmt(r.speedup), fmt(r.floor),
             "n/a" if r.fraction_of_floor is None else f"{r.fraction_of_floor:.0%}", fmt(r.max_err)]
            for r in rows]  # fmt: skip
    sweep_header = ["weights", "rows", "projection", "table key", "fastest entry", "us", "current settings us"]
    markdown = f"{meta_line(meta)}\n\n{markdown_table(header, body)}\n"
    if sweep_lines:
        markdown += f"\nGEMV tile sweep (fastest per shape):\n\n{markdown_table(sweep_header, sweep_lines)}\n"
    write_results(Path(args.out), meta, rows, markdown, sweep=sweep_lines)
    if sweep_lines:
        print(text_table(sweep_header, sweep_lines) + "\n")
    print(meta_line(meta) + (f"; skipped (time): {', '.join(skipped)}" if skipped else ""))
    print(text_table(header, body))


if __name__ == "__main__":
    main()
