"""Where the time of one CUDA-graph decode step goes: launches per step, kernel time, top kernels.

Random bf16 weights of a preset shape (``--fp8``: quantized to fp8 weight-only); the step is replayed from
its graph back to back (no host read per step, unlike benchmarks/generate.py, which times what a caller
sees). For each batch and each variant (``--variants``: kernel settings such as the MoE layer's
decode_tokens, 0 = the general sorted path; see blackmamba.kernels.KernelSettings) it prints the replay
time per step, tokens/s, the kernels per step and their summed GPU time, and the kernels that take the
most time; then the same for one B x N prefill (``--prefill``, ``--prefill-batch``), with its wall time
against its kernel time. Results go to
benchmarks/results/profile_decode.json.

    python -m benchmarks.tune.profile_decode [--preset 2.8b] [--batches 1 16]
                                             [--variants default 'decode_tokens=0;fuse_router=0']
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from blackmamba import BlackMamba
from blackmamba.generation.decoder import Decoder, SamplingOptions
from blackmamba.kernels import get_settings, use_settings
from blackmamba.kernels.settings import FIELDS
from blackmamba.layers.quant import quantize_fp8

from ..harness import (
    BF16,
    RESULTS_DIR,
    argument_parser,
    build_model,
    cuda_event_us,
    fmt,
    require_cuda,
    run_meta,
    text_table,
    write_json,
)


def parse_variant(variant: str) -> dict:
    """'decode_tokens=0;fuse_router=0' -> settings changes, typed like the defaults. The older spelling
    'moe_decode.DECODE_TOKENS=0' names the same field. A table setting takes JSON, its keys read as ints:
    'ssm_update_tiles={"16": {"BLOCK_D": 32, "ROWS": 1, "num_warps": 1}}'."""
    changes = {}
    for setting in [] if variant == "default" else variant.split(";"):
        name, _, value = setting.partition("=")
        name = name.rsplit(".", 1)[-1].lower()
        if name not in FIELDS:
            raise ValueError(f"--variants: no kernel setting {name!r}; settings: {', '.join(FIELDS)}")
        default = getattr(get_settings(), name)
        if isinstance(default, Mapping):
            try:
                changes[name] = {int(k): v for k, v in json.loads(value).items()}
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"--variants: {name} wants a JSON object with integer keys, got {value!r}") from exc
        elif isinstance(default, bool):
            changes[name] = bool(int(value))
        elif isinstance(default, int) or value != "auto":
            changes[name] = int(value)
        else:
            changes[name] = value
    return changes


def replay_us(decoder: Decoder, slot, steps: int) -> float:
    """Microseconds per decode step, ``steps`` graph replays back to back after 10 warm-up steps."""
    return cuda_event_us(lambda: decoder.step(slot, None), steps, warmup=10)


def kernels_per_call(fn, calls: int = 5) -> dict[str, tuple[float, float]]:
    """name -> (launches per call of ``fn``, GPU microseconds per call), from the profiler's CUDA activity."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    count, time_us = collections.Counter(), collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith(("Memcpy", "Memset")):
            count[ev.name] += 1
            time_us[ev.name] += ev.device_time
    return {name: (count[name] / calls, time_us[name] / calls) for name in count}


def prefill_profile(model: BlackMamba, length: int, batch: int = 1) -> tuple[dict, list]:
    """One ``batch`` x ``length`` prefill (logits of the last position): wall time, kernel time, launches,
    top kernels."""
    ids = torch.randint(0, 50000, (batch, length), device="cuda")

    @torch.inference_mode()
    def run():
        model(ids, cache=model.allocate_cache(batch), num_last_tokens=1)

    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    wall_us = 1e6 * (time.perf_counter() - start) / 5
    kernels = kernels_per_call(run, 3)
    row = dict(prefill=f"{batch}x{length}", wall_us=wall_us, launches=sum(n for n, _ in kernels.values()),
               kernel_us=sum(t for _, t in kernels.values()))  # fmt: skip
    return row, sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--preset", default="2.8b", choices=["2.8b", "1.5b"], help="model shape")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64], help="decode batch sizes")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        help="kernel settings per run, e.g. 'decode_tokens=0;fuse_router=0'",
    )
    parser.add_argument("--steps", type=int, default=200, help="graph replays timed per batch")
    parser.add_argument("--prefill", type=int, default=2048, help="also profile a B x N prefill (0: skip)")
    parser.add_argument("--prefill-batch", type=int, default=1, help="B, the prompts in that prefill")
    parser.add_argument("--fp8", action="store_true", help="quantize the model to fp8 weights first (layers/quant.py)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "profile_decode.json"), help="results file")
    args = parser.parse_args(argv)
    require_cuda(parser)
    model = build_model(f"blackmamba-{args.preset}", "cuda", BF16)
    if args.fp8:
        quantize_fp8(model)
    if args.prefill_batch < 1:
        parser.error(f"--prefill-batch must be at least 1, got {args.prefill_batch}")
    rows, top = [], None
    try:
        variants = {variant: parse_variant(variant) for variant in args.variants}
    except ValueError as exc:
        parser.error(str(exc))
    for variant, changes in variants.items():
        for batch in args.batches:
            with use_settings(**changes):
                decoder = Decoder(model, SamplingOptions(), use_graphs=True)  # a fresh graph per setting
                slot = decoder.start(
                    model.allocate_cache(batch), torch.randint(0, 50000, (batch,), device="cuda"), None
                )
                us = replay_us(decoder, slot, args.steps)
                kernels = kernels_per_call(lambda decoder=decoder, slot=slot: decoder.step(slot, None))
            launches = sum(n for n, _ in kernels.values())
            busy = sum(t for _, t in kernels.values())
            batch_top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:20]
            rows.append(
                dict(preset=args.preset, weights="fp8" if args.fp8 else "bf16", batch=batch, variant=variant,
                     us_per_step=us, tokens_per_s=batch * 1e6 / us, launches_per_step=launches, kernel_us_per_step=busy,
                     top_kernels=batch_top)
            )  # fmt: skip
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "top_kernels"}), flush=True)
            print(f"top kernels, batch {batch}, {variant}:")
            print(text_table(["kernel", "per step", "us per step"],
                             [[n[:90], fmt(c), fmt(t)] for n, (c, t) in batch_top]), flush=True)  # fmt: skip
            if top is None:
                top = batch_top
    print()
    cols = ["preset", "weights", "batch", "variant", "us_per_step", "tokens_per_s", "launches_per_step",
            "kernel_us_per_step"]  # fmt: skip
    print(text_table(cols, [[r[c] if isinstance(r[c], str) else fmt(r[c]) for c in cols] for r in rows]))
    prefill = prefill_top = None
    if args.prefill:
        prefill, prefill_top = prefill_profile(model, args.prefill, args.prefill_batch)
        print(f"\nprefill {prefill['prefill']}: {fmt(prefill['wall_us'])} us wall, {fmt(prefill['kernel_us'])} us in "
              f"{fmt(prefill['launches'])} kernels")  # fmt: skip
        print(
            text_table(["kernel", "per call", "us per call"], [[n[:90], fmt(c), fmt(t)] for n, (c, t) in prefill_top])
        )
    report = dict(meta=run_meta("cuda"), rows=rows, top_kernels=top, prefill=prefill, prefill_top_kernels=prefill_top)
    write_json(Path(args.out), report)


if __name__ == "__main__":
    main()
