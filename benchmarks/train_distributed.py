"""The distributed trainer's step against the plain one (run under torchrun on the device machine).

Each layout trains the same random model on the same random tokens, ``--batch`` sequences of ``--seq-len``
per GPU, for two warm-up and ``--steps`` timed steps, the step being what ``blackmamba train`` runs: bf16
autocast forward, cross-entropy, backward, gradient clipping, fused AdamW over fp32 master weights. Timing
(``--timing``):

- ``pipelined`` (the default): the timed steps run back to back, as the trainer runs them; the host reads a
  step's losses and gradient norm one step late (:class:`blackmamba.training.guard.FiniteGuard`), so it issues
  the next step while the GPU runs this one. Step time = the wall time of all timed steps over their number;
- ``synced``: each step alone, from an idle GPU to the read of its loss (median), without clipping: how the
  trainer ran before the guard; a step then also pays the host's time to issue its first kernels and the
  GPU's to finish its last.

Layouts:

- ``plain``: the model as the one-GPU trainer runs it (one process only);
- ``fsdp``: FSDP2 with bf16 compute parameters, fp32 reduction and fp32 master weights, one block per unit
  on several ranks and four on one (:func:`blackmamba.training.distributed.parallelize`, what ``--fsdp``
  applies);
- ``fsdp+epE``: FSDP2 and expert parallelism over E ranks (``--expert-parallel E``);
- options after colons: ``:reshard`` or ``:keep`` forces FSDP to free each block's gathered parameters after
  its forward (and gather them again for the backward) or to keep them (by default it reshards only when
  the parameters are sharded over more than one rank); ``:uN`` wraps N consecutive blocks per FSDP unit;
  ``:chunkcat`` leaves FSDP's reduce-scatter copy-in to PyTorch's ``torch._chunk_cat`` (by default it runs as
  ordinary copies: :func:`blackmamba.training.distributed.reduce_scatter_copy_in`); ``:rcopy`` makes FSDP copy
  the reduction's input into a separate output on one rank (by default they are one buffer there).

``--rounds R`` runs all layouts R times in turn (the host's speed drifts from minute to minute, and a layout whose
step the host paces drifts with it): a row is the median of its rounds, against the median plain step, with
every round's tokens/s and ratio to the plain step of its round. ``--host-profile`` adds the host's top functions
by own time over two more steps (cProfile).

Each row also gives the host's time to issue a step's work (``host_issue_s``: forward + backward, optimizer),
measured before anything waits for the GPU: where it nears the step time, the host sets the pace.

Rows: ``train_step`` tokens/s per GPU for each layout (shape ``2.8b/fsdp/1gpu``), against the plain step of
the same run where there is one (speedup = layout / plain: 1.0 means the wrapping costs nothing), floor =
the measured-peak matmul rate over training FLOPs per token; ``max_err`` = the largest difference of the
per-step losses from the plain run's (bf16 compute parameters against autocast of fp32 weights: close, not
equal).

    torchrun --standalone --nproc-per-node 1 -m benchmarks.train_distributed [--presets blackmamba-2.8b]
             [--layouts plain fsdp] [--batch 4] [--seq-len 2048] [--steps 5] [--rounds 1] [--profile]
             [--host-profile] [--device cpu]
    python -m benchmarks.train_distributed --readme-table benchmarks/results/distributed.json

``--device cpu`` runs the same on gloo (a check of the script on tiny presets; rows named ``Nproc``).
:mod:`benchmarks.scaling` launches this script on 1, 2, ... GPUs and adds the scaling rows.
"""

from __future__ import annotations

import cProfile
import functools
import gc
import itertools
import json
import pstats
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from blackmamba.training.distributed import (
    ParallelDims,
    init_distributed,
    is_main_process,
    launched_by_torchrun,
    mixed_precision,
    parallelize,
)
from blackmamba.training.flops import flops_per_token
from blackmamba.training.guard import FiniteGuard, StepValues
from blackmamba.training.optim import build_optimizer

from .harness import (
    H200_BF16_TFLOPS,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    meta_line,
    require_cuda,
    run_meta,
    sync,
    write_results,
)
from .train_gpu import diverged, end_step, micro_batch


