"""The paper's zero-shot suite on the GPU: the demo's trained model and a randomly initialised 1.5B shape.

Both through lm-evaluation-harness with the offline task files (``blackmamba eval``'s code path), one
task at a time so that each is timed. The random model is the sanity check: every task should sit at
chance (HellaSwag/ARC-C/OBQA ~0.25, PIQA/WinoGrande ~0.5, LAMBADA ~0). It is built in memory (seed 0,
bf16) and read with the GPT-NeoX-20B tokenizer, as a released checkpoint would be. Results, with the
card, versions and date, go to benchmarks/results/eval.json.

    python benchmarks/eval_gpu.py --demo runs/demo/run/checkpoints/step-00000396 [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blackmamba import BlackMamba, BlackMambaConfig  # noqa: E402
from blackmamba.eval.cli import format_table, results_table, run_eval  # noqa: E402
from blackmamba.eval.lm_eval_adapter import BlackMambaLM  # noqa: E402
from blackmamba.model import cast_model  # noqa: E402
from blackmamba.tokenizer import neox_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def random_lm(preset: str, batch_size: int, device: str) -> BlackMambaLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = BlackMamba(BlackMambaConfig.from_preset(preset))
    model = cast_model(model, torch.bfloat16).eval()
    return BlackMambaLM(model=model, tokenizer=neox_tokenizer(), batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", help="the demo's checkpoint directory (skipped when not given)")
    parser.add_argument("--random-preset", default="blackmamba-1.5b", help="'' to skip the random model")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=float, default=None)
    parser.add_argument("--out", default=str(RESULTS / "eval.json"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    args = parser.parse_args()
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
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"card": card, "runs": runs}
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name, run in runs.items():
        print(f"\n{name}: {run['total_s']} s in all; per task {run['runtime_s']}")
        print(format_table(["task", "metric", "value", "stderr", "n"], results_table(run["results"], run["n_samples"])))


if __name__ == "__main__":
    main()
