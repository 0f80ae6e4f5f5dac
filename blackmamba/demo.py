"""The main job behind ``make demo``: prepare Shakespeare, train the ``small`` preset for a bounded time
(on the GPU when there is one), compare its validation loss with a unigram baseline, save the checkpoint
and plots, and generate text with the trained model.

The comparison only means something after a few hundred steps (the README's run: about 400 steps in 9
minutes on 2 CPU cores). A budget too short for that still runs, with a warning before and after.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

from .checkpoint import load_pretrained
from .errors import BlackMambaError
from .eval.outputs import check_output_dir
from .generation import stream_generate
from .tokenizer import load_tokenizer

# Below these the demo still runs, but says its numbers mean little.
MIN_USEFUL_MINUTES = 3.0
MIN_USEFUL_STEPS = 100
DEMO_OUTPUTS = frozenset({"data", "run"})  # what the demo writes in its --out folder


class DemoError(BlackMambaError, ValueError):
    """A bad option of ``blackmamba demo``."""


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _shown_path(path: Path) -> str:
    """``path`` as typed in a shell opened in the current folder: relative when it lies below it."""
    try:
        rel = path.relative_to(Path.cwd())
    except ValueError:
        return str(path)
    return str(rel) if rel.parts else "."


def cli_command() -> str:
    """The ``blackmamba`` command as it can be pasted into a fresh shell (no virtual environment
    activated) in the current folder: the console script beside this Python (``.venv/bin/blackmamba``
    after the README's set-up), or ``PYTHON -m blackmamba`` when there is none."""
    bin_dir = Path(os.path.abspath(sys.executable)).parent  # not resolved: a venv's python is a symlink
    script = bin_dir / "blackmamba"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(_shown_path(script))
    return f"{shlex.quote(_shown_path(Path(os.path.abspath(sys.executable))))} -m blackmamba"


def try_command(checkpoint: str | os.PathLike) -> str:
    """The demo's closing suggestion: sample from ``checkpoint`` with the command line, as a line that works
    pasted into a fresh shell in the current folder."""
    model = shlex.quote(_shown_path(Path(os.path.abspath(checkpoint))))
    return f"{cli_command()} generate --model {model} --prompt 'JULIET:' --temperature 0.8 --stream"


def check_demo_options(out_dir: str | os.PathLike, prompt: str, max_new_tokens: int, minutes: float) -> Path:
    """Refuse bad options before anything is written or computed; the checked output folder."""
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not math.isfinite(minutes) or minutes <= 0:
        raise DemoError(f"--minutes must be a positive number of minutes, got {minutes!r}")
    if not prompt:
        raise DemoError("--prompt is empty: give some text to continue")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise DemoError(f"--max-new-tokens must be a whole number >= 0, got {max_new_tokens!r}")
    return check_output_dir(out_dir, "--out", allowed=DEMO_OUTPUTS)


def judge(steps: int, gap: float) -> list[str]:
    """Warnings for a result that means little: too few steps, or no better than the unigram baseline."""
    warnings = []
    if steps < MIN_USEFUL_STEPS:
        warnings.append(
            f"only {steps} training step{'s' if steps != 1 else ''}: too few for the model to learn much "
            f"(the README's run made about 1,000 in 9 minutes); give --minutes {MIN_USEFUL_MINUTES:g} or more"
        )
    if not gap > 0:
        warnings.append(
            f"the model is no better than the unigram baseline (improvement {gap:.3f} nats/token): "
            "it has not trained long enough, so its loss and sample mean nothing yet"
        )
    return warnings


def run_demo(
    out_dir: str = "runs/demo",
    prompt: str = "ROMEO:",
    max_new_tokens: int = 300,
    seed: int = 0,
    minutes: float = 9.0,
) -> dict:
    """Run the demo under ``out_dir`` (``data/`` and ``run/``); returns the training summary with
    ``train_minutes`` and ``warnings`` added. ``minutes`` is the training budget."""
    from .training.data import MANIFEST, prepare
    from .training.plots import plot_run
    from .training.trainer import TrainArgs, train

    out = check_demo_options(out_dir, prompt, max_new_tokens, minutes)
    if minutes < MIN_USEFUL_MINUTES:
        _warn(
            f"--minutes {minutes:g} is too short for the model to learn much: expect a loss near the unigram "
            f"baseline (use {MIN_USEFUL_MINUTES:g} or more; the README's numbers come from 9)"
        )
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
    unit = "minute" if minutes == 1 else "minutes"
    _step(2, f"training the 'small' preset for about {minutes:g} {unit} (Sinkhorn routing, AdamW, cosine schedule)")
    t0 = time.perf_counter()
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
            overwrite=True,  # a re-run of the demo replaces its own earlier run (train never deletes other files)
        )
    )
    summary["train_minutes"] = (time.perf_counter() - t0) / 60

    _step(3, "validation loss against a unigram baseline on the same held-out plays")
    gap = summary["unigram_val_loss"] - summary["val_loss"]
    trained = summary["train_minutes"]
    print(f"    steps trained      {summary['step']} in {int(trained)} min {60 * trained % 60:.0f} s")
    print(f"    validation loss    {summary['val_loss']:.3f} nats/token (perplexity {summary['val_ppl']:.1f})")
    print(f"    unigram baseline   {summary['unigram_val_loss']:.3f} nats/token")
    print(f"    improvement        {gap:.3f} nats/token")
    summary["warnings"] = judge(summary["step"], gap)
    for message in summary["warnings"]:
        _warn(message)

    _step(4, "plots and checkpoint")
    plots = sorted((run / "plots").glob("*.png")) or plot_run(run)  # train writes them unless it could not
    for path in plots:
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
    rate = len(new) / max(elapsed, 1e-9)
    print(f"\n\n    {len(new)} tokens in {elapsed:.1f} s ({rate:.0f} tokens/s, prefill included)")
    print(f"\nTry: {try_command(summary['checkpoint'])}")
    return summary
