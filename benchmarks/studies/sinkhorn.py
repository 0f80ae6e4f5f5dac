"""Sinkhorn routing: does the paper's initialisation converge in fewer iterations?

BlackMamba (arXiv 2402.01771, section 3) claims that initialising the column scaling with
d1 = 1 / (E * column sums) instead of the vanilla d1 = 1 makes Sinkhorn converge in far fewer iterations.
This measures it with :func:`blackmamba.routing.sinkhorn` on random router logits (standard normal times a
scale) of T tokens x E = 8 experts, 20 seeds per (T, scale), for both initialisations ("zyphra" = new,
"ones" = vanilla) under both stopping tests:

* "released": the released code's, mean |change of d1| <= tol (absolute, so it depends on d1's scale);
* "marginals": scale-free, every row sum within tol (relative) of 1/T.

Per configuration: mean and max iterations (cap ``--max-iters``, and how many calls hit it), the final
marginal errors max_t |T * row_t - 1| and max_e |E * col_e - 1| of the returned P (worst seed), and what
the router does with P: the fraction of tokens whose top-1 expert (argmax of P) matches the argmax of a
fully converged float64 Sinkhorn of the same logits, and the load of the busiest expert (E * its
fraction of tokens; 1 = perfectly even). A diagnostic table repeats the new initialisation under the
marginals test with eps = 0 in the row update, to show how much of its behaviour comes from that eps.
One call of each variant is timed at the largest T (median of repeats).

The table is printed last on stdout and written to ``benchmarks/results/sinkhorn.json`` and ``.md``
(``--out`` another folder).

    .venv/bin/python -m benchmarks.studies.sinkhorn
    .venv/bin/python -m benchmarks.studies.sinkhorn --tokens 64 512 --seeds 5
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from blackmamba.routing import sinkhorn

from ..harness import (
    RESULTS_DIR,
    argument_parser,
    elapsed_s,
    log,
    markdown_table,
    meta_line,
    run_meta,
    text_table,
    write_json,
    write_text,
)

EXPERTS = 8
INITS = ("zyphra", "ones")
CRITERIA = ("released", "marginals")


def random_logits(tokens: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(tokens, EXPERTS, generator=gen)


def marginal_errors(P: torch.Tensor) -> tuple[float, float]:
    """(max_t |T * row_t - 1|, max_e |E * col_e - 1|) computed in float64."""
    P = P.double()
    tokens, experts = P.shape
    row = (P.sum(dim=1) * tokens - 1).abs().max()
    col = (P.sum(dim=0) * experts - 1).abs().max()
    return float(row), float(col)


def converged_reference(logits: torch.Tensor, tol: float = 1e-10, max_iters: int = 100_000) -> tuple[torch.Tensor, int]:
    """Float64 Sinkhorn without eps, iterated until every row and column is within ``tol`` of its target.
    Returns P and the iterations used (== max_iters if it did not get there)."""
    cost = torch.exp(2 * logits.double())
    tokens, experts = cost.shape
    d1 = torch.ones(experts, dtype=torch.float64)
    for it in range(1, max_iters + 1):
        d0 = (1.0 / tokens) / (cost @ d1)
        d1 = (1.0 / experts) / (d0 @ cost)
        row = d0 * (cost @ d1) * tokens
        if float((row - 1).abs().max()) <= tol:
            return d0[:, None] * cost * d1[None, :], it
    return d0[:, None] * cost * d1[None, :], max_iters


def routing_quality(P: torch.Tensor, ref_expert: torch.Tensor) -> tuple[float, float]:
    """(fraction of tokens whose argmax matches the converged one, E * busiest expert's token fraction)."""
    expert = P.argmax(dim=1)
    agree = float((expert == ref_expert).double().mean())
    counts = torch.bincount(expert, minlength=P.shape[1]).double()
    return agree, float(counts.max() / counts.sum() * P.shape[1])


def run_variant(
    logits: torch.Tensor, ref_expert: torch.Tensor, init: str, criterion: str, tol: float, max_iters: int, eps: float
) -> dict[str, Any]:
    P, iters = sinkhorn(logits, tol=tol, max_iters=max_iters, init=init, eps=eps, criterion=criterion)
    row, col = marginal_errors(P)
    agree, load = routing_quality(P, ref_expert)
    finite = bool(torch.isfinite(P).all())
    return {"iters": iters, "row_err": row, "col_err": col, "agree": agree, "max_load": load, "finite": finite}


def summarise(calls: list[dict[str, Any]], max_iters: int) -> dict[str, Any]:
    iters = [c["iters"] for c in calls]
    return {
        "iters_mean": statistics.fmean(iters),
        "iters_max": max(iters),
        "iters_min": min(iters),
        "capped": sum(i >= max_iters for i in iters),
        "row_err_max": max(c["row_err"] for c in calls),
        "row_err_median": statistics.median(c["row_err"] for c in calls),
        "col_err_max": max(c["col_err"] for c in calls),
        "agree_min": min(c["agree"] for c in calls),
        "agree_mean": statistics.fmean(c["agree"] for c in calls),
        "max_load_max": max(c["max_load"] for c in calls),
        "all_finite": all(c["finite"] for c in calls),
        "n": len(calls),
    }


def time_call(logits: torch.Tensor, init: str, criterion: str, tol: float, max_iters: int, repeats: int) -> dict:
    sinkhorn(logits, tol=tol, max_iters=max_iters, init=init, criterion=criterion)  # warm-up
    times, iters = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        _, iters = sinkhorn(logits, tol=tol, max_iters=max_iters, init=init, criterion=criterion)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"init": init, "criterion": criterion, "median_ms": 1e3 * median, "iters": iters, "all_s": times}


