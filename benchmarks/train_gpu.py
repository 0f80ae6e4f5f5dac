"""Training throughput and MFU of the released shapes on one GPU (run on the device machine).

One training step = forward of (batch, 2048) random token ids under bf16 autocast (fp32 master weights,
as ``blackmamba train`` does on GPU), cross-entropy, backward, fused AdamW step. Train-mode routing is
Sinkhorn. Reported: tokens/s (median of the timed steps, CUDA-synchronised), MFU = tokens/s x training
FLOPs per token (``blackmamba.training.flops``) / peak (784 TFLOP/s, the bf16 matmul rate measured on
the H200), peak memory, and the loss of the first step (finite). The default backend ("auto") runs the
Triton kernels; ``--backend torch`` measures the plain PyTorch path (chunked scan, per-expert matmuls).

    python -m benchmarks.train_gpu [--presets blackmamba-1.5b blackmamba-2.8b] [--batch 4] [--steps 5]
                                   [--backend auto|torch]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from blackmamba.kernels import use_backend
from blackmamba.training.flops import flops_per_token
from blackmamba.training.optim import build_optimizer

from .harness import (
    H200_BF16_TFLOPS,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    meta_line,
    run_meta,
    write_results,
)

PEAK_TFLOPS = H200_BF16_TFLOPS


def bench(preset: str, batch: int, seq_len: int, steps: int) -> Row:
    model = build_model(preset, "cuda", train=True)
    config = model.config
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
    row = Row(
        "train_step",
        f"{preset.removeprefix('blackmamba-')}/{batch}x{seq_len}",
        "tokens/s",
        tps,
        floor=PEAK_TFLOPS * 1e12 / fpt,
        extra={
            "step_s": step,
            "mfu": tps * fpt / (PEAK_TFLOPS * 1e12),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            "first_loss": first_loss,
        },
    )
    del model, opt
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--presets", nargs="+", default=["blackmamba-1.5b", "blackmamba-2.8b"], help="model shapes")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after two warm-up steps)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "train_gpu.json"), help="results file")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="kernel backend")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets:
        with use_backend(args.backend):
            rows.append(bench(preset, args.batch, args.seq_len, args.steps))
        print(json.dumps(rows[-1].to_json()), file=sys.stderr, flush=True)
    meta = run_meta("cuda", peak_tflops_assumed=PEAK_TFLOPS, backend=args.backend)
    write_results(Path(args.out), meta, rows)
    print(f"\n{meta_line(meta)}")
    print(f"{'shape':<22} {'tokens/s':>10} {'MFU':>7} {'step s':>8} {'peak GiB':>9} {'first loss':>10}")
    for r in rows:
        e = r.extra
        print(
            f"{r.shape:<22} {r.ours:>10,.0f} {e['mfu']:>7.1%} {e['step_s']:>8.3f} "
            f"{e['peak_memory_gib']:>9.1f} {e['first_loss']:>10.3f}"
        )


if __name__ == "__main__":
    main()
