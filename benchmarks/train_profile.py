"""Where the time of a 2.8B training step goes: GPU kernel time by part, launches, launch gaps, wall time.

The step is :mod:`benchmarks.train_gpu`'s (bf16 autocast over fp32 master weights, Sinkhorn routing, the
loss, backward, fused AdamW), ``--accum`` micro-batches per optimizer step. After two warm-up steps it times
``--steps`` steps without the profiler (the wall time per step), then runs as many under
``torch.profiler`` and sorts every GPU kernel, copy and memset into one part by its name
(:func:`categorize`, first matching rule of :data:`CATEGORIES`):

    scan_bwd, scan_fwd, optimizer, grouped_gemm, loss_head, norm, conv, matmul, embedding, copy_cast,
    elementwise, other

The head's matmul carries a matmul kernel's name, so ``loss_head`` holds only the loss's own kernels; the
``scopes`` section adds the GPU time launched inside named ranges: the forward, the optimizer step, and the
loss (the fused :func:`blackmamba.kernels.linear_cross_entropy` with its head matmuls, or the plain
cross-entropy without them). From the kernels' start and end times: the GPU's busy time (the union of
kernel intervals), its idle time between the first and last kernel (launch gaps), and the gaps over 10 us.
Per step figures; the results go to ``results/train_profile.json`` and a markdown table beside it.

``--sources`` adds which aten op and source line issue the copy and elementwise launches (:func:`launch_sources`).

    python -m benchmarks.train_profile [--preset blackmamba-2.8b] [--batch 4] [--steps 2] [--accum 1]
                                       [--loss fused|plain] [--cast-once] [--sources]
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from blackmamba.training.optim import build_optimizer
from blackmamba.training.precision import CastOnce

from .harness import (
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    command_line,
    fmt,
    log,
    markdown_table,
    meta_line,
    random_ids,
    require_cuda,
    run_meta,
    text_table,
    write_results,
)
from .train_gpu import micro_batch

# (part, pattern) in order: a kernel belongs to the first part whose pattern its lower-cased name matches.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("communication", r"nccl|all_?gather|reduce_?scatter|all_?to_?all|all_?reduce|broadcast"),
    ("scan_bwd", r"scan_bwd|selective_scan_bwd"),
    ("scan_fwd", r"scan_fwd|selective_scan_fwd"),
    ("optimizer", r"adam|multi_tensor_apply"),
    ("grouped_gemm", r"grouped|groupproblemshape|_fc1_gated|_fc2_dgrad"),
    ("loss_head", r"cross_entropy|log_softmax|softmax|nll_loss|logsumexp"),
    ("norm", r"rms_norm|layer_norm|layernorm|gammabeta|norm_fwd|norm_bwd|_norm_"),
    ("conv", r"conv1d|causal_conv|conv_update"),
    ("matmul", r"gemm|gemv|cutlass|nvjet|xmma|cublas|matmul|splitk|sm90_|wgmma"),
    ("embedding", r"embedding|compute_grad_weight|sum_and_scatter|krn_partials"),
    (
        "copy_cast",
        r"copy|memcpy|memset|fill|cat_?array|index_select|indexselect|gather|scatter|index_put|index_copy"
        r"|index_elementwise",
    ),
    ("elementwise", r"elementwise|reduce|triton_"),
)
PARTS = tuple(name for name, _ in CATEGORIES) + ("other",)
_COMPILED = tuple((name, re.compile(pattern)) for name, pattern in CATEGORIES)
# Named ranges whose launched GPU time is reported (see the module docstring).
SCOPES = {
    "forward": "train::forward",
    "fused_loss": "linear_cross_entropy",
    "plain_loss": "train::cross_entropy",
    "optimizer": "train::optimizer",
}
GAP_US = 10.0


@dataclass(frozen=True)
class Kernel:
    """One GPU activity (kernel, copy or memset): its name, start and duration in microseconds."""

    name: str
    start_us: float
    dur_us: float


def categorize(name: str) -> str:
    """The part of the step a GPU kernel belongs to, from its name (see :data:`CATEGORIES`)."""
    low = name.lower()
    for part, pattern in _COMPILED:
        if pattern.search(low):
            return part
    return "other"


def timeline(kernels: Sequence[Kernel], gap_us: float = GAP_US) -> dict[str, float]:
    """Busy time (union of the kernels' intervals), idle time between the first start and the last end,
    the span, and the count and total of idle gaps longer than ``gap_us``; all in microseconds."""
    if not kernels:
        return {"span_us": 0.0, "busy_us": 0.0, "idle_us": 0.0, "gaps_over": 0, "gaps_over_us": 0.0}
    ordered = sorted(kernels, key=lambda k: k.start_us)
    busy = idle = long_gaps = long_total = 0.0
    lo, hi = ordered[0].start_us, ordered[0].start_us + ordered[0].dur_us
    first = lo
    for k in ordered[1:]:
        end = k.start_us + k.dur_us
        if k.start_us > hi:
            busy += hi - lo
            gap = k.start_us - hi
            idle += gap
            if gap > gap_us:
                long_gaps, long_total = long_gaps + 1, long_total + gap
            lo, hi = k.start_us, end
        else:
            hi = max(hi, end)
    busy += hi - lo
    return {"span_us": hi - first, "busy_us": busy, "idle_us": idle, "gaps_over": long_gaps, "gaps_over_us": long_total}


def breakdown(kernels: Iterable[Kernel], steps: int, top: int = 25) -> dict[str, Any]:
    """Per step: milliseconds and launches of each part, their shares of the summed kernel time, the
    timeline figures (:func:`timeline`) and the ``top`` kernels by time."""
    kernels = list(kernels)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    time_us, launches = Counter(), Counter()
    by_name_us, by_name_n, part_of = Counter(), Counter(), {}
    for k in kernels:
        part = part_of.setdefault(k.name, categorize(k.name))
        time_us[part] += k.dur_us
        launches[part] += 1
        by_name_us[k.name] += k.dur_us
        by_name_n[k.name] += 1
    total = sum(time_us.values())
    parts = {
        p: {
            "ms": time_us[p] / 1e3 / steps,
            "launches": launches[p] / steps,
            "share": time_us[p] / total if total else 0.0,
        }
        for p in PARTS
    }
    line = {
        k.replace("_us", "_ms"): (v / 1e3 if k.endswith("_us") else v) / steps for k, v in timeline(kernels).items()
    }
    tops = [
        {"name": n, "part": part_of[n], "ms": t / 1e3 / steps, "launches": by_name_n[n] / steps}
        for n, t in by_name_us.most_common(top)
    ]
    return {
        "kernel_ms": total / 1e3 / steps,
        "launches": len(kernels) / steps,
        "parts": parts,
        "timeline": line,
        "top_kernels": tops,
    }


def is_range(name: str) -> bool:
    """A named range (``record_function``, the optimizer's own) that the profiler mirrors on the GPU track:
    it spans kernels, it is not one."""
    return name in SCOPES.values() or name.startswith(("Optimizer.step#", "train::"))


def kernels_of(prof: torch.profiler.profile) -> list[Kernel]:
    """Every GPU activity of a finished profile, without the ranges mirrored on the GPU track."""
    return [
        Kernel(e.name, e.time_range.start, e.time_range.elapsed_us())
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and not is_range(e.name)
    ]


def without_ranges(report: dict) -> dict:
    """A report written before :func:`kernels_of` left the ranges out, corrected from its own records: each
    range appears once in ``top_kernels`` (one per step, and longer than any kernel), so its time and count
    come off its part and the totals. The timeline cannot be corrected (a range covers the gaps inside it):
    its idle time stays a lower bound, which the report says."""
    ranges = [k for k in report["top_kernels"] if is_range(k["name"])]
    parts = {p: dict(f) for p, f in report["parts"].items()}
    for k in ranges:
        parts[k["part"]]["ms"] -= k["ms"]
        parts[k["part"]]["launches"] -= k["launches"]
    total = sum(f["ms"] for f in parts.values())
    for f in parts.values():
        f["share"] = f["ms"] / total if total else 0.0
    scopes = dict(report["scopes_ms"])
    scopes["backward_and_rest"] = total - scopes["forward"] - scopes["optimizer"]
    return {
        **report,
        "parts": parts,
        "kernel_ms": total,
        "launches": report["launches"] - sum(k["launches"] for k in ranges),
        "top_kernels": [k for k in report["top_kernels"] if not is_range(k["name"])],
        "scopes_ms": scopes,
        "ranges_removed": [k["name"] for k in ranges],
        "timeline_note": "written with the ranges counted as GPU activity: idle time is a lower bound",
    }


def _frame(event: Any, fragment: str) -> str | None:
    """The source of one profiler event under ``fragment``: a frame of its recorded stack, or its own name
    where it is a Python function event ("path(line): function"), from the fragment on."""
    for frame in [*(event.stack or ()), event.name]:
        at = frame.find(fragment)
        if at >= 0:
            return frame[at:]
    return None


def _python_source(event: Any, fragment: str) -> str | None:
    """The innermost source under ``fragment`` of ``event`` or of the events around it."""
    node = event
    while node is not None:
        src = _frame(node, fragment)
        if src is not None:
            return src
        node = node.cpu_parent
    return None


def launch_sources(
    events: Iterable[Any],
    steps: int,
    parts: Sequence[str] = ("copy_cast", "elementwise"),
    fragment: str = "blackmamba/",
    top: int = 40,
) -> list[dict[str, Any]]:
    """Which code issues the launches of ``parts``: GPU kernels (leaf aten ops where nothing ran on a GPU)
    counted per (part, outermost aten op, source), per step, from a profile recorded ``with_stack``. An op's
    source is the innermost Python function under ``fragment`` around it (the profiler names a function by
    its file and first line); an op of the backward (the autograd engine's node, no Python around it) takes
    the source of the forward op with its sequence number, marked "(backward)"."""
    events = list(events)
    forward_source: dict[int, str] = {}
    for e in events:
        if e.name.startswith("aten::") and e.sequence_nr >= 0:
            src = _python_source(e, fragment)
            if src is not None:
                forward_source.setdefault(e.sequence_nr, src)

    def source_of(e: Any) -> str:
        node = e
        while node is not None:
            src = _frame(node, fragment)
            if src is not None:
                return src
            if not node.name.startswith("aten::") and node.sequence_nr in forward_source:
                return forward_source[node.sequence_nr] + " (backward)"
            node = node.cpu_parent
        return "(no source)"

    def aten_of(e: Any) -> str:
        node, name = e, e.name
        while node is not None:  # the outermost aten op around e
            if node.name.startswith("aten::"):
                name = node.name
            node = node.cpu_parent
        return name

    counts: Counter = Counter()
    time_us: Counter = Counter()
    on_gpu = any(e.kernels for e in events)
    for e in events:
        if on_gpu:
            launched = [(categorize(k.name), k.duration) for k in e.kernels]
        elif e.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in e.cpu_children):
            launched = [(categorize(e.name), 0.0)]  # a leaf op: where a kernel would run
        else:
            launched = []
        for part, dur in launched:
            if part in parts:
                key = (part, aten_of(e), source_of(e))
                counts[key] += 1
                time_us[key] += dur
    return [
        {"part": part, "op": op, "source": src, "launches": n / steps, "ms": time_us[(part, op, src)] / steps / 1e3}
        for (part, op, src), n in counts.most_common(top)
    ]


def scopes_of(prof: torch.profiler.profile, steps: int) -> dict[str, float]:
    """GPU milliseconds per step launched inside each range of :data:`SCOPES` (ranges of the main thread; the
    backward, which autograd runs on its device thread, is what the forward and the optimizer leave)."""
    totals = Counter()
    names = {v: k for k, v in SCOPES.items()}
    for e in prof.events():
        if e.name in names and e.device_type == torch.autograd.DeviceType.CPU:
            totals[names[e.name]] += e.device_time_total
    return {k: totals[k] / 1e3 / steps for k in SCOPES}


def run_steps(opt, call, batches, accum: int, steps: int, loss: str) -> list[float]:
    """``steps`` optimizer steps of ``accum`` micro-batches; wall seconds of each (device-synchronised)."""
    from torch.profiler import record_function

    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for m in range(accum):
            micro_batch(call, batches[(i * accum + m) % len(batches)], loss, 1.0 / accum)
        with record_function(SCOPES["optimizer"]):
            opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--preset", default="blackmamba-2.8b", help="model shape")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=2, help="steps timed, then as many profiled")
    parser.add_argument("--loss", default="fused", choices=["fused", "plain"], help="head + loss variant")
    parser.add_argument("--cast-once", action="store_true", help="bf16 weight casts once per optimizer step")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_profile.json"), help="results file")
    parser.add_argument(
        "--sources",
        action="store_true",
        help="also attribute the copy and elementwise launches to the source lines that issue them (a profile "
        "with Python stacks: its figures go to launch_sources, the timings stay from the plain profile)",
    )
    parser.add_argument(
        "--correct",
        metavar="FILE",
        help="rewrite a results file written before named ranges were left out of the kernel sums, and exit",
    )
    args = parser.parse_args(argv)
    require_cuda(parser)
    if args.correct:
        saved = json.loads(Path(args.correct).read_text())
        if "ranges_removed" in saved["profile"]:
            raise SystemExit(f"{args.correct}: already corrected")
        meta = {**saved["meta"], "corrected_by": command_line()}
        meta.setdefault("shape", saved["results"][0]["shape"])
        publish(without_ranges(saved["profile"]), meta, Path(args.correct))
        return
    if min(args.batch, args.seq_len, args.accum, args.steps) < 1:
        parser.error("--batch, --seq-len, --accum and --steps must be >= 1")
    from torch.profiler import ProfilerActivity, profile

    model = build_model(args.preset, "cuda", train=True)
    vocab = model.config.tokenizer_vocab_size or model.config.vocab_size
    batches = [random_ids(args.batch, args.seq_len + 1, vocab, seed, "cuda") for seed in range(args.accum)]
    opt = build_optimizer(model, 0.0, 0.1, fused=True)  # lr 0: the same work, the weights stay put
    call = CastOnce(model, opt) if args.cast_once else model
    log("warm-up")
    run_steps(opt, call, batches, args.accum, 2, args.loss)
    wall = run_steps(opt, call, batches, args.accum, args.steps, args.loss)
    log("profiling")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        profiled = run_steps(opt, call, batches, args.accum, args.steps, args.loss)
    log("reading the profile")
    report = breakdown(kernels_of(prof), args.steps)
    report["scopes_ms"] = scopes_of(prof, args.steps)
    scoped = report["scopes_ms"]["forward"] + report["scopes_ms"]["optimizer"]
    report["scopes_ms"]["backward_and_rest"] = report["kernel_ms"] - scoped
    if args.sources:
        log("profiling with Python stacks")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as stacked:
            run_steps(opt, call, batches, args.accum, args.steps, args.loss)
        report["launch_sources"] = launch_sources(stacked.events(), args.steps)
    report["wall_ms"] = 1e3 * statistics.median(wall)
    report["profiled_wall_ms"] = 1e3 * statistics.median(profiled)

    shape = f"{args.preset.removeprefix('blackmamba-')}/{args.batch}x{args.seq_len}" + (
        f"x{args.accum}" if args.accum > 1 else ""
    )
    variant = args.loss + ("+cast-once" if args.cast_once else "")
    meta = run_meta("cuda", preset=args.preset, variant=variant, steps=args.steps, accum=args.accum, shape=shape)
    publish(report, meta, Path(args.out))


def publish(report: dict, meta: dict, out: Path) -> None:
    """Rows, the markdown beside them and the printed tables of one profile report."""
    shape, variant = meta["shape"], meta["variant"]
    rows = [Row("train_step_wall", shape, "ms", report["wall_ms"], extra={"variant": variant})]
    for part, figures in report["parts"].items():
        rows.append(Row(f"train_kernels:{part}", shape, "ms", figures["ms"], extra={"variant": variant, **figures}))
    line = report["timeline"]
    rows.append(Row("train_gpu_idle", shape, "ms", line["idle_ms"], extra={"variant": variant, **line}))
    head = ["part", "ms per step", "share", "launches"]
    body = [[p, fmt(f["ms"]), f"{f['share']:.1%}", fmt(f["launches"])] for p, f in report["parts"].items()]
    body += [
        ["all kernels", fmt(report["kernel_ms"]), "100%", fmt(report["launches"])],
        ["GPU idle between kernels", fmt(line["idle_ms"]), "", f"{fmt(line['gaps_over'])} gaps > {GAP_US:g} us"],
        ["wall (unprofiled)", fmt(report["wall_ms"]), "", ""],
    ]
    scopes = [[k, fmt(v)] for k, v in report["scopes_ms"].items()]
    notes = [report["timeline_note"]] if "timeline_note" in report else []
    markdown = "\n\n".join(
        [
            f"{meta_line(meta)}; {shape}, {variant}",
            markdown_table(head, body),
            markdown_table(["scope", "GPU ms per step"], scopes),
            *notes,
        ]
    )
    write_results(out, meta, rows, markdown + "\n", profile=report)
    if report.get("launch_sources"):
        sources = [
            [t["part"], t["op"], t["source"][:90], fmt(t["launches"]), fmt(t["ms"])] for t in report["launch_sources"]
        ]
        print(text_table(["part", "aten op", "source", "launches per step", "ms per step"], sources) + "\n")
    tops = [[t["name"][:80], t["part"], fmt(t["ms"]), fmt(t["launches"])] for t in report["top_kernels"]]
    print(f"\n{meta_line(meta)}; {shape}, {variant}\n")
    print(text_table(["kernel", "part", "ms per step", "launches"], tops))
    print()
    print(text_table(["scope", "GPU ms per step"], scopes))
    print()
    print(text_table(head, body))


if __name__ == "__main__":
    main()