def fmt_fixed(value: float, digits: int = 2) -> str:
    """An error or iteration figure: fixed ``digits`` decimals, scientific notation outside [1e-2, 1e4)."""
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def main_cells(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "T",
        "scale",
        "criterion",
        "iters new (mean/max)",
        "iters vanilla (mean/max)",
        "capped new/van",
        "row err new",
        "row err van",
        "col err new",
        "col err van",
        "top-1 agree new",
        "top-1 agree van",
        "max load new",
        "max load van",
    ]
    body = []
    for r in results:
        z, o = r["zyphra"], r["ones"]
        body.append(
            [
                str(r["tokens"]),
                f"{r['scale']:g}",
                r["criterion"],
                f"{z['iters_mean']:.1f} / {z['iters_max']}",
                f"{o['iters_mean']:.1f} / {o['iters_max']}",
                f"{z['capped']}/{o['capped']}",
                fmt_fixed(z["row_err_max"]),
                fmt_fixed(o["row_err_max"]),
                fmt_fixed(z["col_err_max"]),
                fmt_fixed(o["col_err_max"]),
                f"{z['agree_min']:.3f}",
                f"{o['agree_min']:.3f}",
                f"{z['max_load_max']:.2f}",
                f"{o['max_load_max']:.2f}",
            ]
        )
    return header, body


def eps_cells(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "T",
        "scale",
        "iters eps=1e-8 (mean/max)",
        "iters eps=0 (mean/max)",
        "capped 1e-8/0",
        "row err eps=1e-8",
        "row err eps=0",
    ]
    body = []
    for r in results:
        a, b = r["zyphra"], r["zyphra_eps0"]
        body.append(
            [
                str(r["tokens"]),
                f"{r['scale']:g}",
                f"{a['iters_mean']:.1f} / {a['iters_max']}",
                f"{b['iters_mean']:.1f} / {b['iters_max']}",
                f"{a['capped']}/{b['capped']}",
                fmt_fixed(a["row_err_max"]),
                fmt_fixed(b["row_err_max"]),
            ]
        )
    return header, body


def timing_cells(timings: list[dict[str, Any]], tokens: int) -> tuple[list[str], list[list[str]]]:
    header = ["T", "init", "criterion", "iters", f"time per call ({torch.get_num_threads()} threads)"]
    body = [[str(tokens), t["init"], t["criterion"], str(t["iters"]), f"{t['median_ms']:.2f} ms"] for t in timings]
    return header, body


def write_report(payload: dict[str, Any], tables: dict[str, str], out_dir: Path) -> None:
    write_json(out_dir / "sinkhorn.json", payload)
    m, a = payload["meta"], payload["args"]
    md = [
        "# Sinkhorn routing: new (Zyphra) vs vanilla initialisation",
        "",
        f"{meta_line(m)}, run took {m['wall_s']:.0f} s. Generated by `{m['command']}`.",
        "",
        f"Random logits N(0, 1) x scale, T tokens x {EXPERTS} experts, {a['seeds']} seeds per row, "
        f"tol {a['tol']:g}, cap {a['max_iters']} iterations, eps 1e-8 (the package default). 'new' = "
        "d1 = 1/(E col sums) (the paper's), 'van' = d1 = 1. Errors are the worst seed's max_t |T row_t - 1| and "
        "max_e |E col_e - 1|; top-1 agree = worst seed's fraction of tokens routed as by a converged float64 "
        "Sinkhorn; max load = E x the busiest expert's token fraction (worst seed).",
        "",
        "## Iterations and marginal errors",
        "",
        tables["main_md"],
        "",
        "## Diagnostic: new initialisation under the marginals test, eps = 1e-8 vs eps = 0",
        "",
        tables["eps_md"],
        "",
        f"## One call at the largest T (scale 1, {m['torch_threads']} torch threads)",
        "",
        tables["timing_md"],
        "",
    ]
    write_text(out_dir / "sinkhorn.md", "\n".join(md))


