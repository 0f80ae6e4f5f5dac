"""Training throughput of blackmamba against Hugging Face transformers' ``JambaForCausalLM``.

Both models are built in one process with random weights and the same shapes (the peer is described in
``benchmarks/peers.py``: one Jamba layer = Mamba mixer + MoE FFN with 8 experts, top-1, no attention
layer, tied embeddings). One training step, identical for both:

    logits = model(ids)                              ids: (batch, seq_len) random token ids in [1, vocab)
    loss = cross_entropy(logits[:, :-1], ids[:, 1:])
    loss.backward(); AdamW.step(); zero_grad()

Each model runs in train mode: ours routes with Sinkhorn (the preset's default, the paper's training
routing) and, in a second row, with plain top-1 (``train_routing="top1"``). Two warm-up steps, then the
median of ``--repeats`` (5) timed steps; tokens/s = batch * seq_len / median step time. The peer gets one
warm-up and three timed steps by default (``--peer-warmup``, ``--peer-repeats``): on CPU its pure-PyTorch
Mamba path takes about 100 s per 8 x 256 step (its backward through a per-position Python loop over the
sequence), so five would add ten minutes for no information.

``max err`` checks that our fast path computes the right gradients: one step's gradients on a short
batch (``--err-batch`` x ``--err-len``) with the default backend against ``use_backend("ref")`` (the plain
sequential scan and expert loop), max over parameters of max |g_fast - g_ref| / max |g_ref|. The two
losses are printed and stored in the JSON.

On CUDA (``--device cuda --preset blackmamba-1.5b``) the rows also carry MFU = 6 * active parameters *
tokens/s / peak (784 TFLOP/s by default, ``--peak-tflops``); on CPU MFU is left out.

The table is printed last on stdout and written to ``benchmarks/results/train_<device>.json`` and
``.md`` (``train_cpu.*`` on CPU; ``--out`` another folder); progress goes to stderr.

    .venv/bin/python -m benchmarks.train_cpu                       # small preset, 8 x 256, with the peer
    .venv/bin/python -m benchmarks.train_cpu --batch 4 --seq-len 512 --skip-peer --profile
    .venv/bin/python -m benchmarks.train_cpu --device cuda --preset blackmamba-1.5b --dtype bfloat16
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from blackmamba import BlackMambaConfig
from blackmamba.kernels import use_backend, use_settings

from .harness import (
    H200_BF16_TFLOPS,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    elapsed_s,
    fmt,
    load_average,
    log,
    mark_targets,
    markdown_table,
    max_err,
    meta_line,
    peak_rss_mib,
    random_ids,
    run_meta,
    sync,
    text_table,
    write_results,
)
from .peers import PEER_NAME, build_jamba

TARGET_SPEEDUP = 3.0  # ours tokens/s over the peer's, small preset on CPU


def meets_target(row: Row, target: str | None) -> bool | None:
    if not target or row.speedup is None:
        return None
    return row.speedup >= TARGET_SPEEDUP


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def ours_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def peer_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def make_step(
    model: torch.nn.Module, logits_fn: Callable, ids: torch.Tensor, autocast: Callable
) -> Callable[[], float]:
    """One training step (forward, next-token loss, backward, AdamW step, zero_grad); returns the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> float:
        with autocast():
            loss = next_token_loss(logits_fn(model, ids), ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def time_steps(
    step: Callable[[], float], device: torch.device, warmup: int, repeats: int, name: str = ""
) -> tuple[list[float], float]:
    """Wall times of ``repeats`` training steps after ``warmup`` untimed ones, and the last loss."""
    loss = float("nan")
    for i in range(warmup):
        start = time.perf_counter()
        loss = step()
        sync(device)
        if name:
            log(f"{name}: warm-up step {i + 1}/{warmup} {time.perf_counter() - start:.3f} s")
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        loss = step()  # float() of the loss already waits for the forward; sync covers the update
        sync(device)
        times.append(time.perf_counter() - start)
        if name:
            log(f"{name}: step {i + 1}/{repeats} {times[-1]:.3f} s, loss {loss:.4f}")
    return times, loss


def grad_error(cfg: BlackMambaConfig, device: torch.device, batch: int, length: int) -> dict[str, Any]:
    """One step's gradients and loss on the default (fast) backend and on the reference backend."""
    model = build_model(cfg, device, train=True)
    ids = random_ids(batch, length, cfg.vocab_size, seed=7, device=device)
    results = {}
    for name, ctx in (("fast", nullcontext), ("ref", lambda: use_backend("ref"))):
        model.zero_grad(set_to_none=True)
        with ctx():
            out = model(ids)
            loss = next_token_loss(out.logits, ids)
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (loss.item(), grads, out.expert_counts.detach().cpu().tolist())
    (loss_fast, g_fast, counts_fast), (loss_ref, g_ref, counts_ref) = results["fast"], results["ref"]
    if set(g_fast) != set(g_ref):
        raise RuntimeError(f"the backends give gradients for different parameters: {set(g_fast) ^ set(g_ref)}")
    worst, worst_name = 0.0, ""
    for n in g_ref:
        err = max_err(g_fast[n], g_ref[n])
        if err > worst:
            worst, worst_name = err, n
    return {
        "grad_max_rel_err": worst,
        "grad_worst_param": worst_name,
        "loss_fast": loss_fast,
        "loss_ref": loss_ref,
        "same_routing": counts_fast == counts_ref,
        "err_shape": f"{batch}x{length}",
    }


def profile_step(step: Callable[[], float], top: int) -> tuple[str, list[dict[str, Any]]]:
    """torch.profiler of one training step: the table of the top ops by self CPU time, and the same as rows."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    rows = [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "self_cpu_pct": 100 * e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    ]
    return averages.table(sort_by="self_cpu_time_total", row_limit=top), rows


def table_cells(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["benchmark", "shape", "ours", f"peer ({PEER_NAME})", "speedup", "max err", "target", "met"]
    body = []
    for r in rows:
        met = r.extra["meets_target"]
        body.append(
            [
                r.benchmark,
                r.shape,
                f"{r.ours:,.0f} {r.unit}",
                "n/a" if r.peer_value is None else f"{r.peer_value:,.0f} {r.unit}",
                "n/a" if r.speedup is None else f"{r.speedup:.2f}x",
                fmt(r.max_err),
                r.extra["target"] or "-",
                "n/a" if met is None else ("yes" if met else "NO"),
            ]
        )
    return header, body


def notes(rows: list[Row], meta: dict[str, Any]) -> list[str]:
    lines = []
    for r in rows:
        e = r.extra
        lines.append(
            f"{r.shape}: loss fast {e['loss_fast']:.6f}, ref {e['loss_ref']:.6f} on {e['err_shape']} "
            f"(same routing: {e['same_routing']}); worst gradient {e['grad_worst_param']}; "
            f"ours steps {[round(t, 3) for t in e['ours_step_s']]} s"
            + ("" if e.get("mfu") is None else f"; MFU {100 * e['mfu']:.1f}%")
        )
    peer_steps = meta.get("peer_step_s")
    if peer_steps:
        lines.append(f"peer steps {[round(t, 3) for t in peer_steps]} s, last loss {meta['peer_loss']:.4f}")
    lines.append(
        f"parameters: ours {meta['params_ours']:,} ({meta['active_params_ours']:,} active per token), "
        f"peer {meta['params_peer'] or 0:,}; peak RSS {meta['peak_rss_mib']:.0f} MiB; "
        f"load average {meta['load_average_start'][0]:.2f} -> {meta['load_average_end'][0]:.2f}; "
        f"run took {meta['wall_s']:.0f} s"
    )
    return lines


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    return "\n".join(
        [
            "# Training throughput: blackmamba vs transformers JambaForCausalLM",
            "",
            f"{meta_line(meta)}, run took {meta['wall_s']:.0f} s.",
            f"Generated by `{meta['command']}`: one step = forward + next-token cross-entropy + backward + "
            f"AdamW step, train mode, median of {meta['repeats']} steps after {meta['warmup']} warm-up steps (peer: "
            f"{meta['peer_repeats']} after {meta['peer_warmup']}: one of its steps takes minutes on CPU); "
            f"tokens/s = batch x seq_len / median step time (higher is better). max err = max relative error of "
            f"one step's gradients, default backend vs `use_backend('ref')`, on {meta['err_shape']}.",
            "",
            markdown_table(*table_cells(rows)),
            "",
            *[f"- {line}" for line in notes(rows, meta)],
            "",
        ]
    )


def parse_args(argv: list[str] | None) -> Any:
    p = argument_parser(__spec__, __doc__)
    p.add_argument("--preset", default="small", help="BlackMambaConfig preset (default small)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of ours")
    p.add_argument("--repeats", type=int, default=5, help="timed steps of ours")
    p.add_argument("--peer-warmup", type=int, default=1, help="peer warm-up steps (its CPU steps take minutes)")
    p.add_argument("--peer-repeats", type=int, default=3, help="timed peer steps")
    p.add_argument("--err-batch", type=int, default=2, help="batch of the gradient check against the reference")
    p.add_argument("--err-len", type=int, default=64, help="sequence length of the gradient check")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype (cuda)")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="MFU denominator (cuda)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--skip-peer", action="store_true", help="do not build or time transformers' Jamba")
    p.add_argument("--skip-top1", action="store_true", help="only the Sinkhorn-routed row")
    p.add_argument("--profile", action="store_true", help="torch.profiler of our training step (stderr + JSON)")
    p.add_argument(
        "--scan",
        choices=["compiled", "chunked"],
        default="compiled",
        help="our selective scan on CPU: the compiled C++ one (kernels/scan_cpu.py; default) or PyTorch's chunked one",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with use_settings(compiled_cpu_scan=args.scan == "compiled"):
        train_benchmark(args)


def train_benchmark(args: Any) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    if args.batch < 1 or args.seq_len < 2 or args.repeats < 1 or args.peer_repeats < 1:
        raise SystemExit("error: need --batch >= 1, --seq-len >= 2, --repeats >= 1, --peer-repeats >= 1")
    use_bf16 = device.type == "cuda" and args.dtype == "bfloat16"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    tokens = args.batch * args.seq_len
    shape = f"{args.preset}/{args.batch}x{args.seq_len}"
    meta = run_meta(
        device,
        device=str(device),
        dtype=args.dtype if device.type == "cuda" else "float32",
        preset=args.preset,
        batch=args.batch,
        seq_len=args.seq_len,
        warmup=args.warmup,
        repeats=args.repeats,
        peer_warmup=args.peer_warmup,
        peer_repeats=args.peer_repeats,
        err_shape=f"{args.err_batch}x{args.err_len}",
        scan=args.scan,
        load_average_start=load_average(),
    )
    log(f"device {device}, threads {torch.get_num_threads()}, {shape}, load average {os.getloadavg()}")

    variants = [("sinkhorn", {})] + ([] if args.skip_top1 else [("top1", {"train_routing": "top1"})])
    rows: list[Row] = []
    profile_rows: list[dict[str, Any]] | None = None
    for routing, overrides in variants:
        cfg = BlackMambaConfig.from_preset(args.preset, **overrides)
        err = grad_error(cfg, device, args.err_batch, args.err_len)
        log(
            f"{routing}: gradient max rel err vs ref {err['grad_max_rel_err']:.3g} ({err['grad_worst_param']}), "
            f"loss fast {err['loss_fast']:.6f} ref {err['loss_ref']:.6f}"
        )
        model = build_model(cfg, device, train=True)
        meta["params_ours"] = model.num_parameters()
        meta["active_params_ours"] = model.num_parameters(active=True)
        ids = random_ids(args.batch, args.seq_len, cfg.vocab_size, seed=1, device=device)
        step = make_step(model, ours_logits, ids, autocast)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, loss = time_steps(step, device, args.warmup, args.repeats, name=routing)
        median = statistics.median(times)
        log(f"{routing}: ours steps {[round(t, 3) for t in times]} s -> {tokens / median:,.0f} tokens/s")
        extra: dict[str, Any] = {
            "target": f"speedup >= {TARGET_SPEEDUP:g}x" if args.preset == "small" and device.type == "cpu" else None,
            "routing": routing,
            "ours_step_s": times,
            "ours_loss_last": loss,
            **err,
            "peak_rss_mib_after": peak_rss_mib(),
        }
        if device.type == "cuda":
            extra["mfu"] = 6 * meta["active_params_ours"] * tokens / median / (args.peak_tflops * 1e12)
            extra["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.profile and routing == "sinkhorn":
            table, profile_rows = profile_step(step, top=20)
            print(f"torch.profiler, one training step of ours ({shape}, {routing}):\n{table}", file=sys.stderr)
        rows.append(
            Row(
                "train_step",
                f"{shape} {routing}",
                "tokens/s",
                tokens / median,
                PEER_NAME,
                max_err=err["grad_max_rel_err"],
                extra=extra,
            )
        )
        del model, step
        gc.collect()

    meta["params_peer"] = None
    if not args.skip_peer:
        cfg = BlackMambaConfig.from_preset(args.preset)
        peer = build_jamba(cfg, device, train=True)
        meta["params_peer"] = sum(p.numel() for p in peer.parameters())
        log(f"peer built, {meta['params_peer'] / 1e6:.2f}M parameters")
        ids = random_ids(args.batch, args.seq_len, cfg.vocab_size, seed=1, device=device)
        step = make_step(peer, peer_logits, ids, autocast)
        times, loss = time_steps(step, device, args.peer_warmup, args.peer_repeats, name="peer")
        median = statistics.median(times)
        log(f"peer steps {[round(t, 3) for t in times]} s -> {tokens / median:,.0f} tokens/s")
        meta["peer_step_s"], meta["peer_loss"] = times, loss
        for row in rows:
            row.peer_value = tokens / median
        del peer, step
        gc.collect()
    mark_targets(rows, meets_target)

    if profile_rows is not None:
        meta["profile_top_ops"] = profile_rows
    meta["peak_rss_mib"] = peak_rss_mib()
    meta["load_average_end"] = load_average()
    meta["wall_s"] = elapsed_s()
    path = args.out / f"train_{device.type}.json"
    write_results(path, meta, rows, markdown(rows, meta))
    log(f"wrote {path} and {path.with_suffix('.md')}")
    print("\n".join(notes(rows, meta)) + "\n")
    print(text_table(*table_cells(rows)))


if __name__ == "__main__":
    main()
