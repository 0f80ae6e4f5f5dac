"""What running a bf16 checkpoint in bf16 on the CPU costs, next to upcasting it to fp32.

The released BlackMamba weights are stored in bf16. On a CPU the choice is to upcast them to fp32 (twice
the memory: the 1.5B then needs ~6 GiB for its weights alone, the 2.8B ~11 GiB) or to compute in bf16.
This script measures the cost of bf16 in speed and accuracy, for the ``small`` preset and the
``blackmamba-1.5b`` shape, with random weights (nothing is downloaded):

* the model is built in fp32 (seed 0, the default initialisation) and its weights are rounded through
  bf16, so that the fp32 model is exactly "a bf16 checkpoint upcast to fp32" and the comparison isolates
  the precision of the arithmetic; A_log, D and the dt bias stay fp32 in both (as ``cast_model`` keeps them);
  both models are held at once and timed in turn, so that other load on the machine falls on both alike;
* ``forward``: one forward of a 1x512 sequence of random token ids (median of repeats, after a warm-up);
* ``decode``: greedy generation of 32 tokens after a 16-token random prompt, batch 1; tokens/s = 32 / wall
  time of the whole call (prefill included);
* accuracy: logits of random prompts (a few sequences of 128 random ids) in bf16 against fp32: max and mean
  absolute difference, the largest fp32 logit for scale, and top-1 agreement (share of positions whose
  argmax is the same);
* memory: bytes of the weights in each dtype (parameters only).

The table is printed on stdout and written to ``benchmarks/results/cpu_dtype.json`` with the CPU, thread
count, versions, date and how busy the machine was before the run (timings on a busy machine are rough).

    .venv/bin/python -m benchmarks.cpu_dtype                # small and 1.5b (a few minutes; about 9 GiB of memory)
    .venv/bin/python -m benchmarks.cpu_dtype --only small
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from blackmamba import BlackMamba, BlackMambaConfig, generate
from blackmamba.model import FP32_PARAMS, cast_model

from .harness import (
    RESULTS_DIR,
    argument_parser,
    cpu_busy,
    fmt,
    load_average,
    log,
    package_version,
    peak_rss_mib,
    random_ids,
    run_meta,
    text_table,
    write_json,
)

RESULTS = RESULTS_DIR / "cpu_dtype.json"
SHAPES = {"small": "small", "1.5b": "blackmamba-1.5b"}
FORWARD_LEN = 512
PROMPT_LEN = 16
NEW_TOKENS = 32
ACC_LEN = 128
BUSY_THRESHOLD = 0.15  # share of CPU time busy before the run above which timings are flagged rough


def weight_bytes(model: BlackMamba) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bf16_twin(model: BlackMamba) -> BlackMamba:
    """A bf16 copy of ``model`` (fp32-kept parameters stay fp32), built without a second fp32 copy."""
    with torch.device("meta"):
        twin = BlackMamba(model.config)
    state = {k: v if k.endswith(FP32_PARAMS) else v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True, assign=True)
    return cast_model(twin, torch.bfloat16).eval()


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def measure(models: dict[str, BlackMamba], vocab: int, repeats: int, acc_prompts: int) -> dict[str, dict]:
    """Forward and decode timings of each model, interleaved (fp32, bf16, fp32, ...) so that load from
    other jobs on the machine falls on both alike; and the logits of the accuracy prompts."""
    ids = random_ids(1, FORWARD_LEN, vocab, seed=1)
    prompt = random_ids(1, PROMPT_LEN, vocab, seed=2)[0].tolist()
    for model in models.values():  # warm-up
        model(ids[:, :32])
        generate(model, [prompt], 2)
    forward: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for key, model in models.items():
            forward[key] += timed(lambda m=model: m(ids), 1)
            decode[key].append(NEW_TOKENS / timed(lambda m=model: generate(m, [prompt], NEW_TOKENS), 1)[0])
    acc_ids = random_ids(acc_prompts, ACC_LEN, vocab, seed=3)
    return {
        key: {
            "forward_s": statistics.median(forward[key]),
            "forward_all_s": forward[key],
            "decode_tokens_per_s": statistics.median(decode[key]),
            "decode_all_tokens_per_s": decode[key],
            "weight_bytes": weight_bytes(model),
            "logits": model(acc_ids).logits.float(),
        }
        for key, model in models.items()
    }


def compare(bf16: torch.Tensor, fp32: torch.Tensor) -> dict:
    diff = (bf16 - fp32).abs()
    top2 = fp32.topk(2, dim=-1).values
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "max_abs_logit_fp32": fp32.abs().max().item(),
        "top1_agreement": (bf16.argmax(-1) == fp32.argmax(-1)).float().mean().item(),
        "median_top1_margin_fp32": (top2[..., 0] - top2[..., 1]).median().item(),
        "positions": fp32.shape[0] * fp32.shape[1],
    }


def run_shape(key: str, repeats: int, acc_prompts: int) -> dict:
    config = BlackMambaConfig.from_preset(SHAPES[key])
    log(f"{key}: building the model in fp32 (seed 0), weights rounded through bf16")
    torch.manual_seed(0)
    fp32 = BlackMamba(config).eval()
    cast_model(cast_model(fp32, torch.bfloat16), torch.float32)  # "a bf16 checkpoint upcast to fp32"
    models = {"fp32": fp32, "bf16": bf16_twin(fp32)}
    gc.collect()
    log(f"{key}: {sum(p.numel() for p in fp32.parameters()):,} parameters; timing fp32 and bf16 in turn")
    measured = measure(models, config.vocab_size, repeats, acc_prompts)
    accuracy = compare(measured["bf16"].pop("logits"), measured["fp32"].pop("logits"))
    del models, fp32
    gc.collect()
    return {"shape": key, "preset": SHAPES[key], **measured, "accuracy": accuracy}


def table(rows: list[dict]) -> str:
    header = [
        "shape",
        "weights fp32/bf16 (GiB)",
        "forward 1x512 fp32/bf16 (s)",
        "decode b1 fp32/bf16 (tok/s)",
        "max|diff|",
        "mean|diff|",
        "max|logit|",
        "top-1 agree",
    ]
    body = []
    for r in rows:
        a, b, acc = r["fp32"], r["bf16"], r["accuracy"]
        body.append(
            [
                r["shape"],
                f"{a['weight_bytes'] / 2**30:.2f} / {b['weight_bytes'] / 2**30:.2f}",
                f"{fmt(a['forward_s'])} / {fmt(b['forward_s'])}",
                f"{fmt(a['decode_tokens_per_s'])} / {fmt(b['decode_tokens_per_s'])}",
                fmt(acc["max_abs_diff"]),
                fmt(acc["mean_abs_diff"]),
                fmt(acc["max_abs_logit_fp32"]),
                f"{100 * acc['top1_agreement']:.1f}%",
            ]
        )
    return text_table(header, body)


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--only", choices=sorted(SHAPES), action="append", help="measure only this shape")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument("--prompts", type=int, default=4, help="random prompts of 128 tokens for the accuracy")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.prompts < 1:
        parser.error("--repeats and --prompts must be >= 1")

    busy = cpu_busy(2.0)
    meta = run_meta("cpu", blackmamba_toolkit=package_version("blackmamba-toolkit"), load_average_start=load_average())
    rows = [run_shape(key, args.repeats, args.prompts) for key in (args.only or list(SHAPES))]
    busy_flag = not busy < BUSY_THRESHOLD  # NaN (unreadable) counts as busy
    meta.update(
        cpu_busy_before=busy,
        load_average_end=load_average(),
        machine_busy=busy_flag,
        note=(
            "machine busy (shared with other jobs): timings are rough, accuracy figures are exact"
            if busy_flag
            else "machine idle before the run"
        ),
        peak_rss_gib=peak_rss_mib() / 1024,
    )
    report = {
        "meta": meta,
        "settings": {
            "forward_len": FORWARD_LEN,
            "prompt_len": PROMPT_LEN,
            "new_tokens": NEW_TOKENS,
            "accuracy_prompts": args.prompts,
            "accuracy_len": ACC_LEN,
            "repeats": args.repeats,
            "weights": "random (seed 0, default init), rounded through bf16 in both runs",
        },
        "results": rows,
    }
    out = Path(args.out)
    write_json(out, report)
    print(table(rows))
    print(f"\n{meta['note']}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