class Layout(NamedTuple):
    fsdp: bool
    ep: int  # the expert-parallel degree
    reshard: bool | None  # reshard after forward (None: FSDP's default here, on when sharded over > 1 rank)
    per_unit: int | None  # blocks per FSDP unit (None: apply_fsdp's default, 4 on one rank, 1 on several)
    torch_copy_in: bool  # FSDP's reduce-scatter copy-in by torch._chunk_cat, not reduce_scatter_copy_in
    reduce_copy: bool  # on one rank, FSDP copies the reduction's input to its output (not the same buffer)


def parse_layout(name: str) -> Layout:
    """A layout name -> :class:`Layout`: ``plain`` -> (False, 1, None, None, False, False), ``fsdp`` ->
    (True, 1, None, None, False, False), ``fsdp+ep4`` -> (True, 4, None, None, False, False). Options follow
    after colons: ``:reshard`` or ``:keep`` (reshard after forward on or off; default: on when sharded over
    more than one rank), ``:uN`` (N consecutive blocks per FSDP unit), ``:chunkcat`` (the reduce-scatter
    copy-in by PyTorch's own ``torch._chunk_cat``) and ``:rcopy`` (on one rank, the reduction's output a copy
    of its input), e.g. ``fsdp:keep:u2``."""
    base, *options = name.split(":")
    bad = SystemExit(
        f"--layouts: unknown layout {name!r} (plain, fsdp or fsdp+epE, then optionally :reshard or :keep, :uN "
        f", :chunkcat and :rcopy)"
    )
    if base == "plain":
        fsdp, ep = False, 1
    elif base == "fsdp":
        fsdp, ep = True, 1
    elif base.startswith("fsdp+ep") and base[7:].isdigit() and int(base[7:]) >= 1:
        fsdp, ep = True, int(base[7:])
    else:
        raise bad
    reshard, per_unit, torch_copy_in, reduce_copy = None, None, False, False
    for option in options:
        if option in ("reshard", "keep") and fsdp:
            reshard = option == "reshard"
        elif option.startswith("u") and option[1:].isdigit() and int(option[1:]) >= 1 and fsdp:
            per_unit = int(option[1:])
        elif option == "chunkcat" and fsdp:
            torch_copy_in = True
        elif option == "rcopy" and fsdp:
            reduce_copy = True
        else:
            raise bad
    return Layout(fsdp, ep, reshard, per_unit, torch_copy_in, reduce_copy)


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor
) -> tuple[float, float, float]:
    """One optimizer step on ``ids`` (B, L+1) with the full-logits loss (the plain trainer's, when this was
    first measured); returns the loss and the host's seconds to issue the forward + backward and the
    optimizer step (before anything waits for the GPU: when they add up to the step time, the host sets
    the pace, not the GPU)."""
    t0 = time.perf_counter()
    loss = micro_batch(model, ids, "plain", 1.0)
    t1 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return loss.item(), t1 - t0, t2 - t1


def trainer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    guard: FiniteGuard,
    steps: Iterator[int],
    fsdp: bool,
) -> tuple[list[StepValues], float, float]:
    """One optimizer step as ``blackmamba train`` takes it now: :func:`train_step`'s forward and backward, then
    :func:`benchmarks.train_gpu.end_step` (clipping by the fused optimizer's step, the losses averaged over the
    ranks on the device, the non-finite guard reading one step late, the optimizer step), numbered by
    ``steps``. Returns the steps the guard read and the host's issue seconds as :func:`train_step` does."""
    t0 = time.perf_counter()
    loss = micro_batch(model, ids, "plain", 1.0)
    t1 = time.perf_counter()
    read = end_step(model, optimizer, guard, next(steps), [loss], distributed=fsdp)
    t2 = time.perf_counter()
    return read, t1 - t0, t2 - t1


def host_functions(step: Callable[[], object], device: torch.device, steps: int = 2, top: int = 25) -> list[dict]:
    """cProfile of ``steps`` more steps (each synchronised): the ``top`` functions by their own host time, in ms
    per step, with calls per step: where the host's time to issue a step goes."""
    prof = cProfile.Profile()
    for _ in range(steps):
        prof.enable()
        step()
        prof.disable()
        sync(device)
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, primitive calls, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [
        {
            "function": f"{Path(file).name}:{line}({name})",
            "calls": round(calls / steps, 1),
            "own_ms": round(own * 1e3 / steps, 3),
            "cumulative_ms": round(cum * 1e3 / steps, 3),
        }
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]


