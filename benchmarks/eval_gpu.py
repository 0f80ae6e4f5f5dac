"""The paper's zero-shot suite on the GPU: the demo's trained model and a randomly initialised 1.5B shape.

Both through lm-evaluation-harness with the offline task files (``blackmamba eval``'s code path), one
task at a time so that each is timed. The random model is the sanity check: every task should sit at
chance (HellaSwag/ARC-C/OBQA ~0.25, PIQA/WinoGrande ~0.5, LAMBADA ~0). It is built in memory (seed 0,
bf16) and read with the GPT-NeoX-20B tokenizer, as a released checkpoint would be. Results, with the
card, versions and date, go to benchmarks/results/eval.json (``--out``).

    python -m benchmarks.eval_gpu --demo runs/demo/run/checkpoints/step-00000396 [--limit N]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from blackmamba.eval.cli import format_table, results_table, run_eval

from .harness import BF16, RESULTS_DIR, argument_parser, build_model, run_meta, write_json


def random_lm(preset: str, batch_size: int, device: str) -> Any:
    """lm-eval's view of a random model of ``preset`` (seed 0, bf16) with the GPT-NeoX-20B tokenizer."""
    from blackmamba.eval.lm_eval_adapter import BlackMambaLM  # imports lm-eval, an optional extra
    from blackmamba.tokenizer import neox_tokenizer

    model = build_model(preset, device, BF16)
    return BlackMambaLM(model=model, tokenizer=neox_tokenizer(), batch_size=batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--demo", help="the demo's checkpoint directory (skipped when not given)")
    parser.add_argument("--random-preset", default="blackmamba-1.5b", help="'' to skip the random model")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if below 1)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "eval.json"), help="results file")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    args = parser.parse_args(argv)
    runs = {}
    if args.demo:
        start = time.perf_counter()
        runs["demo (small, trained by make demo)"] = run_eval(
            args.demo, "paper", limit=args.limit, batch_size=args.batch_size, device=args.device, print_table=False
        )
        runs["demo (small, trained by make demo)"]["total_s"] = round(time.perf_counter() - start, 1)
    if args.random_preset:
        start = time.perf_counter()
        lm = random_lm(args.random_preset, args.batch_size, args.device)
        name = f"random {args.random_preset} (seed 0, bf16)"
        runs[name] = run_eval(name, "paper", limit=args.limit, lm=lm, print_table=False)
        runs[name]["total_s"] = round(time.perf_counter() - start, 1)
    write_json(Path(args.out), {"meta": run_meta(args.device), "runs": runs})
    for name, run in runs.items():
        print(f"\n{name}: {run['total_s']} s in all; per task {run['runtime_s']}")
        print(format_table(["task", "metric", "value", "stderr", "n"], results_table(run["results"], run["n_samples"])))


if __name__ == "__main__":
    main()
