"""CPU benchmark of blackmamba against Hugging Face transformers' ``JambaForCausalLM``.

Everything runs in one process with random weights built from configs (nothing is downloaded), with
``torch`` using as many threads as the machine has cores, under ``torch.inference_mode``:

* ``forward``: wall time of one full forward of a 1x2048 sequence of random token ids (never zeros),
  logits for every position in both models. Warm-up call, then the median of a few repeats (the peer
  at the 1.5B shape warms up on a short sequence and is timed once: one forward takes minutes).
* ``decode``: greedy decoding after a 16-token random prompt, batch 1. tokens/s = new tokens / wall
  time of the whole generation (its 16-token prefill included, for both models; prefill is also timed
  alone and reported in the JSON). Ours is ``blackmamba.generate``; the peer's is a greedy loop over its
  ``forward`` with its own cache (``benchmarks/peers.py`` says why).
* ``floor``: the matrix-product floor of our forward. Matmul FLOPs are counted from the layer shapes
  (per Mamba block in_proj, x_proj, dt_proj, out_proj; per MoE block the router and, per token, one
  expert's fc1 d->2F and fc2 F->d; the tied head d->vocab) and divided by the best fp32
  ``torch.matmul`` rate measured in this run on GEMMs of the model's own shapes (median of repeats per
  shape, best shape). ``fraction of floor`` = floor / our time: 1.0 would mean purely matmul bound.
* ``--scan``: which selective scan our model runs: ``compiled`` (the default: the C++ scan of
  ``blackmamba/kernels/scan_cpu.py``, built on first use; the PyTorch path where it cannot be built),
  ``chunked`` (the PyTorch chunked scan, ``use_settings(compiled_cpu_scan=False)``), or ``both``: the
  default's rows plus a forward row per shape with the chunked scan ("... chunked scan"), the two forwards
  timed alternately in one loop so that both see the same load.
* ``max err``: our default (fast) path against the plain reference backend (``use_backend("ref")``):
  max |fast - ref| / max |ref| over the logits. Forward rows: a 1x64 forward. Decode rows: prefill of
  the prompt plus 16 teacher-forced ``step`` calls through the cache, logits of every step.

The peer, transformers' Jamba with our shapes and no attention layer, is described in
``benchmarks/peers.py``; on CPU it runs its pure-PyTorch path.

The table is printed last on stdout and written to ``benchmarks/results/cpu.json`` and ``cpu.md``
(``--out`` another folder); progress goes to stderr. ``--profile`` adds a torch.profiler summary of our
forward to stderr. ``--quick`` runs every code path once at a tiny size (a check of the script, not a
measurement).

    .venv/bin/python -m benchmarks.cpu                 # everything (about 15-20 minutes on 2 cores)
    .venv/bin/python -m benchmarks.cpu --only small    # the small preset only
    .venv/bin/python -m benchmarks.cpu --skip-1.5b --skip-peer
    .venv/bin/python -m benchmarks.cpu --quick --skip-peer --out /tmp/bench
    .venv/bin/python -m benchmarks.cpu --scan both     # also the 1.5B forward on the PyTorch chunked scan
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blackmamba import BlackMamba, BlackMambaConfig, generate
from blackmamba.kernels import scan_cpu, use_backend, use_settings

from .harness import (
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    cpu_matmul_rates,
    elapsed_s,
    fmt,
    load_average,
    log,
    mark_targets,
    markdown_table,
    max_err,
    median_s,
    meta_line,
    random_ids,
    run_meta,
    text_table,
    wait_for_idle,
    wall_times,
    write_results,
)
from .peers import PEER_NAME, build_jamba, jamba_greedy

FORWARD_LEN = 2048
ERR_LEN = 64
ERR_STEPS = 16
PROMPT_LEN = 16
TARGET_FORWARD_SPEEDUP = 5.0  # small forward, vs the peer
TARGET_DECODE_SPEEDUP = 4.0  # decode tokens/s, vs the peer
TARGET_FLOOR_RATIO = 1.5  # 1.5B forward time / matmul floor


@dataclass(frozen=True)
class Plan:
    """One model shape and how much to measure it."""

    key: str  # name in the table
    preset: str  # BlackMambaConfig preset
    ours_repeats: int
    peer_repeats: int
    peer_warmup_len: int  # length of the peer's warm-up forward
    ours_new_tokens: int
    peer_new_tokens: int
    decode_repeats: int
    peer_decode_repeats: int
    forward_len: int = FORWARD_LEN


PLANS = {
    "small": Plan("small", "small", 5, 3, FORWARD_LEN, 128, 128, 3, 3),
    "1.5b": Plan("1.5b", "blackmamba-1.5b", 3, 1, 128, 64, 32, 3, 1),
}
# --quick: every code path once at a tiny size, to check the script and its files; not a measurement.
QUICK = Plan("small", "small", 1, 1, 64, 8, 8, 1, 1, forward_len=128)


@dataclass
class Measured:
    """One model's measurements at one shape."""

    params: int
    forward_s: float
    forward_all_s: list[float]
    prefill_s: float
    decode_tps: float
    decode_tokens: int
    forward_chunked_all_s: list[float] | None = None  # --scan both: forwards on the chunked scan


