"""Distributed training on several GPUs: throughput per GPU, MFU, scaling efficiency against one GPU, peak
memory and communication time, for FSDP alone and FSDP + expert parallelism; and one resumption across
world sizes. One command for a machine with several GPUs (run on the device machine):

    python -m benchmarks.scaling [--presets blackmamba-1.5b blackmamba-2.8b] [--gpus 1 2 8] [--batch 4]
                                 [--seq-len 2048] [--steps 5] [--no-profile]
                                 [--resume-check --data DIR] [--device cpu] [--out FILE]

For each process count N of ``--gpus`` (default: 1, 2 and every visible GPU) and each preset, it launches
``torchrun --standalone --nproc-per-node N -m benchmarks.train_distributed`` with the layouts ``fsdp`` and
``fsdp+epE`` for every E of 2, 4, 8 that divides both N and the preset's experts, each rank training
``--batch`` sequences per step, and collects that script's ``train_step`` rows (tokens/s per GPU, MFU
against 784 TFLOP/s, peak memory, and with the profile, kernel time by part and the communication split
into all-to-all and FSDP's collectives). It then adds:

* ``scaling_efficiency`` rows, shape like ``2.8b/fsdp+ep8/1to8``: tokens/s per GPU of the layout on N GPUs
  over FSDP's tokens/s on one GPU in the same run (peer_value); targets 0.90 at 2 GPUs, 0.85 at 8.
* with ``--resume-check``: the smallest preset trains 3 steps on the largest N with FSDP (and expert
  parallelism over min(N, 8) ranks where it divides), through ``blackmamba train`` and its distributed
  checkpoints; the run is copied, the original continues to step 5 on N processes and the copy resumes on
  N/2; the row ``resume_across_world_size`` holds the copy's loss of step 4 (ours), the original's
  (peer_value) and the largest difference over steps 4-5 (max_err). ``--data`` names a prepared dataset
  (``blackmamba data prepare``).

``--device cpu`` runs all of it on gloo processes (a check of the script on tiny presets; rows named
``Nproc``). Results: ``benchmarks/results/distributed_scaling.json`` (``--out``) and a table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from blackmamba import BlackMambaConfig
from blackmamba.config import parameter_count

from .harness import H200_BF16_TFLOPS, RESULTS_DIR, Row, argument_parser, log, meta_line, run_meta, write_results

EXPERT_DEGREES = (2, 4, 8)
TARGETS = {2: 0.90, 8: 0.85}
TIMEOUT_S = 1800


def layouts_for(gpus: int, n_experts: int) -> list[str]:
    """FSDP alone, then FSDP + expert parallelism over every E in 2, 4, 8 dividing the GPUs and the experts."""
    return ["fsdp"] + [f"fsdp+ep{e}" for e in EXPERT_DEGREES if e <= gpus and gpus % e == 0 and n_experts % e == 0]


def torchrun(nproc: int, args: list[str]) -> None:
    """``torchrun --standalone --nproc-per-node nproc`` of ``args`` (a module and its arguments); raises when
    any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    log(" ".join(cmd[1:]))
    done = subprocess.run(cmd, timeout=TIMEOUT_S)
    if done.returncode:
        raise SystemExit(f"torchrun with {nproc} processes failed (exit {done.returncode}): {' '.join(args)}")


def scaling_rows(rows: list[dict], unit: str) -> list[Row]:
    """Per preset: each layout's tokens/s per GPU on N > 1 GPUs over FSDP's on one GPU."""
    out = []
    by_shape = {r["shape"]: r for r in rows if r["benchmark"] == "train_step"}
    for shape, row in by_shape.items():
        size, layout, count = shape.split("/")
        gpus = int(count.removesuffix(unit))
        base = by_shape.get(f"{size}/fsdp/1{unit}")
        if gpus == 1 or base is None:
            continue
        out.append(
            Row(
                "scaling_efficiency",
                f"{size}/{layout}/1to{gpus}",
                "ratio",
                row["ours"] / base["ours"],
                peer="FSDP on one GPU, same run",
                peer_value=base["ours"],
                extra={"gpus": gpus, "tokens_per_s_per_gpu": row["ours"], "target": TARGETS.get(gpus)},
            )
        )
    return out


def _losses(run: Path, steps: tuple[int, ...]) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("step") in steps and "val_loss" not in r}
    missing = [s for s in steps if s not in found]
    if missing:
        raise SystemExit(f"{run}/metrics.jsonl has no training loss for steps {missing}")
    return [found[s] for s in steps]