def parse_args(argv: list[str] | None) -> Any:
    p = argument_parser(__spec__, __doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 512, 2048, 8192], help="token counts T")
    p.add_argument("--scales", type=float, nargs="+", default=[0.1, 1.0, 3.0], help="logit scales")
    p.add_argument("--seeds", type=int, default=20, help="random logits per (T, scale)")
    p.add_argument("--tol", type=float, default=1e-4, help="stopping tolerance of both tests")
    p.add_argument("--max-iters", type=int, default=1000, help="iteration cap")
    p.add_argument("--time-repeats", type=int, default=5, help="timed calls per variant at the largest T")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = run_meta("cpu")
    results: list[dict[str, Any]] = []
    ref_iters_max = 0
    for tokens in args.tokens:
        for scale in args.scales:
            calls: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for seed in range(args.seeds):
                logits = random_logits(tokens, scale, seed)
                P_ref, ref_iters = converged_reference(logits)
                ref_iters_max = max(ref_iters_max, ref_iters)
                ref_expert = P_ref.argmax(dim=1)
                for criterion in CRITERIA:
                    for init in INITS:
                        calls.setdefault((criterion, init), []).append(
                            run_variant(logits, ref_expert, init, criterion, args.tol, args.max_iters, 1e-8)
                        )
                calls.setdefault(("marginals", "zyphra_eps0"), []).append(
                    run_variant(logits, ref_expert, "zyphra", "marginals", args.tol, args.max_iters, 0.0)
                )
            for criterion in CRITERIA:
                entry = {"tokens": tokens, "scale": scale, "criterion": criterion}
                for init in INITS:
                    entry[init] = summarise(calls[(criterion, init)], args.max_iters)
                if criterion == "marginals":
                    entry["zyphra_eps0"] = summarise(calls[("marginals", "zyphra_eps0")], args.max_iters)
                results.append(entry)
                z, o = entry["zyphra"], entry["ones"]
                log(
                    f"T={tokens} scale={scale:g} {criterion}: iters new {z['iters_mean']:.1f}/{z['iters_max']} "
                    f"(capped {z['capped']}), vanilla {o['iters_mean']:.1f}/{o['iters_max']} (capped {o['capped']}); "
                    f"row err new {z['row_err_max']:.2e}, vanilla {o['row_err_max']:.2e}"
                )

    t_big = max(args.tokens)
    logits = random_logits(t_big, 1.0, 0)
    timings = [
        time_call(logits, init, criterion, args.tol, args.max_iters, args.time_repeats)
        for criterion in CRITERIA
        for init in INITS
    ]
    for t in timings:
        log(f"T={t_big}: {t['init']} / {t['criterion']}: {t['iters']} iterations, {t['median_ms']:.2f} ms")

    main_rows = main_cells(results)
    eps_rows = eps_cells([r for r in results if r["criterion"] == "marginals"])
    time_rows = timing_cells(timings, t_big)
    meta["wall_s"] = elapsed_s()
    payload = {
        "meta": meta,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "experts": EXPERTS,
        "eps": 1e-8,
        "reference": "float64 Sinkhorn, d1 = 1 start, no eps, until max row error <= 1e-10",
        "reference_iters_max": ref_iters_max,
        "results": results,
        "timing": timings,
    }
    tables = {
        "main_md": markdown_table(*main_rows),
        "eps_md": markdown_table(*eps_rows),
        "timing_md": markdown_table(*time_rows),
    }
    write_report(payload, tables, args.out)
    log(f"wrote {args.out / 'sinkhorn.json'} and {args.out / 'sinkhorn.md'}; run took {meta['wall_s']:.0f} s")
    print(text_table(*time_rows) + "\n")
    print(text_table(*eps_rows) + "\n")
    print(text_table(*main_rows))


if __name__ == "__main__":
    main()
