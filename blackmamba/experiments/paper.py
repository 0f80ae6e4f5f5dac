"""``blackmamba experiment paper``: the paper's comparisons, re-run in miniature with one command.

BlackMamba (arXiv 2402.01771) claims four things against dense Mamba, a transformer and a transformer-MoE:
competitive quality, fewer training FLOPs, fewer inference FLOPs, and generation latency that grows
linearly with length where a transformer's grows faster. This experiment trains the four models
(:mod:`.baselines`: one config, four layer patterns, equal active parameters) on the same tokens for the same
training-FLOP budget, each taking ``budget / (training FLOPs per token x tokens per step)`` steps, then:

* validation loss and perplexity (and the loss curve against training FLOPs spent);
* the paper's zero-shot suite through lm-eval, offline (``limit`` documents per task; skipped with a note
  when lm-eval or the task data is missing);
* generation latency against length (:mod:`.latency`) and inference FLOPs per generated token
  (:mod:`blackmamba.training.flops`);
* the expert load per MoE block on the validation tokens (the two MoE models).

Output folder (``--out``)::

    experiment.json       the plan: preset, budget, data fingerprint, seed, and each model's config and steps
    configs/KIND.json     the model configs the trainer reads
    runs/KIND/            the trainer's runs (checkpoints, metrics.jsonl, summary.json)
    models/KIND.json      one model's finished results, written when all of its measurements are done
    results.json          metadata, result rows and every model's record (see :mod:`.results`)
    plots/val_loss_vs_flops.png, plots/latency.png, plots/expert_load.png

Resuming: a rerun with the same options skips every model with a ``models/KIND.json``, continues a partly
trained one from its last checkpoint through the trainer's resume (the same batches, so the same losses as
an uninterrupted run), and redoes the measurements of a model that had not finished them. A folder holding
an experiment with another plan (preset, budget, data, seed or models) is refused, as is a non-empty
folder holding no experiment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BlackMambaConfig, parameter_count
from ..devices import resolve_device, resolve_dtype
from ..errors import BlackMambaError
from ..training.data import DataError, TokenData
from ..training.flops import active_params, flops_per_token, generation_flops_per_token
from .baselines import KINDS, LABELS, matched_configs
from .presets import DEFAULT_PRESET, PRESETS, ExperimentPreset

PLAN = "experiment.json"
RESULTS = "results.json"
FORMAT = "blackmamba-experiment-paper/1"
# The plan's fields a rerun must repeat to continue an experiment (the data path may move; its contents not).
PLAN_MUST_MATCH = ("format", "preset", "budget_flops", "seed", "kinds", "data_fingerprint", "models")


class ExperimentError(BlackMambaError):
    """A bad option of the experiment, or an output folder it must not touch; the message says which."""


@dataclass
class PaperArgs:
    """Arguments of :func:`run_paper` (and of ``blackmamba experiment paper``), checked when made.

    ``preset`` is a name from :data:`~.presets.PRESETS` or a preset object; ``budget_flops`` the training FLOPs
    per model (default: the preset's); ``limit`` the documents per zero-shot task (default: the preset's,
    0 skips the suite); ``kinds`` the models to run (default all four)."""

    data: str
    out: str = "runs/paper"
    preset: str | ExperimentPreset = DEFAULT_PRESET
    budget_flops: float | None = None
    device: str = "auto"
    limit: int | None = None
    kinds: tuple[str, ...] = tuple(KINDS)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("data", "out"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif not isinstance(value, str) or not value:
                raise ExperimentError(f"--{name} must name a folder, got {value!r}")
        if isinstance(self.preset, str) and self.preset not in PRESETS:
            raise ExperimentError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if not isinstance(self.preset, str | ExperimentPreset):
            raise ExperimentError(f"--preset must be a preset name, got {self.preset!r}")
        if self.budget_flops is not None:
            ok = isinstance(self.budget_flops, int | float) and not isinstance(self.budget_flops, bool)
            if not ok or not math.isfinite(self.budget_flops) or self.budget_flops <= 0:
                raise ExperimentError(f"--budget-flops must be a finite number above 0, got {self.budget_flops!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0
        ):
            raise ExperimentError(f"--limit must be a whole number of documents >= 0 (0 skips), got {self.limit!r}")
        if isinstance(self.kinds, str):
            self.kinds = tuple(k.strip() for k in self.kinds.split(",") if k.strip())
        self.kinds = tuple(self.kinds)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ExperimentError(f"--kinds must name distinct models among {list(KINDS)}, got {list(self.kinds)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ExperimentError(f"--seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ExperimentError(f"--device must be a string such as auto, cpu or cuda, got {self.device!r}")

    @property
    def preset_object(self) -> ExperimentPreset:
        return PRESETS[self.preset] if isinstance(self.preset, str) else self.preset

    @property
    def budget(self) -> float:
        return float(self.budget_flops if self.budget_flops is not None else self.preset_object.budget_flops)

    @property
    def zero_shot_limit(self) -> int | None:
        return self.preset_object.zero_shot_limit if self.limit is None else self.limit

    def command(self) -> str:
        """The command line that runs this experiment."""
        parts = ["blackmamba", "experiment", "paper", "--data", self.data, "--out", self.out]
        parts += ["--preset", self.preset_object.name, "--budget-flops", f"{self.budget:g}", "--device", self.device]
        if self.limit is not None:
            parts += ["--limit", str(self.limit)]
        if self.kinds != tuple(KINDS):
            parts += ["--kinds", ",".join(self.kinds)]
        if self.seed:
            parts += ["--seed", str(self.seed)]
        return " ".join(shlex.quote(p) for p in parts)


def _log(message: str) -> None:
    print(f"[paper] {message}", file=sys.stderr, flush=True)


def _write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON through a temporary file and one rename: a reader (or a rerun after a
    kill) sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"cannot read {path}: {e}; remove it to redo that part") from None


# ------------------------------------------------------------------------------------------ the plan


@dataclass
class _Data:
    path: Path
    train: TokenData
    val: TokenData
    fingerprint: str


def _load_data(path: str) -> _Data:
    from ..training.rundir import manifest_fingerprint

    try:
        train = TokenData(path, "train")
        if "val" not in train.manifest["splits"]:
            raise ExperimentError(
                f"--data {path} has no validation split: prepare it with --val-fraction above 0 (the "
                "experiment compares validation losses)"
            )
        val = TokenData(path, "val")
    except DataError as e:
        raise ExperimentError(f"--data {path}: {e}") from None
    return _Data(Path(path), train, val, manifest_fingerprint(train.manifest))


def model_configs(preset: ExperimentPreset, vocab_size: int, kinds: tuple[str, ...]) -> dict[str, BlackMambaConfig]:
    """The configs of the experiment's models: the preset's BlackMamba on the data's vocabulary, and the
    baselines matched to it. The KV cache holds the longest generation that is timed."""
    longest = max(preset.seq_len, preset.prompt_tokens + max(preset.latency_tokens))
    base = BlackMambaConfig.from_dict(
        {**preset.model, "vocab_size": vocab_size, "tokenizer_vocab_size": vocab_size, "max_seq_len": longest}
    )
    configs = matched_configs(base, preset.head_dim)
    return {kind: configs[kind] for kind in kinds}


def make_plan(args: PaperArgs, data: _Data) -> dict[str, Any]:
    """What the experiment will do: per model its config, active parameters, training FLOPs per token and
    steps within the budget. Refuses a budget below one step of any model."""
    preset = args.preset_object
    tokens_per_step = preset.batch_size * preset.seq_len
    models = {}
    for kind, config in model_configs(preset, data.train.vocab_size, args.kinds).items():
        per_token = flops_per_token(config, preset.seq_len)["train"]
        steps = int(args.budget // (per_token * tokens_per_step))
        if steps < 1:
            raise ExperimentError(
                f"--budget-flops {args.budget:g} is below one training step of the {LABELS[kind]} model "
                f"({per_token * tokens_per_step:.3g} FLOPs for {tokens_per_step} tokens)"
            )
        models[kind] = {
            "config": config.to_dict(),
            "active_params": active_params(config),
            "train_flops_per_token": per_token,
            "steps": steps,
        }
    return {
        "format": FORMAT,
        "command": args.command(),
        "preset": dataclasses.asdict(preset),
        "budget_flops": args.budget,
        "seed": args.seed,
        "kinds": list(args.kinds),
        "data": str(data.path.resolve()),
        "data_fingerprint": data.fingerprint,
        "tokens_per_step": tokens_per_step,
        "models": models,
    }


def _open_out(out: Path, plan: dict[str, Any]) -> None:
    """Start ``out`` with ``plan``, or check that the experiment already there has the same plan."""
    if out.exists() and not out.is_dir():
        raise ExperimentError(f"--out {out} is a file, not a folder")
    existing = out / PLAN
    if existing.is_file():
        old = _read_json(existing)
        for key in PLAN_MUST_MATCH:
            if not isinstance(old, dict) or old.get(key) != json.loads(json.dumps(plan[key])):
                raise ExperimentError(
                    f"--out {out} holds an experiment with another {key!r} (recorded in {existing}): rerun it with "
                    "its own options to continue it (the 'command' recorded there), or choose another --out"
                )
        return
    if out.is_dir() and any(out.iterdir()):
        raise ExperimentError(
            f"--out {out} is not empty and holds no experiment ({PLAN}): choose a new or empty folder"
        )
    _write_json(existing, plan)


# ------------------------------------------------------------------------------------------ one model


@dataclass
class _Context:
    args: PaperArgs
    preset: ExperimentPreset
    out: Path
    data: _Data
    plan: dict[str, Any]


def _has_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("step-") for p in folder.iterdir())


def _train(ctx: _Context, kind: str) -> dict[str, Any]:
    """Train ``kind`` for its planned steps (continuing a partial run); returns the trainer's summary."""
    from ..training.trainer import TrainArgs, train

    preset, planned = ctx.preset, ctx.plan["models"][kind]
    run = ctx.out / "runs" / kind
    summary_file = run / "summary.json"
    if summary_file.is_file():
        summary = _read_json(summary_file)
        if summary.get("step") == planned["steps"] and "val_loss" in summary:
            return summary
    config_file = ctx.out / "configs" / f"{kind}.json"
    if not config_file.is_file():
        _write_json(config_file, planned["config"])
    steps = planned["steps"]
    resume = _has_checkpoint(run)
    _log(
        f"{'resuming' if resume else 'training'} {LABELS[kind]}: {steps} steps of {ctx.plan['tokens_per_step']} "
        f"tokens, {planned['train_flops_per_token'] / 1e6:.2f} MFLOP per token"
    )
    args = TrainArgs(
        data=str(ctx.data.path),
        out=str(run),
        config=str(config_file),
        max_steps=steps,
        batch_size=preset.batch_size,
        seq_len=preset.seq_len,
        lr=preset.lr,
        warmup=min(preset.warmup, steps // 10),
        eval_every=max(1, math.ceil(steps / preset.evaluations)),
        eval_tokens=preset.eval_tokens,
        save_every=max(1, math.ceil(steps / preset.saves)),
        keep_last=1,
        log_every=max(1, min(10, steps // 20)),
        seed=ctx.args.seed,
        device=ctx.args.device,
        resume=resume,
        overwrite=not resume and run.is_dir() and any(run.iterdir()),
        progress=ctx.args.progress,
        plots=False,
    )
    return train(args)


def _curve(run: Path, tokens_per_step: int, per_token: float) -> list[dict[str, float]]:
    """The validation points of a run (the last row of each step), with the training FLOPs spent by then."""
    points: dict[int, float] = {}
    metrics = run / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and "val_loss" in entry:
            points[entry["step"]] = float(entry["val_loss"])
    return [
        {"step": step, "train_flops": step * tokens_per_step * per_token, "val_loss": loss}
        for step, loss in sorted(points.items())
    ]


def _zero_shot(ctx: _Context, checkpoint: Path) -> tuple[dict[str, float], str | None]:
    """Accuracy per task of the paper's suite ({} and a note when it is skipped or cannot run)."""
    limit = ctx.args.zero_shot_limit
    if limit == 0 or not ctx.preset.tasks:
        return {}, "zero-shot suite skipped (--limit 0)"
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return {}, "zero-shot suite skipped: lm-eval is not installed (pip install lm-eval==0.4.13)"
    from ..eval.cli import run_eval
    from ..eval.taskdata import EvalDataError

    try:
        report = run_eval(checkpoint, list(ctx.preset.tasks), limit=limit, device=ctx.args.device, print_table=False)
    except EvalDataError as e:
        return {}, f"zero-shot suite skipped: {e}"
    accuracy = {task: float(m["acc,none"]) for task, m in report["results"].items() if "acc,none" in m}
    return accuracy, None


def _measure(ctx: _Context, kind: str, summary: dict[str, Any], train_s: float) -> dict[str, Any]:
    """Everything measured on one trained model."""
    from ..checkpoint import load_pretrained
    from .latency import latency_curve

    preset, planned = ctx.preset, ctx.plan["models"][kind]
    config = BlackMambaConfig.from_dict(planned["config"])
    checkpoint = Path(summary["checkpoint"])
    device = resolve_device(ctx.args.device)
    started = time.monotonic()
    _log(f"measuring {LABELS[kind]}: zero-shot suite, generation latency")
    zero_shot, note = _zero_shot(ctx, checkpoint)
    model = load_pretrained(checkpoint, device=device, dtype=resolve_dtype("auto", device))
    prompt = [int(t) for t in ctx.data.val.tokens[: preset.prompt_tokens]]
    latency = latency_curve(model, prompt, preset.latency_tokens, preset.latency_repeats)
    steps = summary["step"]
    with_val = "val_loss" in summary
    return {
        "kind": kind,
        "label": LABELS[kind],
        "config": planned["config"],
        "checkpoint": str(checkpoint),
        "active_params": planned["active_params"],
        "parameters": parameter_count(config),
        "steps": steps,
        "train_tokens": steps * ctx.plan["tokens_per_step"],
        "train_flops_per_token": planned["train_flops_per_token"],
        "train_flops": steps * ctx.plan["tokens_per_step"] * planned["train_flops_per_token"],
        "val_loss": summary["val_loss"] if with_val else math.nan,
        "val_ppl": summary.get("val_ppl", math.nan),
        "unigram_val_loss": summary.get("unigram_val_loss"),
        "curve": _curve(ctx.out / "runs" / kind, ctx.plan["tokens_per_step"], planned["train_flops_per_token"]),
        "expert_load": summary.get("val_expert_load"),
        "latency_s": {str(n): s for n, s in latency.items()},
        "inference_flops_per_token": {
            str(n): generation_flops_per_token(config, preset.prompt_tokens, n) for n in preset.latency_tokens
        },
        "zero_shot": zero_shot,
        "zero_shot_limit": ctx.args.zero_shot_limit,
        "notes": [note] if note else [],
        "train_seconds": train_s,
        "measure_seconds": round(time.monotonic() - started, 1),
    }


def _run_model(ctx: _Context, kind: str) -> dict[str, Any]:
    record_file = ctx.out / "models" / f"{kind}.json"
    if record_file.is_file():
        _log(f"{LABELS[kind]}: finished in an earlier run ({record_file}); skipped")
        return _read_json(record_file)
    started = time.monotonic()
    summary = _train(ctx, kind)
    record = _measure(ctx, kind, summary, round(time.monotonic() - started, 1))
    _write_json(record_file, record)
    return record


# ------------------------------------------------------------------------------------------ the experiment


def run_paper(args: PaperArgs) -> dict[str, Any]:
    """Run (or continue) the experiment described by ``args``; returns what ``results.json`` holds."""
    from .plots import plot_expert_load, plot_latency, plot_loss_vs_flops
    from .results import result_rows, run_meta

    args.validate()
    started = time.monotonic()
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise ExperimentError(f"--device: {e}") from None
    out = Path(args.out)
    data = _load_data(args.data)
    plan = make_plan(args, data)
    _open_out(out, plan)
    ctx = _Context(args, args.preset_object, out, data, plan)
    for kind in args.kinds:
        m = plan["models"][kind]
        _log(
            f"plan: {LABELS[kind]:<16} {m['active_params']:>12,} active parameters  {m['steps']:>7,} steps  "
            f"{m['train_flops_per_token'] / 1e6:8.2f} MFLOP/token (training)"
        )
    models = {kind: _run_model(ctx, kind) for kind in args.kinds}
    notes = sorted({note for record in models.values() for note in record["notes"]})
    plots = [plot_loss_vs_flops(models, out / "plots" / "val_loss_vs_flops.png")]
    plots.append(plot_latency(models, out / "plots" / "latency.png"))
    load = plot_expert_load(models, out / "plots" / "expert_load.png")
    plots += [load] if load is not None else []
    meta = run_meta(
        device,
        args.command(),
        experiment="paper",
        preset=ctx.preset.name,
        budget_flops=args.budget,
        device=str(device),
        data=str(data.path),
        data_tokens={"train": len(data.train), "val": len(data.val)},
        seconds_this_run=round(time.monotonic() - started, 1),
    )
    results = {
        "meta": meta,
        "results": result_rows(models),
        "models": models,
        "plan": plan,
        "notes": notes,
        "plots": [str(p) for p in plots],
    }
    _write_json(out / RESULTS, results)
    return results


def summary_table(results: dict[str, Any]) -> str:
    """A plain-text table of the experiment's main figures, one line per model."""
    header = ["model", "active params", "steps", "train PFLOP", "val loss", "ppl", "zero-shot acc", "latency"]
    lines = [header]
    for kind, r in results["models"].items():
        longest = max(r["latency_s"], key=int, default=None)
        latency = f"{r['latency_s'][longest]:.2f} s / {longest} tok" if longest else "-"
        accs = list(r["zero_shot"].values())
        acc = f"{sum(accs) / len(accs):.3f} ({len(accs)} tasks)" if accs else "-"
        lines.append(
            [
                LABELS[kind],
                f"{r['active_params']:,}",
                str(r["steps"]),
                f"{r['train_flops'] / 1e15:.4f}",
                f"{r['val_loss']:.4f}",
                f"{r['val_ppl']:.1f}",
                acc,
                latency,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