def resume_check(preset: str, data: str, gpus: int, batch: int, seq_len: int, device: str, work: Path) -> Row:
    """Train 3 steps on ``gpus`` processes, then steps 4-5 twice: on ``gpus`` and, from a copy, on half."""
    if gpus < 2 or gpus % 2:
        raise SystemExit(f"--resume-check needs an even number of GPUs, at least 2 (largest --gpus is {gpus})")
    n_experts = BlackMambaConfig.from_preset(preset).n_experts

    def ep_for(n: int) -> int:
        return max([1] + [e for e in EXPERT_DEGREES if e <= n and n % e == 0 and n_experts % e == 0])

    def train(run: Path, nproc: int, steps: int, resume: bool) -> None:
        argv = ["-m", "blackmamba", "train", "--preset", preset, "--data", data, "--out", str(run)]
        argv += ["--max-steps", str(steps), "--batch-size", str(batch * gpus), "--seq-len", str(seq_len)]
        argv += ["--log-every", "1", "--save-every", "3", "--eval-every", "1000", "--eval-tokens", str(seq_len)]
        argv += ["--warmup", "2", "--device", device, "--no-plots", "--no-progress", "--fsdp"]
        argv += ["--expert-parallel", str(ep_for(nproc))] + (["--resume"] if resume else [])
        torchrun(nproc, argv)

    full, half = work / "full", work / "half"
    train(full, gpus, 3, resume=False)
    shutil.copytree(full, half)
    train(full, gpus, 5, resume=True)
    train(half, gpus // 2, 5, resume=True)
    want, got = _losses(full, (4, 5)), _losses(half, (4, 5))
    size = preset.removeprefix("blackmamba-")
    return Row(
        "resume_across_world_size",
        f"{size}/fsdp+ep{ep_for(gpus)}:{gpus}to{gpus // 2}+ep{ep_for(gpus // 2)}",
        "loss",
        got[0],
        peer=f"the same run continued on {gpus}",
        peer_value=want[0],
        max_err=max(abs(a - b) for a, b in zip(got, want, strict=True)),
        extra={"losses_resumed": got, "losses_continued": want, "steps": [4, 5]},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"], help="model shapes")
    parser.add_argument("--gpus", type=int, nargs="+", help="process counts (default: 1, 2 and all visible GPUs)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per layout (after two warm-up steps)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled steps (communication time)")
    parser.add_argument("--resume-check", action="store_true", help="also resume a run on half the GPUs")
    parser.add_argument("--data", help="prepared dataset for --resume-check (blackmamba data prepare)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, to check the script")
    parser.add_argument("--out", default=str(RESULTS_DIR / "distributed_scaling.json"), help="results file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run on a machine with GPUs, or --device cpu to check the script")
    visible = torch.cuda.device_count() if args.device == "cuda" else 2
    gpus = sorted(set(args.gpus or [n for n in (1, 2, visible) if n <= visible]))
    if not gpus or gpus[0] < 1 or gpus[-1] > visible:
        raise SystemExit(f"--gpus must lie in 1..{visible} (the visible GPUs), got {args.gpus}")
    if 1 not in gpus:
        raise SystemExit("--gpus must include 1: scaling efficiency is measured against one GPU")
    if args.resume_check and not args.data:
        raise SystemExit("--resume-check trains through blackmamba train: give --data (a prepared dataset)")
    unit = "gpu" if args.device == "cuda" else "proc"
    rows: list[dict] = []
    metas = []
    with tempfile.TemporaryDirectory(prefix="bm-scaling-") as tmp:
        work = Path(tmp)
        for n in gpus:
            for preset in args.presets:
                n_experts = BlackMambaConfig.from_preset(preset).n_experts
                out = work / f"{n}-{preset}.json"
                run_args = ["-m", "benchmarks.train_distributed", "--presets", preset]
                run_args += ["--layouts", *layouts_for(n, n_experts), "--batch", str(args.batch)]
                run_args += ["--seq-len", str(args.seq_len), "--steps", str(args.steps), "--device", args.device]
                run_args += ["--out", str(out)] + ([] if args.no_profile else ["--profile"])
                torchrun(n, run_args)
                result = json.loads(out.read_text())
                rows.extend(result["results"])
                metas.append({"gpus": n, "preset": preset, "date": result["meta"]["date"]})
        all_rows = [Row.from_json(r) for r in rows] + scaling_rows(rows, unit)
        if args.resume_check:
            smallest = min(args.presets, key=lambda p: parameter_count(BlackMambaConfig.from_preset(p)))
            all_rows.append(
                resume_check(smallest, args.data, gpus[-1], args.batch, args.seq_len, args.device, work / "resume")
            )
    meta = run_meta(args.device, peak_tflops_assumed=H200_BF16_TFLOPS, gpus=gpus[-1], runs=metas)
    write_results(Path(args.out), meta, all_rows)
    print(f"\n{meta_line(meta)}")
    head = f"{'benchmark':<26} {'shape':<30} {'ours':>12} {'MFU':>7} {'peak GiB':>9}"
    print(f"{head} {'all-to-all ms':>14} {'FSDP ms':>8}")
    for r in all_rows:
        e = r.extra
        mfu = f"{e['mfu']:.1%}" if "mfu" in e else "-"
        peak = f"{e['peak_memory_gib']:.1f}" if e.get("peak_memory_gib") is not None else "-"
        comm = e.get("communication_ms", {})
        a2a = f"{comm['all_to_all']:.1f}" if comm else "-"
        fsdp = f"{comm['fsdp_and_other']:.1f}" if comm else "-"
        ours = f"{r.ours:,.0f}" if r.unit == "tokens/s" else f"{r.ours:.4f}"
        print(f"{r.benchmark:<26} {r.shape:<30} {ours:>12} {mfu:>7} {peak:>9} {a2a:>14} {fsdp:>8}")


if __name__ == "__main__":
    main()
