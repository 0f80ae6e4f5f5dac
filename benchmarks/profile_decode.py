"""Where the time of one CUDA-graph decode step goes: launches per step, kernel time, top kernels.

Random bf16 weights of a preset shape; the step is replayed from its graph back to back (no host read
per step, unlike benchmarks/generate.py, which times what a caller sees). For each batch and each
variant (``--variants``: module settings such as the MoE layer's DECODE_TOKENS, 0 = the general sorted
path) it prints the replay time per step, tokens/s, the kernels per step and their summed GPU time, then the
kernels that take the most time in the first variant; then the same for one 1 x N prefill
(``--prefill``), with its wall time against its kernel time. Results go to benchmarks/results/profile_decode.json.

    python benchmarks/profile_decode.py [--preset 2.8b] [--batches 1 16] [--variants default 'a.B=0;c.D=1']
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fmt, text_table  # noqa: E402
from blackmamba import BlackMamba, BlackMambaConfig  # noqa: E402
from blackmamba.generation.decoder import Decoder, SamplingOptions  # noqa: E402
from blackmamba.kernels import decode_step, moe_decode  # noqa: E402
from blackmamba.model import cast_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODULES = {"moe_decode": moe_decode, "decode_step": decode_step}  # what --variants may set


def build(preset: str) -> BlackMamba:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BlackMamba(BlackMambaConfig.from_preset(f"blackmamba-{preset}"))
    return cast_model(model, torch.bfloat16).eval()


def replay_us(decoder: Decoder, slot, steps: int) -> float:
    for _ in range(10):
        decoder.step(slot, None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        decoder.step(slot, None)
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / steps


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


def prefill_profile(model: BlackMamba, length: int) -> tuple[dict, list]:
    """One 1 x ``length`` prefill (logits of the last position): wall time, kernel time, launches, top kernels."""
    ids = torch.randint(0, 50000, (1, length), device="cuda")

    @torch.inference_mode()
    def run():
        model(ids, cache=model.allocate_cache(1), num_last_tokens=1)

    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    wall_us = 1e6 * (time.perf_counter() - start) / 5
    kernels = kernels_per_call(run, 3)
    row = dict(prefill=f"1x{length}", wall_us=wall_us, launches=sum(n for n, _ in kernels.values()),
               kernel_us=sum(t for _, t in kernels.values()))  # fmt: skip
    return row, sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="2.8b", choices=["2.8b", "1.5b"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["default"],
        help="settings per run, e.g. 'moe_decode.DECODE_TOKENS=0'",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prefill", type=int, default=2048, help="also profile a 1 x N prefill (0: skip)")
    parser.add_argument("--out", default=str(RESULTS / "profile_decode.json"))
    args = parser.parse_args()
    model = build(args.preset)
    rows, top = [], None
    defaults = {}
    for variant in args.variants:
        for name, value in defaults.items():  # undo the previous variant
            setattr(*name, value)
        for setting in [] if variant == "default" else variant.split(";"):
            path, value = setting.split("=")
            module, attr = path.rsplit(".", 1)
            if module not in MODULES or not hasattr(MODULES[module], attr):
                parser.error(f"--variants: no setting {path!r}; modules: {', '.join(MODULES)}")
            target = MODULES[module]
            defaults.setdefault((target, attr), getattr(target, attr))
            setattr(target, attr, int(value))
        for batch in args.batches:
            decoder = Decoder(model, SamplingOptions(), use_graphs=True)  # a fresh graph per setting
            slot = decoder.start(model.allocate_cache(batch), torch.randint(0, 50000, (batch,), device="cuda"), None)
            us = replay_us(decoder, slot, args.steps)
            kernels = kernels_per_call(lambda decoder=decoder, slot=slot: decoder.step(slot, None))
            launches = sum(n for n, _ in kernels.values())
            busy = sum(t for _, t in kernels.values())
            rows.append(
                dict(preset=args.preset, batch=batch, variant=variant, us_per_step=us,
                     tokens_per_s=batch * 1e6 / us, launches_per_step=launches, kernel_us_per_step=busy)
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            if top is None:
                top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:20]
    print("\ntop kernels (first variant):")
    print(text_table(["kernel", "per step", "us per step"], [[n[:90], fmt(c), fmt(t)] for n, (c, t) in top]))
    print()
    cols = ["preset", "batch", "variant", "us_per_step", "tokens_per_s", "launches_per_step",
            "kernel_us_per_step"]  # fmt: skip
    print(text_table(cols, [[r[c] if isinstance(r[c], str) else fmt(r[c]) for c in cols] for r in rows]))
    prefill = prefill_top = None
    if args.prefill:
        prefill, prefill_top = prefill_profile(model, args.prefill)
        print(f"\nprefill {prefill['prefill']}: {fmt(prefill['wall_us'])} us wall, {fmt(prefill['kernel_us'])} us in "
              f"{fmt(prefill['launches'])} kernels")  # fmt: skip
        print(
            text_table(["kernel", "per call", "us per call"], [[n[:90], fmt(c), fmt(t)] for n, (c, t) in prefill_top])
        )
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv))  # fmt: skip
    report = dict(meta=meta, rows=rows, top_kernels=top, prefill=prefill, prefill_top_kernels=prefill_top)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
