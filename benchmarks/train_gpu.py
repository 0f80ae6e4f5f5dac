"""Training throughput and MFU of the released shapes on one GPU (run on the device machine).

A micro-batch = forward of (batch, 2048) random token ids under bf16 autocast (fp32 master weights, as
``blackmamba train`` does on GPU), the loss (plus the router losses), backward. Train-mode routing is
Sinkhorn. Two kinds of row per shape, from the same run:

* ``1.5b/4x2048``: one micro-batch per optimizer step (forward, backward, fused AdamW step), as before;
* benchmark ``train_step_accum8``, shape ``1.5b/4x2048`` (with ``--accum 8``): eight micro-batches, each on
  other ids, then one AdamW step; its tokens/s and MFU are per optimizer step (64K tokens at batch 4), so the
  optimizer is paid once per eight.

Variants (``--variants``, each measured on the same model): ``plain`` computes the whole (B*L, V) logits
and ``F.cross_entropy`` on them in fp32, as the trainer did; ``fused`` the chunked head + loss
(``model(x, targets=y)``, :func:`blackmamba.kernels.linear_cross_entropy`), as it does now;
``fused+cast-once`` adds the bf16 weight casts made once per optimizer step
(:class:`blackmamba.training.precision.CastOnce`, ``blackmamba train --cast-once``); ``fused+compile`` runs
the model through ``torch.compile`` (``blackmamba train --compile``; the compilation happens in the
warm-up steps, which are not timed).

Timing (``--timing``): ``pipelined`` (the default) runs the timed steps back to back as ``blackmamba train``
does, each ending as the trainer's (gradient clipping to norm 1 by the fused optimizer's step, the non-finite
guard that reads a step's losses one step late: :func:`end_step`); a step's time is their wall time over
their number. ``synced`` times each step alone, from an idle GPU to its end, without clipping (the median):
how this script timed before the trainer stopped waiting for the GPU at every step.

Reported: tokens/s, MFU = tokens/s x training FLOPs per
token (``blackmamba.training.flops``) / peak (784 TFLOP/s, the bf16 matmul rate measured on the H200), peak
memory, and the loss of the first micro-batch (the same ids and weights in every row: the optimizer's
learning rate is zero, so the variants' losses can be compared). The default backend ("auto") runs the Triton kernels;
``--backend torch`` the plain PyTorch path. ``--device cpu --presets tiny`` checks the script on a CPU.

    python -m benchmarks.train_gpu [--presets blackmamba-1.5b blackmamba-2.8b] [--batch 4] [--steps 5]
                                   [--accum 8] [--accum-steps 3] [--variants plain fused fused+cast-once]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from blackmamba import BlackMamba
from blackmamba.kernels import use_backend
from blackmamba.training.distributed import all_reduce_sum, world_size
from blackmamba.training.flops import flops_per_token
from blackmamba.training.guard import FiniteGuard, StepValues
from blackmamba.training.optim import build_optimizer, clip_gradients
from blackmamba.training.precision import CastOnce

from .harness import (
    H200_BF16_TFLOPS,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    log,
    meta_line,
    random_ids,
    run_meta,
    sync,
    write_results,
)

PEAK_TFLOPS = H200_BF16_TFLOPS
VARIANTS = ("plain", "fused", "fused+cast-once", "fused+compile")


def micro_batch(call: Callable, ids: torch.Tensor, loss_kind: str, scale: float) -> torch.Tensor:
    """Forward and backward of one micro-batch (ids (B, L+1)); the backward of objective x ``scale``. The
    named ranges are for :mod:`benchmarks.train_profile`."""
    x, y = ids[:, :-1], ids[:, 1:]
    with record_function("train::forward"), torch.autocast(ids.device.type, dtype=torch.bfloat16):
        if loss_kind == "plain":
            out = call(x)
            with record_function("train::cross_entropy"):
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
        else:
            out = call(x, targets=y)
            loss = out.loss
        objective = loss if out.aux_loss is None else loss + out.aux_loss
    with record_function("train::backward"):
        (objective * scale).backward()
    return loss.detach()


def end_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    guard: FiniteGuard,
    step: int,
    losses: list[torch.Tensor],
    distributed: bool = False,
) -> list[StepValues]:
    """The end of optimizer step ``step`` as ``blackmamba train`` takes it: the gradients clipped to norm 1
    (:func:`blackmamba.training.optim.clip_gradients`: by the fused optimizer's step), the micro-batches' mean
    loss averaged over the ranks on the device, the non-finite guard (:class:`FiniteGuard`: with fused AdamW
    the host reads a step's values one step late), the optimizer step. Returns the steps the guard read."""
    norm = clip_gradients(optimizer, [p for p in model.parameters() if p.grad is not None], 1.0, distributed)
    loss = torch.stack(losses).double().mean()
    means = torch.stack([loss, torch.zeros_like(loss), loss])  # micro_batch gives the cross-entropy alone
    if world_size() > 1:
        means = all_reduce_sum(means) / world_size()
    read = guard.check(step, torch.cat([means, norm.double().reshape(1).to(means.device)]))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return read + guard.settle()


def diverged(what: str, values: StepValues) -> Exception:
    return RuntimeError(f"non-finite {what} at step {values.step}")


def measure(
    model: BlackMamba,
    variant: str,
    batches: list[torch.Tensor],
    accum: int,
    steps: int,
    warmup: int,
    timing: str = "pipelined",
) -> dict[str, float | None]:
    """Seconds of an optimizer step of ``accum`` micro-batches, peak memory and the first loss. ``synced``:
    the median of ``steps`` steps, each from an idle GPU to its end, without clipping; ``pipelined``: ``steps``
    steps back to back as the trainer runs them (:func:`end_step`), their wall time over their number."""
    device = batches[0].device
    # A zero learning rate leaves the weights as they were (the fused step's work is the same), so every
    # variant and row starts from the same model and their first losses are comparable.
    opt = build_optimizer(model, 0.0, 0.1, fused=device.type == "cuda")
    call: Callable = model
    if variant.endswith("cast-once"):
        call = CastOnce(model, opt)
    elif variant.endswith("compile"):
        call = torch.compile(model)
    loss_kind = "plain" if variant == "plain" else "fused"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    guard = FiniteGuard(opt, diverged)

    def step(i: int) -> None:
        nonlocal first
        losses = []
        for m in range(accum):
            losses.append(micro_batch(call, batches[(i * accum + m) % len(batches)], loss_kind, 1.0 / accum))
            first = losses[0] if first is None else first
        if timing == "synced":
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            end_step(model, opt, guard, i + 1, losses)

    times, first = [], None
    for i in range(warmup):
        step(i)
    guard.flush()
    if timing == "synced":
        for i in range(warmup, warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            step(i)
            sync(device)
            times.append(time.perf_counter() - t0)
    else:
        sync(device)
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        guard.flush()
        sync(device)
        times.append((time.perf_counter() - t0) / steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if isinstance(call, CastOnce):
        call.remove()
    return {"step_s": statistics.median(times), "peak_memory_gib": peak, "first_loss": float(first)}


def bench(preset: str, args) -> list[Row]:
    device = torch.device(args.device)
    model = build_model(preset, device, train=True)
    config = model.config
    vocab = config.tokenizer_vocab_size or config.vocab_size
    batches = [random_ids(args.batch, args.seq_len + 1, vocab, seed, device) for seed in range(max(1, args.accum))]
    fpt = flops_per_token(config, args.seq_len)["train"]
    name = preset.removeprefix("blackmamba-")
    plans = [(1, args.steps, 2)] + ([(args.accum, args.accum_steps, 1)] if args.accum > 1 else [])
    rows = []
    for variant in args.variants:
        for accum, steps, warmup in plans:
            log(f"{preset} {variant} {args.batch}x{args.seq_len} x{accum}")
            m = measure(model, variant, batches, accum, steps, warmup, args.timing)
            tokens = args.batch * args.seq_len * accum
            tps = tokens / m["step_s"]
            shape = f"{name}/{args.batch}x{args.seq_len}"
            benchmark = "train_step" if accum == 1 else f"train_step_accum{accum}"
            extra = {"variant": variant, "micro_batches": accum, "tokens_per_step": tokens, "timing": args.timing, **m}
            extra["mfu"] = tps * fpt / (PEAK_TFLOPS * 1e12)
            rows.append(Row(benchmark, shape, "tokens/s", tps, floor=PEAK_TFLOPS * 1e12 / fpt, extra=extra))
            print(json.dumps(rows[-1].to_json()), file=sys.stderr, flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"], help="model shapes")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed one-micro-batch steps (after two warm-up steps)")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step of the extra rows")
    parser.add_argument("--accum-steps", type=int, default=3, help="timed accumulated steps (after one warm-up)")
    parser.add_argument("--variants", nargs="+", default=["fused"], choices=VARIANTS, help="loss and cast variants")
    parser.add_argument(
        "--timing",
        default="pipelined",
        choices=["pipelined", "synced"],
        help="pipelined: timed steps back to back as the trainer runs them (clipping, the late-reading "
        "non-finite guard); synced: each step alone from an idle GPU, without clipping (the timing before)",
    )
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to check the script on a tiny preset")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_gpu.json"), help="results file")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="kernel backend")
    args = parser.parse_args(argv)
    if min(args.batch, args.seq_len, args.steps, args.accum, args.accum_steps) < 1:
        parser.error("--batch, --seq-len, --steps, --accum and --accum-steps must be >= 1")
    rows = []
    for preset in args.presets:
        with use_backend(args.backend):
            rows.extend(bench(preset, args))
    meta = run_meta(
        args.device, peak_tflops_assumed=PEAK_TFLOPS, backend=args.backend, variants=args.variants, timing=args.timing
    )
    write_results(Path(args.out), meta, rows)
    print(f"\n{meta_line(meta)}")
    print(
        f"{'benchmark':<18} {'shape':<14} {'variant':<16} {'tokens/s':>10} {'MFU':>7} {'step s':>8} {'peak GiB':>9} "
        f"{'first loss':>10}"
    )
    for r in rows:
        e = r.extra
        peak = "n/a" if e["peak_memory_gib"] is None else f"{e['peak_memory_gib']:.1f}"
        print(
            f"{r.benchmark:<18} {r.shape:<14} {e['variant']:<16} {r.ours:>10,.0f} {e['mfu']:>7.1%} {e['step_s']:>8.3f} "
            f"{peak:>9} {e['first_loss']:>10.3f}"
        )


if __name__ == "__main__":
    main()
