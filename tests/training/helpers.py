"""Shared pieces of the trainer tests: a tiny learnable corpus, tiny training arguments, metrics readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from blackmamba.training.data import prepare
from blackmamba.training.trainer import TrainArgs

WORDS = "the king queen castle sword crown horse river night day love war peace bread wine".split()


def write_corpus(root: Path, n_docs: int = 12, seed: int = 0, words: list[str] | None = None) -> Path:
    """Small documents with learnable structure (a fixed successor for most words)."""
    words = words or WORDS
    rng = np.random.default_rng(seed)
    succ = {w: words[(i * 5 + 3) % len(words)] for i, w in enumerate(words)}
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        w, text = words[d % len(words)], []
        for _ in range(400):
            text.append(w)
            w = succ[w] if rng.random() < 0.85 else words[rng.integers(len(words))]
        (root / f"doc{d:02d}.txt").write_text(" ".join(text) + "\n")
    return root


def prepare_tiny_data(root: Path, seed: int = 0, words: list[str] | None = None) -> Path:
    """A prepared dataset (BPE of 300 tokens, 20% of the documents held out) under ``root/tok``."""
    prepare(
        [str(write_corpus(root / "text", seed=seed, words=words))], root / "tok", tokenizer="bpe:300", val_fraction=0.2
    )
    return root / "tok"


def tiny_args(data_dir, out, **kw) -> TrainArgs:
    base = dict(
        data=str(data_dir),
        out=str(out),
        preset="tiny",
        max_steps=12,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        min_lr=3e-4,
        warmup=2,
        eval_every=6,
        eval_tokens=2048,
        save_every=6,
        log_every=1,
        progress=False,
        plots=False,
    )
    return TrainArgs(**{**base, **kw})


def metric_rows(run) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run) -> list[tuple[int, float]]:
    """(step, training loss) of every logged step, in file order."""
    return [(r["step"], r["loss"]) for r in metric_rows(run) if "loss" in r]


def checkpoint_names(run, hidden: bool = False) -> list[str]:
    """The names in RUN/checkpoints; hidden ones (temporaries) only when asked."""
    root = Path(run) / "checkpoints"
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return names if hidden else [n for n in names if not n.startswith(".")]
