"""Training throughput and MFU of the released shapes on one GPU (run on the device machine).

One training step = forward of (batch, 2048) random token ids under bf16 autocast (fp32 master weights,
as ``blackmamba train`` does on GPU), cross-entropy, backward, fused AdamW step. Train-mode routing is
Sinkhorn. Reported: tokens/s (median of the timed steps, CUDA-synchronised), MFU = tokens/s x training
FLOPs per token (``blackmamba.training.flops``) / peak (784 TFLOP/s, the bf16 matmul rate measured on
the H200), peak memory, and the loss of the first step (finite). The default backend ("auto") runs the
Triton kernels; ``--backend torch`` measures the plain PyTorch path (chunked scan, per-expert matmuls).

    python benchmarks/train_gpu.py [--presets blackmamba-1.5b blackmamba-2.8b] [--batch 4] [--steps 5]
                                   [--backend auto|torch]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blackmamba import BlackMamba, BlackMambaConfig  # noqa: E402
from blackmamba.kernels import use_backend  # noqa: E402
from blackmamba.training.flops import flops_per_token  # noqa: E402
from blackmamba.training.optim import build_optimizer  # noqa: E402

PEAK_TFLOPS = 784.0


def bench(preset: str, batch: int, seq_len: int, steps: int) -> dict:
    torch.manual_seed(0)
    config = BlackMambaConfig.from_preset(preset)
    model = BlackMamba(config).cuda().train()
    opt = build_optimizer(model, 1e-4, 0.1, fused=True)
    ids = torch.randint(0, config.tokenizer_vocab_size or config.vocab_size, (batch, seq_len + 1), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if first_loss is None:
            first_loss = loss.item()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tps = batch * seq_len / step
    fpt = flops_per_token(config, seq_len)["train"]
    row = {
        "benchmark": "train_step",
        "shape": f"{preset.removeprefix('blackmamba-')}/{batch}x{seq_len}",
        "unit": "tokens/s",
        "ours": tps,
        "peer": None,
        "peer_value": None,
        "floor": PEAK_TFLOPS * 1e12 / fpt,
        "fraction_of_floor": tps * fpt / (PEAK_TFLOPS * 1e12),
        "speedup": None,
        "max_err": None,
        "step_s": step,
        "mfu": tps * fpt / (PEAK_TFLOPS * 1e12),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_loss": first_loss,
    }
    del model, opt
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_gpu.json"))
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        with use_backend(args.backend):
            rows.append(bench(preset, args.batch, args.seq_len, args.steps))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    meta = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "peak_tflops_assumed": PEAK_TFLOPS,
        "backend": args.backend,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"\n{meta['card']}, torch {meta['torch']}, {meta['date']}")
    print(f"{'shape':<22} {'tokens/s':>10} {'MFU':>7} {'step s':>8} {'peak GiB':>9} {'first loss':>10}")
    for r in rows:
        print(
            f"{r['shape']:<22} {r['ours']:>10,.0f} {r['mfu']:>7.1%} {r['step_s']:>8.3f} "
            f"{r['peak_memory_gib']:>9.1f} {r['first_loss']:>10.3f}"
        )


if __name__ == "__main__":
    main()
