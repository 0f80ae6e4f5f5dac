"""What fp8 weight-only quantization costs in quality: each model against its fp8 copy, same run, same inputs.

  logits  max and mean |logit difference| of the fp8 model against the unquantized one (bf16 by default) over
          every position of 64 random prompts of 128 tokens, the mean |logit| for scale, and how often the
          top-1 token agrees
  tasks   the paper's seven zero-shot tasks (lm-eval with the offline task files, ``blackmamba eval``'s code
          path) on both, and the change in accuracy
Models: a random BlackMamba-1.5B shape (seed 0, GPT-NeoX-20B tokenizer; at chance on every task, so its task
rows check the plumbing, its logit rows the numerics at full width), and the demo's trained model
(``make demo``; ``--demo DIR``). The fp8 copy is ``quantize_fp8`` of the same weights (what ``blackmamba
convert --quantize fp8`` writes). Each run replaces the entries of its models in the results file (--out)
and keeps the others, so the GPU and CPU runs share one file.

    python -m benchmarks.fp8_quality --demo '' --limit 500                       (random 1.5B, on the GPU)
    python -m benchmarks.fp8_quality --random-preset '' --demo DIR --device cpu --limit 100
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from blackmamba import BlackMamba
from blackmamba.eval.cli import run_eval
from blackmamba.layers.quant import quantize_fp8

from .harness import (
    RESULTS_DIR,
    argument_parser,
    build_model,
    fmt,
    log,
    markdown_table,
    random_ids,
    run_meta,
    text_table,
    write_json,
    write_text,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ACCURACY = ("acc", "acc_norm")


@torch.inference_mode()
def logit_differences(ref: BlackMamba, fp8: BlackMamba, vocab: int, args: Any) -> dict[str, float]:
    """|fp8 - ref| logits over every position of ``args.prompts`` random prompts (ids in [1, vocab))."""
    ids = random_ids(args.prompts, args.prompt_len, vocab, seed=0)
    worst, total, scale, agree, count = 0.0, 0.0, 0.0, 0, 0
    for batch in ids.split(args.logit_batch):
        batch = batch.to(ref.device)
        a, b = ref(batch).logits.float(), fp8(batch).logits.float()
        diff = (b - a).abs()
        worst = max(worst, diff.max().item())
        total += diff.sum().item()
        scale += a.abs().sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        count += a.shape[0] * a.shape[1]
    elements = count * a.shape[-1]
    return {
        "max_abs_diff": worst,
        "mean_abs_diff": total / elements,
        "mean_abs_logit": scale / elements,
        "top1_agreement": agree / count,
        "positions": count,
    }


def task_accuracy(name: str, model: BlackMamba, tokenizer: Any, args: Any) -> dict[str, Any]:
    from blackmamba.eval.lm_eval_adapter import BlackMambaLM  # imports lm-eval, an optional extra

    lm = BlackMambaLM(model=model, tokenizer=tokenizer, batch_size=args.batch_size)
    run = run_eval(name, "paper", limit=args.limit, lm=lm, print_table=False)
    return {"results": run["results"], "n_samples": run["n_samples"], "runtime_s": run["runtime_s"]}


def compare(name: str, model: BlackMamba, tokenizer: Any, vocab: int, args: Any) -> dict[str, Any]:
    """Logit differences and task accuracy of ``model`` and of its fp8 copy."""
    start = time.perf_counter()
    fp8 = quantize_fp8(copy.deepcopy(model))
    log(f"{name}: quantized in {time.perf_counter() - start:.1f} s; logits on {args.prompts} random prompts")
    entry: dict[str, Any] = {"meta": run_meta(args.device), "reference_dtype": args.dtype}
    entry["logits"] = logit_differences(model, fp8, vocab, args)
    entry["prompts"] = {"count": args.prompts, "length": args.prompt_len, "ids": f"uniform in [1, {vocab})"}
    if not args.no_tasks:
        entry["limit"] = args.limit
        entry["tasks"] = {}
        for label, m in ((args.dtype, model), ("fp8", fp8)):
            log(f"{name}: the paper's tasks, {label}")
            entry["tasks"][label] = task_accuracy(f"{name} ({label})", m, tokenizer, args)
    entry["total_s"] = round(time.perf_counter() - start, 1)
    return entry


def random_model(preset: str, args: Any) -> tuple[BlackMamba, Any]:
    from blackmamba.tokenizer import neox_tokenizer

    return build_model(preset, args.device, DTYPES[args.dtype]).eval(), neox_tokenizer()


def demo_model(path: str, args: Any) -> tuple[BlackMamba, Any]:
    from blackmamba.checkpoint import load_pretrained
    from blackmamba.tokenizer import load_tokenizer

    model = load_pretrained(path, device=args.device, dtype=DTYPES[args.dtype])
    return model, load_tokenizer(path, model.config.vocab_size)


def task_rows(entry: dict[str, Any], ref: str) -> list[list[str]]:
    """(task, metric, reference, fp8, change, n) for the accuracy metrics."""
    rows = []
    tasks = entry.get("tasks", {})
    if not tasks:
        return rows
    a, b = tasks[ref]["results"], tasks["fp8"]["results"]
    for task in sorted(a):
        for metric in ACCURACY:
            key = f"{metric},none"
            if key in a[task] and key in b[task]:
                n = tasks[ref]["n_samples"].get(task)
                change = b[task][key] - a[task][key]
                rows.append([task, metric, f"{a[task][key]:.4f}", f"{b[task][key]:.4f}", f"{change:+.4f}", str(n)])
    return rows


def tables(runs: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The text and markdown tables of every run in the file."""
    text, md = [], []
    header = ["model", "ref dtype", "max |diff|", "mean |diff|", "mean |logit|", "top-1 agree", "positions"]
    body = [
        [name, e["reference_dtype"], fmt(e["logits"]["max_abs_diff"]), fmt(e["logits"]["mean_abs_diff"]),
         fmt(e["logits"]["mean_abs_logit"]), f"{e['logits']['top1_agreement']:.4f}", str(e["logits"]["positions"])]
        for name, e in runs.items()
    ]  # fmt: skip
    text.append(text_table(header, body))
    md.append(markdown_table(header, body))
    for name, e in runs.items():
        rows = task_rows(e, e["reference_dtype"])
        if rows:
            head = ["task", "metric", e["reference_dtype"], "fp8", "change", "n"]
            where = e["meta"]["card"] or e["meta"]["cpu"]
            title = f"{name}: the paper's tasks, limit {e.get('limit')} per task ({where}, {e['meta']['date'][:10]})"
            text.append(f"{title}\n{text_table(head, rows)}")
            md.append(f"{title}\n\n{markdown_table(head, rows)}")
    return text, md


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--random-preset", default="blackmamba-1.5b", help="random model's shape ('' to skip)")
    parser.add_argument("--demo", default="", help="the demo's checkpoint directory ('' to skip)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the unquantized model's dtype")
    parser.add_argument("--prompts", type=int, default=64, help="random prompts for the logit differences")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    parser.add_argument("--logit-batch", type=int, default=8, help="prompts per forward")
    parser.add_argument("--limit", type=float, default=500, help="examples per task (a fraction if below 1)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward in the tasks")
    parser.add_argument("--no-tasks", action="store_true", help="logit differences only")
    parser.add_argument("--out", default=str(RESULTS_DIR / "fp8_quality.json"), help="results file (.md beside)")
    args = parser.parse_args(argv)
    args.limit = int(args.limit) if args.limit >= 1 else args.limit
    out = Path(args.out)
    runs: dict[str, dict[str, Any]] = {}
    if out.is_file():
        runs = json.loads(out.read_text()).get("runs", {})
    if args.random_preset:
        model, tokenizer = random_model(args.random_preset, args)
        name = f"random {args.random_preset} (seed 0)"
        runs[name] = compare(name, model, tokenizer, tokenizer.get_vocab_size(), args)
        del model
    if args.demo:
        model, tokenizer = demo_model(args.demo, args)
        name = "demo (small, trained by make demo)"
        runs[name] = compare(name, model, tokenizer, tokenizer.get_vocab_size(), args)
        runs[name]["checkpoint"] = args.demo
    write_json(out, {"runs": runs})
    text, md = tables(runs)
    write_text(out.with_suffix(".md"), "\n\n".join(md) + "\n")
    print("\n\n".join(text))


if __name__ == "__main__":
    main()
