"""The training loop: AdamW, warmup + cosine, clipping, accumulation, periodic validation, metrics,
atomic checkpoints that resume exactly.

Run directory::

    RUN/metrics.jsonl                 one JSON row per logged step ({"step", "loss", "lr", ...}) and per eval
    RUN/checkpoints/step-00000500/    config.json + model.safetensors + tokenizer.json + trainer_state.pt
    RUN/plots/*.png                   written at the end (and by `blackmamba plot RUN`)

Every checkpoint directory loads with :func:`blackmamba.load_pretrained`. ``trainer_state.pt`` holds the
optimizer, the step, the RNG states and the training arguments; the data position is the step itself
(each step's windows are a function of the seed and the step), so ``resume`` continues with exactly the
batches, and therefore the losses, of an uninterrupted run. Checkpoints are written to a temporary
directory and renamed into place: a crash mid-write leaves the previous ones intact.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import atomic_directory, load_pretrained, save_pretrained
from ..config import BlackMambaConfig
from ..devices import resolve_device
from ..model import BlackMamba
from .data import TokenData
from .flops import flops_per_token
from .optim import build_optimizer, lr_at

STATE_FILE = "trainer_state.pt"
METRICS = "metrics.jsonl"


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainArgs:
    """Arguments of :func:`train` (and of ``blackmamba train``)."""

    data: str
    out: str
    preset: str | None = None
    config: str | None = None
    max_steps: int | None = None
    max_minutes: float | None = None
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    resume: bool = False
    init_from: str | None = None
    peak_tflops: float | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Append-only JSONL metrics (plus TensorBoard when it is installed)."""

    def __init__(self, run: Path, resume_step: int | None) -> None:
        self.path = run / METRICS
        if resume_step is not None and self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def build_model(args: TrainArgs, vocab_size: int) -> tuple[BlackMamba, BlackMambaConfig]:
    if args.init_from:
        model = load_pretrained(args.init_from, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise TrainingError(
                f"--init-from model has a vocabulary of {model.config.vocab_size}, the data needs {vocab_size}"
            )
        return model.train(), model.config
    if bool(args.preset) == bool(args.config):
        raise TrainingError("give exactly one of --preset or --config (or --init-from)")
    overrides = dict(args.extra.get("config_overrides", {}))
    config = (
        BlackMambaConfig.from_preset(args.preset, **overrides)
        if args.preset
        else BlackMambaConfig.from_dict({**json.loads(Path(args.config).read_text()), **overrides})
    )
    if config.vocab_size < vocab_size:
        config = BlackMambaConfig.from_dict({**config.to_dict(), "vocab_size": vocab_size})
    if config.tokenizer_vocab_size is None or config.tokenizer_vocab_size > vocab_size:
        config = BlackMambaConfig.from_dict({**config.to_dict(), "tokenizer_vocab_size": vocab_size})
    torch.manual_seed(args.seed)
    return BlackMamba(config), config


@torch.no_grad()
def evaluate(model: BlackMamba, data: TokenData, args: TrainArgs, device: torch.device, autocast) -> dict:
    """Validation loss (nats/token) and perplexity over up to ``eval_tokens`` tokens, and expert load."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    load = None
    for x, y in data.sequential_batches(args.seq_len, args.batch_size, args.eval_tokens):
        with autocast():
            out = model(x.to(device))
        total += F.cross_entropy(out.logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
        if out.expert_counts is not None:
            load = out.expert_counts.double() if load is None else load + out.expert_counts.double()
    model.train(was_training)
    loss = total / max(count, 1)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if load is not None:
        result["val_expert_load"] = (load / load.sum(1, keepdim=True)).tolist()
    return result


def unigram_loss(train: TokenData, val: TokenData, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under add-one smoothed train unigram counts."""
    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val.tokens, dtype=np.int64)].mean())