SCANS = ("compiled", "chunked", "both")


def scan_settings(scan: str) -> Any:
    """The settings under which our model runs the ``--scan`` choice's default rows."""
    return use_settings(compiled_cpu_scan=scan != "chunked")


def alternate_times(fns: list[Callable[[], object]], warmup: int, repeats: int) -> list[list[float]]:
    """Wall times of each of ``fns``, called in turn ``repeats`` times (after ``warmup`` rounds)."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, out in zip(fns, times, strict=True):
            seconds = wall_times(fn, warmup=0, repeats=1)[0]
            if i >= warmup:
                out.append(seconds)
    return times


def meets_target(row: Row, target: str) -> bool | None:
    if target.startswith("speedup"):
        goal = TARGET_FORWARD_SPEEDUP if row.benchmark == "forward" else TARGET_DECODE_SPEEDUP
        return None if row.speedup is None else row.speedup >= goal
    if target.startswith("time"):
        return None if row.floor is None else row.ours <= TARGET_FLOOR_RATIO * row.floor
    return None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ours_generate(model: BlackMamba, prompt: list[int], new_tokens: int) -> list[int]:
    return generate(model, [prompt], max_new_tokens=new_tokens)[0]


def peer_generate(model: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with the peer's own cache, one forward per new token."""
    steps: Iterator[torch.Tensor] = jamba_greedy(model, torch.tensor([prompt]), new_tokens)
    return [int(token) for token in steps]


def decode_rate(
    gen: Callable[[list[int], int], list[int]], prompt: list[int], new_tokens: int, repeats: int
) -> tuple[float, int]:
    """(tokens/s, tokens per run) of greedy decoding: median over ``repeats`` after a short warm-up."""
    gen(prompt, min(8, new_tokens))
    produced = [0]

    def run() -> None:
        produced[0] = len(gen(prompt, new_tokens))

    seconds = median_s(run, warmup=0, repeats=repeats)
    return produced[0] / seconds, produced[0]


def forward_error(model: BlackMamba, ids: torch.Tensor) -> float:
    fast = model(ids).logits
    with use_backend("ref"):
        ref = model(ids).logits
    return max_err(fast, ref)