COMM_ALL_TO_ALL = re.compile(r"sendrecv|all_?to_?all", re.IGNORECASE)


def bench(
    preset: str,
    layout: str,
    batch: int,
    seq_len: int,
    steps: int,
    world: int,
    profile: bool = False,
    device: str = "cuda",
    host_profile: bool = False,
    timing: str = "pipelined",
) -> tuple[float, dict]:
    """Tokens/s per GPU (per process on CPU) of ``layout`` and the run's details (every step's loss, peak
    memory, step time, host issue time; with ``profile``, this rank's kernel time per step by part over two
    more steps, the communication split into all-to-all (expert parallelism) and the rest (FSDP's
    all-gathers and reduce-scatters, all-reduces))."""
    fsdp, ep, reshard, per_unit, torch_copy_in, reduce_copy = parse_layout(layout)
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    gc.collect()  # an FSDP model of an earlier layout lives in reference cycles: free it before measuring memory
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(preset, dev, train=True, seed=0)
    if fsdp:
        dims = ParallelDims(world, ep, fsdp=True)
        meshes = dims.build_meshes(dev.type)
        parallelize(model, meshes, mixed_precision(dev.type), reshard_after_forward=reshard, blocks_per_unit=per_unit,
                    fast_copy_in=not torch_copy_in, one_rank_in_place=not reduce_copy)  # fmt: skip
    optimizer = build_optimizer(model, 1e-4, 0.1, fused=dev.type == "cuda")
    config = model.config
    vocab = config.tokenizer_vocab_size or config.vocab_size
    # Every rank draws its own part of the global batch, the same whatever the layout.
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    ids = torch.randint(1, vocab, (batch, seq_len + 1), generator=gen).to(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses, host = [], [], []
    if timing == "synced":
        for i in range(steps + 2):
            sync(dev)
            t0 = time.perf_counter()
            loss, host_fwd_bwd, host_opt = train_step(model, optimizer, ids)
            losses.append(loss)
            if i >= 2:
                times.append(time.perf_counter() - t0)
                host.append((host_fwd_bwd, host_opt))
        one_step = functools.partial(train_step, model, optimizer, ids)
    else:
        guard = FiniteGuard(optimizer, diverged)
        one_step = functools.partial(trainer_step, model, optimizer, ids, guard, itertools.count(1), fsdp)
        for _ in range(2):  # warm-up
            losses.extend(v.loss for v in one_step()[0])
        losses.extend(v.loss for v in guard.flush())
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):  # back to back: only the guard's late reads wait for the GPU
            read, host_fwd_bwd, host_opt = one_step()
            losses.extend(v.loss for v in read)
            host.append((host_fwd_bwd, host_opt))
        losses.extend(v.loss for v in guard.flush())
        sync(dev)
        times.append((time.perf_counter() - t0) / steps)
    profiled = {}
    if host_profile:
        profiled["host_profile_top"] = host_functions(one_step, dev)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        from .train_profile import breakdown, categorize, kernels_of

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profiler(activities=activities) as prof:
            for _ in range(2):
                one_step()
            if timing != "synced":
                guard.flush()
        kernels = kernels_of(prof)
        report = breakdown(kernels, 2, top=12)
        comm = [k for k in kernels if categorize(k.name) == "communication"]
        a2a = sum(k.dur_us for k in comm if COMM_ALL_TO_ALL.search(k.name)) / 2e3
        profiled |= {
            "kernel_ms_by_part": {p: round(f["ms"], 3) for p, f in report["parts"].items()}
            | {"all": round(report["kernel_ms"], 3)},
            "communication_ms": {
                "all_to_all": round(a2a, 3),
                "fsdp_and_other": round(sum(k.dur_us for k in comm) / 2e3 - a2a, 3),
            },
            "kernel_launches_by_part": {p: round(f["launches"]) for p, f in report["parts"].items() if f["launches"]},
            "timeline_ms": {k: round(v, 3) for k, v in report["timeline"].items()},
            "top_kernels": [{**k, "name": k["name"][:120]} for k in report["top_kernels"]],
        }
    # The slowest rank sets the pace of a synchronous step.
    collective = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    step = torch.tensor(statistics.median(times), device=collective)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)
    peak = None
    if dev.type == "cuda":
        peak_t = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device=collective)
        dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
        peak = peak_t.item()
    del model, optimizer, one_step  # the step's partial holds the model too
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    tps = batch * seq_len / step.item()
    fpt = flops_per_token(config, seq_len)["train"]
    return tps, {
        "step_s": step.item(),
        "mfu": tps * fpt / (H200_BF16_TFLOPS * 1e12),
        "peak_memory_gib": peak,
        "losses": losses,
        "host_issue_s": {
            "forward_backward": statistics.median(h[0] for h in host),
            "optimizer": statistics.median(h[1] for h in host),
        },
        "floor": H200_BF16_TFLOPS * 1e12 / fpt,
        **profiled,
    }