def save_checkpoint(
    run: Path, model: BlackMamba, optimizer, step: int, args: TrainArgs, extra: dict, tokenizer
) -> Path:
    target = run / "checkpoints" / f"step-{step:08d}"
    if target.exists():
        return target
    tmp_root = run / "checkpoints"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        save_pretrained(model, tmp / "weights", tokenizer=tokenizer)
        for f in (tmp / "weights").iterdir():
            os.replace(f, tmp / f.name)
        (tmp / "weights").rmdir()
        delay = float(os.environ.get("BLACKMAMBA_TEST_SAVE_DELAY", "0"))  # tests kill the process here
        if delay:
            time.sleep(delay)
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(), "args": asdict(args), **extra}
        torch.save(state, tmp / STATE_FILE)
    ckpts = _checkpoints(run)
    for old in ckpts[: max(0, len(ckpts) - args.keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _clean_stale_temporaries(run: Path) -> None:
    root = run / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):  # left by a crash during a checkpoint write
                shutil.rmtree(p, ignore_errors=True)


def train(args: TrainArgs) -> dict:
    """Train a model as described by ``args``; returns a summary (final step, losses, paths)."""
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    _clean_stale_temporaries(run)
    device = resolve_device(args.device)
    train_data = TokenData(args.data, "train")
    val_data = TokenData(args.data, "val") if "val" in train_data.manifest["splits"] else None
    from tokenizers import Tokenizer

    tok_file = Path(args.data) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tok_file)) if tok_file.is_file() else None

    resume_from = None
    if args.resume:
        ckpts = _checkpoints(run)
        if not ckpts:
            raise TrainingError(f"--resume: no checkpoint found under {run / 'checkpoints'}")
        resume_from = ckpts[-1]

    if resume_from is not None:
        model = load_pretrained(resume_from, dtype=torch.float32).train()
        config = model.config
    else:
        model, config = build_model(args, train_data.vocab_size)
    model.to(device).train()
    if args.grad_checkpointing:
        model.gradient_checkpointing = True
    optimizer = build_optimizer(model, args.lr, args.weight_decay, fused=device.type == "cuda")
    use_bf16 = device.type == "cuda" and args.dtype in ("auto", "bfloat16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    step_fn = torch.compile(model) if args.compile else model

    start_step, max_steps = 0, args.max_steps
    if resume_from is not None:
        state = torch.load(resume_from / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        start_step = state["step"]
        # The stored schedule length unless the caller extends the run with a new --max-steps.
        max_steps = args.max_steps or state["max_steps"]
    metrics = MetricsLog(run, start_step if resume_from is not None else None)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    fpt = flops_per_token(config, args.seq_len)["train"]
    peak = args.peak_tflops or (784.0 if device.type == "cuda" else None)

    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    if max_steps is None and deadline is None:
        raise TrainingError("give --max-steps or --max-minutes")
    if max_steps is None:
        # Calibrate: time two steps without updating, then fix the schedule length for this run.
        t0 = time.monotonic()
        for probe in range(2):
            x, y = train_data.batch(
                train_data.window_starts(args.seed, probe, args.batch_size, args.seq_len), args.seq_len
            )
            with autocast():
                loss = F.cross_entropy(step_fn(x.to(device)).logits.float().flatten(0, 1), y.to(device).flatten())
            (loss * 0).backward()
        optimizer.zero_grad(set_to_none=True)
        per_step = (time.monotonic() - t0) / 2 * args.grad_accum
        max_steps = max(1, int((deadline - time.monotonic()) / (per_step * 1.08)))

    bar = tqdm(total=max_steps, initial=start_step, desc="train", unit="step", disable=not args.progress or None)
    last_eval: dict = {}
    step = start_step
    window_tokens, window_time = 0, time.monotonic()
    load_acc = None
    while step < max_steps:
        if deadline is not None and step > start_step and time.monotonic() > deadline:
            break  # out of time (every run makes at least one step)
        lr = lr_at(step, max_steps, args.lr, args.min_lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total_loss, aux_total = 0.0, 0.0
        iters = []
        for micro in range(args.grad_accum):
            starts = train_data.window_starts(args.seed, step * args.grad_accum + micro, args.batch_size, args.seq_len)
            x, y = train_data.batch(starts, args.seq_len)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                out = step_fn(x)
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
                objective = loss if out.aux_loss is None else loss + out.aux_loss
            if not torch.isfinite(objective):
                bar.close()
                metrics.close()
                good = _checkpoints(run)
                where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                raise TrainingError(f"non-finite loss ({objective.item()}) at step {step}; stopping: {where}")
            (objective / args.grad_accum).backward()
            total_loss += loss.item() / args.grad_accum
            if out.aux_loss is not None:
                aux_total += out.aux_loss.item() / args.grad_accum
            if out.expert_counts is not None:
                counts = out.expert_counts.detach().double().cpu()
                load_acc = counts if load_acc is None else load_acc + counts
            iters.extend(out.sinkhorn_iters)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip) if args.clip > 0 else None
        if grad_norm is not None and not torch.isfinite(grad_norm):
            bar.close()
            metrics.close()
            raise TrainingError(f"non-finite gradient norm at step {step}; stopping with the last checkpoint intact")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_step
        bar.update(1)

        if step % args.log_every == 0 or step == max_steps:
            elapsed = time.monotonic() - window_time
            tps = window_tokens / max(elapsed, 1e-9)
            row = {"step": step, "loss": total_loss, "lr": lr, "tokens_per_s": tps, "tokens": step * tokens_per_step}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if aux_total:
                row["aux_loss"] = aux_total
            if iters:
                row["sinkhorn_iters"] = sum(iters) / len(iters)
            if load_acc is not None:
                row["expert_load"] = (load_acc / load_acc.sum(1, keepdim=True)).tolist()
                load_acc = None
            if peak:
                row["mfu"] = tps * fpt / (peak * 1e12)
            metrics.write(row)
            bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{tps:,.0f}")
        if val_data is not None and (step % args.eval_every == 0 or step == max_steps):
            last_eval = evaluate(model, val_data, args, device, autocast)
            metrics.write({"step": step, **last_eval})
            bar.set_postfix(loss=f"{total_loss:.3f}", val=f"{last_eval['val_loss']:.3f}")
        if step % args.save_every == 0:
            save_checkpoint(run, model, optimizer, step, args, {"max_steps": max_steps}, tokenizer)
        if step % args.log_every == 0 or step % args.eval_every == 0 or step % args.save_every == 0:
            # Throughput counts training time only: restart the window after logging, evaluation or saving.
            window_tokens, window_time = 0, time.monotonic()
    bar.close()
    if val_data is not None and not last_eval:
        last_eval = evaluate(model, val_data, args, device, autocast)
        metrics.write({"step": step, **last_eval})
    final = save_checkpoint(run, model, optimizer, step, args, {"max_steps": max_steps}, tokenizer)
    metrics.close()
    summary = {"step": step, "max_steps": max_steps, "checkpoint": str(final), **last_eval}
    if val_data is not None:
        summary["unigram_val_loss"] = unigram_loss(train_data, val_data, train_data.vocab_size)
    (run / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