def step_logits(model: BlackMamba, prompt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the prefill's last position and of ``step`` fed ``tokens`` one by one: (1 + n, V)."""
    cache = model.allocate_cache(1)
    out = [model(prompt, cache=cache, num_last_tokens=1).logits[:, -1]]
    for t in tokens:
        out.append(model.step(t.view(1), cache))
    return torch.cat(out)


def decode_error(model: BlackMamba, prompt: list[int]) -> float:
    prompt_ids = torch.tensor([prompt])
    tokens = random_ids(1, ERR_STEPS, model.config.vocab_size, seed=4)[0]
    fast = step_logits(model, prompt_ids, tokens)
    with use_backend("ref"):
        ref = step_logits(model, prompt_ids, tokens)
    return max_err(fast, ref)


def matmul_shapes(cfg: BlackMambaConfig, tokens: int) -> list[tuple[str, int, int, int, int]]:
    """(name, count, M, K, N) of every matmul of our forward over ``tokens`` tokens (top-1 MoE)."""
    d, d_in, r, n = cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.d_state
    assert r is not None
    n_mamba, n_moe = cfg.layer_pattern.count("mamba"), cfg.layer_pattern.count("moe")
    return [
        ("mamba.in_proj", n_mamba, tokens, d, 2 * d_in),
        ("mamba.x_proj", n_mamba, tokens, d_in, r + 2 * n),
        ("mamba.dt_proj", n_mamba, tokens, r, d_in),
        ("mamba.out_proj", n_mamba, tokens, d_in, d),
        ("moe.router", n_moe, tokens, d, cfg.n_experts),
        ("moe.fc1", n_moe, tokens, d, 2 * cfg.d_ff),
        ("moe.fc2", n_moe, tokens, cfg.d_ff, d),
        ("head", 1, tokens, d, cfg.vocab_size),
    ]


def matmul_flops(cfg: BlackMambaConfig, tokens: int) -> float:
    return float(sum(2 * count * m * k * n for _, count, m, k, n in matmul_shapes(cfg, tokens)))


def matmul_rates(cfg: BlackMambaConfig, tokens: int, repeats: int = 5) -> dict[str, float]:
    """fp32 torch.matmul FLOP/s on the model's large GEMM shapes plus a square one (median per shape)."""
    d, d_in, f = cfg.d_model, cfg.d_inner, cfg.d_ff
    shapes = [(tokens, d, 2 * d_in), (tokens, d_in, d), (tokens, d, 2 * f), (tokens, f, d), (2048, 2048, 2048)]
    return cpu_matmul_rates(shapes, repeats)


def chunked_forward(model: BlackMamba, ids: torch.Tensor) -> object:
    with use_settings(compiled_cpu_scan=False):
        return model(ids)


def measure_ours(plan: Plan, model: BlackMamba, ids: torch.Tensor, prompt: list[int], compare: bool) -> Measured:
    chunked = None
    if compare:
        fwd, chunked = alternate_times(
            [lambda: model(ids), lambda: chunked_forward(model, ids)], warmup=1, repeats=plan.ours_repeats
        )
        log(f"{plan.key}: ours forward on the chunked scan {[round(t, 3) for t in chunked]} s")
    else:
        fwd = wall_times(lambda: model(ids), warmup=1, repeats=plan.ours_repeats)
    log(f"{plan.key}: ours forward {[round(t, 3) for t in fwd]} s")
    prefill = median_s(lambda: model(torch.tensor([prompt])), warmup=1, repeats=3)
    tps, produced = decode_rate(
        lambda p, n: ours_generate(model, p, n), prompt, plan.ours_new_tokens, plan.decode_repeats
    )
    log(f"{plan.key}: ours decode {tps:.1f} tokens/s over {produced} tokens")
    return Measured(n_params(model), statistics.median(fwd), fwd, prefill, tps, produced, chunked)


def measure_peer(plan: Plan, cfg: BlackMambaConfig, ids: torch.Tensor, prompt: list[int]) -> Measured:
    model = build_jamba(cfg)
    log(f"{plan.key}: peer built, {n_params(model) / 1e6:.2f}M parameters")
    model(ids[:, : plan.peer_warmup_len], use_cache=False)  # warm-up
    fwd = wall_times(lambda: model(ids, use_cache=False), warmup=0, repeats=plan.peer_repeats)
    log(f"{plan.key}: peer forward {[round(t, 3) for t in fwd]} s")
    prefill = median_s(lambda: model(torch.tensor([prompt]), use_cache=False), warmup=1, repeats=3)
    tps, produced = decode_rate(
        lambda p, n: peer_generate(model, p, n), prompt, plan.peer_new_tokens, plan.peer_decode_repeats
    )
    log(f"{plan.key}: peer decode {tps:.1f} tokens/s over {produced} tokens")
    return Measured(n_params(model), statistics.median(fwd), fwd, prefill, tps, produced)


def measure_errors(plan: Plan, model: BlackMamba, prompt: list[int]) -> tuple[float, float]:
    fwd_err = forward_error(model, random_ids(1, ERR_LEN, model.config.vocab_size, seed=3))
    dec_err = decode_error(model, prompt)
    log(f"{plan.key}: max rel err vs ref: forward {fwd_err}, decode {dec_err}")
    return fwd_err, dec_err


def bench_plan(plan: Plan, rate: float, skip_peer: bool, scan: str) -> list[Row]:
    cfg = BlackMambaConfig.from_preset(plan.preset)
    ids = random_ids(1, plan.forward_len, cfg.vocab_size, seed=1)
    prompt = random_ids(1, PROMPT_LEN, cfg.vocab_size, seed=2)[0].tolist()
    chunked_err = None
    with torch.inference_mode():
        model = build_model(cfg)
        log(f"{plan.key}: ours built, {n_params(model) / 1e6:.2f}M parameters")
        with scan_settings(scan):
            fwd_err, dec_err = measure_errors(plan, model, prompt)
            ours = measure_ours(plan, model, ids, prompt, compare=scan == "both")
        if scan == "both":
            with use_settings(compiled_cpu_scan=False):
                chunked_err = forward_error(model, random_ids(1, ERR_LEN, cfg.vocab_size, seed=3))
        del model
        gc.collect()
        peer = None if skip_peer else measure_peer(plan, cfg, ids, prompt)
        gc.collect()
    if peer is not None:
        log(
            f"{plan.key}: parameters ours {ours.params:,}, peer {peer.params:,} ({peer.params / ours.params:.3f}x ours)"
        )
    flops = matmul_flops(cfg, plan.forward_len)
    params = {"params_ours": ours.params, "params_peer": None if peer is None else peer.params}
    forward_target = (
        f"speedup >= {TARGET_FORWARD_SPEEDUP:g}x" if plan.key == "small" else f"time <= {TARGET_FLOOR_RATIO:g}x floor"
    )
    forward = Row(
        "forward",
        f"{plan.key}/1x{plan.forward_len}",
        "s",
        ours.forward_s,
        PEER_NAME,
        None if peer is None else peer.forward_s,
        floor=flops / rate,
        max_err=fwd_err,
        extra={
            "target": forward_target,
            **params,
            "ours_all_s": ours.forward_all_s,
            "peer_all_s": None if peer is None else peer.forward_all_s,
            "matmul_flops": flops,
            "matmul_rate_flops_per_s": rate,
        },
    )
    decode = Row(
        "decode",
        f"{plan.key}/b1",
        "tokens/s",
        ours.decode_tps,
        PEER_NAME,
        None if peer is None else peer.decode_tps,
        max_err=dec_err,
        extra={
            "target": f"speedup >= {TARGET_DECODE_SPEEDUP:g}x",
            **params,
            "prompt_len": PROMPT_LEN,
            "new_tokens_ours": ours.decode_tokens,
            "new_tokens_peer": None if peer is None else peer.decode_tokens,
            "prefill_s_ours": ours.prefill_s,
            "prefill_s_peer": None if peer is None else peer.prefill_s,
        },
    )
    rows = [forward, decode]
    if ours.forward_chunked_all_s is not None:
        times = ours.forward_chunked_all_s
        extra = {**forward.extra, "ours_all_s": times, "scan": "chunked"}
        rows.append(
            Row(
                "forward",
                f"{forward.shape} chunked scan",
                "s",
                statistics.median(times),
                PEER_NAME,
                forward.peer_value,
                floor=forward.floor,
                max_err=chunked_err,
                extra=extra,
            )
        )
    return rows


def profile_forward(preset: str, top: int = 15) -> str:
    """torch.profiler table of our forward at 1x2048 (top ops by self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = BlackMambaConfig.from_preset(preset)
    ids = random_ids(1, FORWARD_LEN, cfg.vocab_size, seed=1)
    model = build_model(cfg)
    with torch.inference_mode():
        model(ids)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = [
        "benchmark",
        "shape",
        "ours",
        f"peer ({PEER_NAME})",
        "speedup",
        "floor",
        "fraction of floor",
        "max err",
        "target",
        "met",
    ]
    body = []
    for r in rows:
        met = r.extra["meets_target"]
        body.append(
            [
                r.benchmark,
                r.shape,
                f"{fmt(r.ours)} {r.unit}",
                f"{fmt(r.peer_value)} {r.unit}" if r.peer_value is not None else "n/a",
                f"{fmt(r.speedup)}x" if r.speedup is not None else "n/a",
                f"{fmt(r.floor)} s" if r.floor is not None else "n/a",
                fmt(r.fraction_of_floor),
                fmt(r.max_err),
                r.extra["target"],
                "n/a" if met is None else ("yes" if met else "NO"),
            ]
        )
    return header, body


def summary(rows: list[Row], meta: dict[str, Any]) -> str:
    """Lines printed above the table: parameter counts, matmul rate, load, run time."""
    lines = []
    for r in rows:
        if r.benchmark != "forward" or r.extra.get("scan") == "chunked":
            continue
        ours, peer = r.extra["params_ours"], r.extra["params_peer"]
        ratio = "" if peer is None else f" ({peer / ours:.4f}x ours)"
        lines.append(f"{r.shape.split('/')[0]}: parameters ours {ours:,}, peer {peer or 0:,}{ratio}")
    best = max(meta["matmul_gflops"].values())
    lines.append(
        f"fp32 matmul rate {best:.1f} GFLOP/s (best shape); load average at start "
        f"{meta['load_average_start'][0]:.2f}, at end {meta['load_average_end'][0]:.2f}; "
        f"run took {meta['wall_s']:.0f} s"
    )
    lines.append(f"selective scan: {meta['scan']} (compiled scan: {meta.get('compiled_scan', 'not used')})")
    busy = ", ".join(f"{k} {v:.0%}" for k, v in meta.get("cpu_busy_before", {}).items())
    lines.append(f"CPU busy with other processes just before each shape: {busy}")
    return "\n".join(lines) + "\n"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    return "\n".join(
        [
            "# CPU benchmark: blackmamba vs transformers JambaForCausalLM",
            "",
            f"{meta_line(meta)}, run took {meta['wall_s']:.0f} s.",
            f"Generated by `{meta['command']}`; forward in seconds (lower is better), decode in tokens/s "
            "(higher is better).",
            "",
            markdown_table(*table_cells(rows)),
            "",
        ]
    )


def parse_args(argv: list[str] | None) -> Any:
    p = argument_parser(__spec__, __doc__)
    p.add_argument("--only", choices=sorted(PLANS), help="run one shape only")
    p.add_argument("--skip-1.5b", dest="skip_big", action="store_true", help="skip the 1.5B shape")
    p.add_argument("--skip-peer", action="store_true", help="do not build or time transformers' Jamba")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our 1.5B forward")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every code path: the small preset at 1x128, 8 new tokens, one repeat (not a measurement)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each shape, wait up to this long for other processes to leave the CPU idle",
    )
    p.add_argument(
        "--scan",
        choices=SCANS,
        default="compiled",
        help="our selective scan: the compiled C++ one (default), the PyTorch chunked one, or both (adds a "
        "forward row per shape on the chunked scan, timed alternately with the default)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    if args.quick:
        plans = [QUICK]
    else:
        keys = [args.only] if args.only else [k for k in PLANS if not (args.skip_big and k == "1.5b")]
        plans = [PLANS[k] for k in keys]
    meta = run_meta("cpu", load_average_start=load_average())
    meta["scan"] = args.scan
    if args.scan != "chunked":
        meta["compiled_scan"] = "built" if scan_cpu.library() is not None else scan_cpu.unavailable_reason()
    log(f"threads {torch.get_num_threads()}, shapes {[p.key for p in plans]}, load average {os.getloadavg()}")

    # The floor's matmul rate is measured on the 1.5B GEMM shapes (the small preset's on --quick).
    rate_cfg = BlackMambaConfig.from_preset(QUICK.preset if args.quick else PLANS["1.5b"].preset)
    rate_len, rate_repeats = (QUICK.forward_len, 1) if args.quick else (FORWARD_LEN, 5)
    first = matmul_rates(rate_cfg, rate_len, rate_repeats)
    log("matmul GFLOP/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in first.items()))

    rows: list[Row] = []
    meta["cpu_busy_before"] = {}
    for plan in plans:
        busy = wait_for_idle(args.wait_idle)
        meta["cpu_busy_before"][plan.key] = busy
        log(f"{plan.key}: CPU {busy:.0%} busy before starting")
        # The floor is a lower bound, so the best rate seen so far is used (rows get it at the end).
        rows += bench_plan(plan, max(first.values()), args.skip_peer, args.scan)
    rows.sort(key=lambda r: r.benchmark != "forward")  # stable: keeps the plan order within a benchmark

    second = matmul_rates(rate_cfg, rate_len, rate_repeats)
    log("matmul GFLOP/s again: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in second.items()))
    rates = {k: max(first[k], second[k]) for k in first}
    rate = max(rates.values())
    for row in rows:
        if row.floor is not None:
            row.floor = row.extra["matmul_flops"] / rate
            row.extra["matmul_rate_flops_per_s"] = rate
    mark_targets(rows, meets_target)
    meta["matmul_gflops"] = {k: v / 1e9 for k, v in rates.items()}

    if args.profile:
        log("profiling our 1.5B forward")
        print(profile_forward(PLANS["1.5b"].preset), file=sys.stderr)

    meta["load_average_end"] = load_average()
    meta["wall_s"] = elapsed_s()
    write_results(args.out / "cpu.json", meta, rows, markdown(rows, meta))
    log(f"wrote {args.out / 'cpu.json'} and {args.out / 'cpu.md'}")
    print(summary(rows, meta))
    print(text_table(*table_cells(rows)))


if __name__ == "__main__":
    main()
