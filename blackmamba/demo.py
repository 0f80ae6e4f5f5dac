"""The main job behind ``make demo``: prepare Shakespeare, train the ``small`` preset for a bounded time
(on the GPU when there is one), compare its validation loss with a unigram baseline, save the checkpoint
and plots, and generate text with the trained model."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import load_pretrained
from .generation import stream_generate
from .tokenizer import load_tokenizer


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def run_demo(
    out_dir: str = "runs/demo",
    prompt: str = "ROMEO:",
    max_new_tokens: int = 300,
    seed: int = 0,
    minutes: float = 9.0,
) -> dict:
    from .training.data import MANIFEST, prepare
    from .training.plots import plot_run
    from .training.trainer import TrainArgs, train

    out = Path(out_dir)
    data_dir = out / "data"
    _step(1, "preparing Shakespeare's plays: byte-level BPE of 4,096 tokens, 5% of the plays held out")
    manifest_file = data_dir / MANIFEST
    if manifest_file.is_file() and json.loads(manifest_file.read_text()).get("tokenizer") == "bpe:4096":
        print(f"    reusing {data_dir}")
    else:
        t0 = time.perf_counter()
        prepare(["shakespeare"], data_dir, tokenizer="bpe:4096", val_fraction=0.05)
        print(f"    done in {time.perf_counter() - t0:.0f} s")
    manifest = json.loads(manifest_file.read_text())
    for split, info in manifest["splits"].items():
        print(f"    {split:<5} {len(info['documents']):>3} plays {info['tokens']:>10,} tokens")

    run = out / "run"
    _step(2, f"training the 'small' preset for about {minutes:g} minutes (Sinkhorn routing, AdamW, cosine schedule)")
    summary = train(
        TrainArgs(
            data=str(data_dir),
            out=str(run),
            preset="small",
            max_minutes=minutes,
            batch_size=8,
            seq_len=128,
            lr=3e-3,
            min_lr=3e-4,
            warmup=30,
            eval_every=100,
            eval_tokens=32768,
            save_every=10**9,
            seed=seed,
        )
    )

    _step(3, "validation loss against a unigram baseline on the same held-out plays")
    gap = summary["unigram_val_loss"] - summary["val_loss"]
    print(f"    steps trained      {summary['step']}")
    print(f"    validation loss    {summary['val_loss']:.3f} nats/token (perplexity {summary['val_ppl']:.1f})")
    print(f"    unigram baseline   {summary['unigram_val_loss']:.3f} nats/token")
    print(f"    improvement        {gap:.3f} nats/token")

    _step(4, "plots and checkpoint")
    for path in plot_run(run):
        print(f"    {path}")
    print(f"    checkpoint: {summary['checkpoint']}")

    _step(5, f"generating {max_new_tokens} tokens after {prompt!r} with the trained model")
    model = load_pretrained(summary["checkpoint"])
    tokenizer = load_tokenizer(summary["checkpoint"], model.config.vocab_size)
    new: list[int] = []
    shown = ""
    t0 = time.perf_counter()
    print(prompt, end="", flush=True)
    for step in stream_generate(
        model, [tokenizer.encode(prompt).ids], max_new_tokens, temperature=0.8, top_k=50, seed=seed
    ):
        if step[0] is None:
            break
        new.append(step[0])
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):
            print(text[len(shown) :], end="", flush=True)
            shown = text
    elapsed = time.perf_counter() - t0
    print(f"\n\n    {len(new)} tokens in {elapsed:.1f} s ({len(new) / elapsed:.0f} tokens/s, prefill included)")
    print(f"\nTry: blackmamba generate --model {summary['checkpoint']} --prompt 'JULIET:' --temperature 0.8 --stream")
    return summary