def readme_table(path: Path) -> str:
    """A results file of this script as the README's table: every layout's median round, its ratio to the
    plain step, each round's ratio, step and host time, the host time cProfile gives ``torch._chunk_cat`` (with
    ``--host-profile``; "-" where it is not in the top functions, as with our copy-in) and, with ``--profile``,
    the GPU's kernel time per step."""
    results = json.loads(path.read_text())["results"]
    lines = [
        "| layout | tokens/s | vs plain | by round | step ms | host ms | `_chunk_cat` host ms | kernel ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        host = r["host_issue_s"]
        rounds = ", ".join(f"{v:.3f}" for v in r.get("rounds_vs_plain", [])) or "-"
        copy_in = [f["own_ms"] for f in r.get("host_profile_top", []) if "_chunk_cat" in f["function"]]
        lines.append(
            f"| {r['shape'].split('/')[1]} | {r['ours']:,.0f} | "
            f"{'-' if r.get('speedup') is None else format(r['speedup'], '.3f')} | {rounds} | "
            f"{r['step_s'] * 1e3:.0f} | {host['forward_backward'] * 1e3:.0f} + {host['optimizer'] * 1e3:.0f} | "
            f"{format(copy_in[0], '.1f') if copy_in else '-'} | "
            f"{format(r['kernel_ms_by_part']['all'], '.1f') if 'kernel_ms_by_part' in r else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--presets", nargs="+", default=["blackmamba-2.8b"], help="model shapes")
    parser.add_argument("--layouts", nargs="+", default=["plain", "fsdp"], help="plain, fsdp, fsdp+epE")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after two warm-up steps)")
    parser.add_argument("--profile", action="store_true", help="also each layout's kernel time by part (rank 0)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, to check the script")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run all layouts this many times in turn; a row gives the median round, and every round's "
        "tokens/s and ratio to the plain step of its round (the host's speed drifts between runs)",
    )
    parser.add_argument(
        "--host-profile", action="store_true", help="also cProfile two more steps: the host's top functions"
    )
    parser.add_argument(
        "--timing",
        default="pipelined",
        choices=["pipelined", "synced"],
        help="pipelined: steps back to back as the trainer takes them (gradient clipping, the non-finite guard "
        "reading each step one step late); synced: each step timed alone, from an idle GPU to its loss read",
    )
    parser.add_argument("--out", default=str(RESULTS_DIR / "distributed.json"), help="results file")
    parser.add_argument("--readme-table", metavar="FILE", help="print a results file as the README table and stop")
    args = parser.parse_args(argv)
    if args.readme_table:
        print(readme_table(Path(args.readme_table)))
        return
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.device == "cuda":
        require_cuda(parser)
    if not launched_by_torchrun():
        raise SystemExit("run under torchrun: torchrun --standalone --nproc-per-node N -m benchmarks.train_distributed")
    for layout in args.layouts:
        parse_layout(layout)
    env = init_distributed(args.device)
    world = env.world_size
    if "plain" in args.layouts and world > 1:
        raise SystemExit("the plain layout runs on one process only (launch with --nproc-per-node 1)")
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    rows = []
    for preset in args.presets:
        size = preset.removeprefix("blackmamba-")
        # Rounds run the layouts in turn, so a drift of the host's speed meets every layout alike.
        runs: dict[str, list[tuple[float, dict]]] = {layout: [] for layout in args.layouts}
        for _ in range(args.rounds):
            for layout in args.layouts:
                runs[layout].append(
                    bench(
                        preset,
                        layout,
                        args.batch,
                        args.seq_len,
                        args.steps,
                        world,
                        args.profile,
                        args.device,
                        args.host_profile,
                        args.timing,
                    )  # fmt: skip
                )
        plain = runs.get("plain")
        for layout in args.layouts:
            tps_rounds = [tps for tps, _ in runs[layout]]
            tps = statistics.median(tps_rounds)
            info = dict(sorted(runs[layout], key=lambda run: run[0])[len(tps_rounds) // 2][1])  # the median round
            compared = plain is not None and layout != "plain"
            err = None
            if compared:
                err = max(abs(a - b) for a, b in zip(info["losses"], plain[0][1]["losses"], strict=True))
            floor = info.pop("floor")
            if args.rounds > 1:
                info["rounds_tokens_per_s"] = tps_rounds
                if compared:
                    info["rounds_vs_plain"] = [t / p for t, (p, _) in zip(tps_rounds, plain, strict=True)]
            rows.append(
                Row(
                    "train_step",
                    f"{size}/{layout}/{world}{'gpu' if args.device == 'cuda' else 'proc'}",
                    "tokens/s",
                    tps,
                    peer=(
                        f"plain trainer step, same run (median of {args.rounds} rounds)"
                        if args.rounds > 1
                        else "plain trainer step, same run"
                    )
                    if compared
                    else None,
                    peer_value=statistics.median(p for p, _ in plain) if compared else None,
                    floor=floor,
                    max_err=err,
                    extra={
                        **info,
                        "gpus": world,
                        "batch_per_gpu": args.batch,
                        "seq_len": args.seq_len,
                        "rounds": args.rounds,
                        "timing": args.timing,
                    },
                )  # fmt: skip
            )
            if is_main_process():
                print(json.dumps(rows[-1].to_json()), file=sys.stderr, flush=True)
    if is_main_process():
        meta = run_meta(
            env.device,
            peak_tflops_assumed=H200_BF16_TFLOPS,
            gpus=world if args.device == "cuda" else 0,
            timing=args.timing,
        )
        write_results(Path(args.out), meta, rows)
        print(f"\n{meta_line(meta)}")
        print(
            f"{'shape':<26} {'tokens/s/GPU':>12} {'vs plain':>9} {'MFU':>7} {'step ms':>8} {'host ms':>12} "
            f"{'peak GiB':>9} {'max |dloss|':>11}"
        )
        for r in rows:
            e = r.extra
            vs = "-" if r.speedup is None else f"{r.speedup:.3f}"
            err = "-" if r.max_err is None else f"{r.max_err:.4f}"
            h = e["host_issue_s"]
            host = f"{h['forward_backward'] * 1e3:.0f}+{h['optimizer'] * 1e3:.0f}"
            peak = "n/a" if e["peak_memory_gib"] is None else f"{e['peak_memory_gib']:.1f}"
            print(
                f"{r.shape:<26} {r.ours:>12,.0f} {vs:>9} {e['mfu']:>7.1%} {e['step_s'] * 1e3:>8.1f} {host:>12} "
                f"{peak:>9} {err:>11}"
            )
        for r in rows:
            if "rounds_vs_plain" in r.extra:
                ratios = ", ".join(f"{v:.3f}" for v in r.extra["rounds_vs_plain"])
                print(f"{r.shape}: vs plain by round: {ratios}")
            for f in r.extra.get("host_profile_top", [])[:15]:
                print(f"{r.shape}: host {f['own_ms']:8.2f} ms own, {f['calls']:7.0f} calls  {f['function']}")
        for r in rows:
            if "kernel_ms_by_part" in r.extra:
                parts = ", ".join(f"{k} {v:.1f}" for k, v in r.extra["kernel_ms_by_part"].items() if v)
                line = r.extra["timeline_ms"]
                print(f"{r.shape}: kernel ms per step by part: {parts}")
                span, busy, idle = line["span_ms"], line["busy_ms"], line["idle_ms"]
                comm = r.extra["communication_ms"]
                print(f"{r.shape}: span {span:.1f} ms, busy {busy:.1f}, idle {idle:.1f}")
                print(
                    f"{r.shape}: all-to-all {comm['all_to_all']:.1f} ms, FSDP and other collectives "
                    f"{comm['fsdp_and_other']:.1f} ms"
                )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
