"""Generation through transformers (``model.generate`` of :mod:`blackmamba.hf`) against ``blackmamba.generate``.

The same random model (bf16 on a GPU, fp32 on a CPU), the same prompts, greedy decoding of exactly N new
tokens (no EOS). Three paths:
  hf        BlackMambaForCausalLM.generate: transformers' loop, our prefill and native decode step per token
  native    blackmamba.generate: the native loop (CUDA graphs of the decode step on a GPU)
  eager     blackmamba.generate with cuda_graphs=False (the native loop without graphs; GPU only)
Rows: tokens/s of the hf path, with blackmamba.generate as the peer (speedup < 1 is the wrapper's overhead),
and in ``extra`` the eager rate, the milliseconds per decode step of each path and whether the hf path gave
the native tokens.

    python -m benchmarks.hf_generate                 (on the GPU machine: 2.8B shape, batch 1 and 16)
    python -m benchmarks.hf_generate --smoke         (tiny model on the CPU; writes no results file)
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

import blackmamba

from .harness import (
    BF16,
    RESULTS_DIR,
    Row,
    argument_parser,
    build_model,
    fmt,
    log,
    markdown_table,
    meta_line,
    random_ids,
    run_meta,
    text_table,
    wall_times,
    write_results,
)

VOCAB = 50277  # token ids of the GPT-NeoX tokenizer


def bench(model: blackmamba.BlackMamba, batch: int, prompt: int, new: int, repeats: int) -> Row:
    from blackmamba.hf import BlackMambaForCausalLM  # transformers sets inductor variables on import

    device = model.device
    hf = BlackMambaForCausalLM.from_native(model)
    vocab = min(VOCAB, model.config.vocab_size)
    ids = random_ids(batch, prompt, vocab, seed=batch, device=device)
    prompts = ids.tolist()
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    outputs: dict[str, list[list[int]]] = {}

    def run_hf() -> None:
        with torch.inference_mode():
            outputs["hf"] = hf.generate(ids, **gen)[:, prompt:].tolist()

    def run_native(graphs: bool | None) -> None:
        outputs["native"] = blackmamba.generate(model, prompts, new, cuda_graphs=graphs)

    times = {"hf": wall_times(run_hf, 1, repeats, device)}
    times["native"] = wall_times(lambda: run_native(None), 1, repeats, device)
    if device.type == "cuda":
        times["eager"] = wall_times(lambda: run_native(False), 1, repeats, device)
    rate = {k: batch * new / statistics.median(v) for k, v in times.items()}
    step_ms = {k: 1e3 * statistics.median(v) / new for k, v in times.items()}
    same = sum(a == b for a, b in zip(outputs["hf"], outputs["native"], strict=True)) / batch
    log(f"batch {batch}: " + ", ".join(f"{k} {fmt(v)} tok/s" for k, v in rate.items()) + f", same tokens {same:.2f}")
    return Row(
        benchmark="hf_generate",
        shape=f"b{batch} p{prompt} n{new}",
        unit="tokens/s",
        ours=rate["hf"],
        peer="blackmamba.generate",
        peer_value=rate["native"],
        extra={
            "eager_tokens_per_s": rate.get("eager"),
            "ms_per_token_step": step_ms,
            "overhead_vs_native_pct": 100 * (rate["native"] / rate["hf"] - 1),
            "same_tokens_fraction": same,
        },
    )


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["shape", "hf generate", "blackmamba.generate", "eager native", "hf / native", "same tokens"]
    body = [
        [r.shape, fmt(r.ours), fmt(r.peer_value), fmt(r.extra["eager_tokens_per_s"]), fmt(r.speedup),
         fmt(r.extra["same_tokens_fraction"])]
        for r in rows
    ]  # fmt: skip
    return header, body


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser(__spec__, __doc__)
    parser.add_argument("--preset", default="blackmamba-2.8b", help="model shape (a BlackMambaConfig preset)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path (after one warm-up)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, a few tokens; no results file")
    parser.add_argument("--out", help="results file (default benchmarks/results/hf_generate.json, none with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        device, dtype, preset = "cpu", None, "tiny"
        args.batches, args.prompt, args.new_tokens, args.repeats = [1, 2], 8, 8, 1
    else:
        device, dtype, preset = "cuda", BF16, args.preset
        if not torch.cuda.is_available():
            parser.error("needs a CUDA GPU (use --smoke on a CPU)")
    model = build_model(preset, device=device, dtype=dtype).eval()
    rows = [bench(model, b, args.prompt, args.new_tokens, args.repeats) for b in args.batches]
    meta = run_meta(device, preset=preset, dtype=str(model.dtype).removeprefix("torch."))
    header, body = table(rows)
    print(f"\n{meta_line(meta)}\n{preset}, unit tokens/s\n{text_table(header, body)}")
    out = args.out or (None if args.smoke else str(RESULTS_DIR / "hf_generate.json"))
    if out is not None:
        md = f"{meta_line(meta)}\n\n{preset}, unit: tokens/s.\n\n{markdown_table(header, body)}\n"
        write_results(Path(out), meta, rows, md)


if __name__ == "__main__":
    main()
