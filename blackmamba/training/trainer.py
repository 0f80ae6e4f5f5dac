"""The training loop: AdamW, warmup + cosine, clipping, accumulation, periodic validation, metrics,
atomic checkpoints that resume exactly.

Run directory (see :mod:`blackmamba.training.rundir` for the rules that keep it safe)::

    RUN/metrics.jsonl                 one JSON row per logged step ({"step", "loss", "lr", ...}) and per eval
    RUN/checkpoints/step-00000500/    config.json + model.safetensors + tokenizer.json + trainer_state.pt
    RUN/summary.json, RUN/plots/*.png written at the end (plots also by `blackmamba plot RUN`)

Every checkpoint directory loads with :func:`blackmamba.load_pretrained`. ``trainer_state.pt`` holds the
optimizer, the step, the RNG states, the training arguments and fingerprints of the data and tokenizer;
the data position is the step itself (each step's windows are a function of the seed and the step), so
``resume`` continues with exactly the batches, and therefore the losses, of an uninterrupted run, and
refuses to continue with another seed, batch shape or dataset. Parameters are checked for NaN and inf
before every save, so every checkpoint on disk is one a run can continue from.

A time budget (``max_minutes``) covers the whole call: the schedule is fitted to measured step, evaluation
and save times, and the loop stops early if steps turn out slower, keeping time for the final evaluation,
checkpoint and plots.

Launched by ``torchrun``, every rank runs :func:`train` (see :mod:`blackmamba.training.distributed`): the
model is parallelized after it is built (``fsdp``, ``expert_parallel``), each rank reads its share of every
global batch, so the losses do not depend on the number of ranks, and every decision that changes which
collectives run (stop for time, stop on NaN, the fitted schedule) is taken alike on all ranks. Only rank 0
touches the run folder's lock, metrics, progress, summary and plots. Checkpoints are then distributed
(:mod:`blackmamba.training.dcp`, written asynchronously), resumable on any number of ranks and by one
plain process, and the final model is exported to ``RUN/model`` in the single-folder layout. Without
torchrun nothing of this is imported and the checkpoints are the single-folder ones above.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import CheckpointError, atomic_directory, load_pretrained, save_pretrained
from ..config import BlackMambaConfig, ConfigError
from ..devices import resolve_device
from ..errors import BlackMambaError
from ..model import BlackMamba
from ..options import option
from ..tokenizer import NEOX_SIZE
from .data import TokenData
from .flops import flops_per_token
from .guard import FiniteGuard, StepValues
from .optim import build_optimizer, clip_gradients, lr_at
from .precision import CastOnce
from .rundir import (
    CHECKPOINTS,
    METRICS,
    MODEL,
    STATE_FILE,
    SUMMARY,
    MetricsLog,
    RunLock,
    TrainingError,
    check_out_contents,
    check_out_path,
    checkpoints,
    clean_stale,
    is_distributed_checkpoint,
    load_distributed_state,
    load_state,
    manifest_fingerprint,
    prune_checkpoints,
    remove_outputs,
    rng_state,
    rng_to_json,
    save_state,
    set_rng_state,
    tokenizer_fingerprint,
    warn,
    write_text_atomic,
)

__all__ = ["METRICS", "STATE_FILE", "TrainArgs", "TrainingError", "evaluate", "save_checkpoint", "train"]

# With a time budget, the schedule is fitted after this many steps at most (fewer when the warmup is shorter).
# make demo (warmup 30) fitted after 10 steps measured 0.51 s per step where the run then made 0.46, and left
# 2.3 of its 9 minutes unused (2026-12-02); the later steps are the steady ones.
FIT_STEPS = 30
# Fewer optimizer steps than this in a time budget trains a model whose numbers mean little.
MEANINGFUL_STEPS = 20
# Options that fix the batches and the loss curve: a resumed run must repeat them.
RESUME_MUST_MATCH = ("seed", "batch_size", "seq_len", "grad_accum")
# Options a resumed run may change (after a divergence, say); the curve then departs from the original.
RESUME_MAY_CHANGE = ("lr", "min_lr", "warmup", "weight_decay", "clip")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(kw_only=True)
class TrainArgs:
    """Arguments of :func:`train`, checked when the object is made. ``blackmamba train`` is derived from these
    fields (flag, type, default, help; see :mod:`blackmamba.options`), so each is stated here only."""

    preset: str | None = option(None, "model preset (tiny, small, blackmamba-1.5b, blackmamba-2.8b)", group="model")
    config: str | None = option(None, "model config JSON", group="model")
    data: str = option(help="directory from `blackmamba data prepare`")
    out: str = option(help="run directory (metrics, checkpoints, plots)")
    max_steps: int | None = option(None, "optimizer steps")
    max_minutes: float | None = option(None, "time budget; the schedule is fitted to it")
    batch_size: int = option(16, "sequences per micro-batch")
    seq_len: int = option(256, "tokens per sequence")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(2e-3, "peak learning rate")
    min_lr: float | None = option(None, "final learning rate of the cosine decay (default: --lr / 10)")
    warmup: int = option(50, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay (not on A_log, D, norms, biases, embedding)")
    clip: float = option(1.0, "gradient-norm clipping (0 = off)")
    eval_every: int = option(100, "validation every N steps")
    eval_tokens: int = option(65536, "validation tokens per evaluation")
    save_every: int = option(500, "checkpoint every N steps (and at the end)")
    keep_last: int = option(2, "newest checkpoints to keep (at least 1)")
    log_every: int = option(10, "metrics row every N steps")
    seed: int = option(0, "seed of the initial weights and of the batch order")
    device: str = option("auto", "auto, cpu, cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "auto: bf16 autocast on GPU, fp32 on CPU")
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute activations in backward")
    cast_once: bool = option(
        False, "bf16 copies of the matmul weights made once per optimizer step, not per micro-batch (one process)"
    )
    fsdp: bool = option(
        False, "under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2, per block)"
    )
    fsdp_unit_blocks: int = option(
        0,
        "with --fsdp: consecutive blocks per FSDP unit (fewer units: less host work per step, more memory); "
        "0: 4 on one rank, 1 on several",
    )
    expert_parallel: int = option(
        1, "under torchrun: ranks that share out each MoE layer's experts (divides the ranks and the experts)"
    )
    dist_timeout: float = option(
        600.0, "under torchrun: seconds a collective may wait for the other ranks before the job fails"
    )
    resume: bool = option(False, "continue from the run's latest checkpoint (same seed, batch, data)")
    overwrite: bool = option(False, "replace the training run already in --out")
    init_from: str | None = option(None, "start from this checkpoint (released layout or ours)")
    force_tokenizer: bool = option(
        False, "with --init-from: train even if the data was prepared with another tokenizer than the checkpoint's"
    )
    peak_tflops: float | None = option(None, "peak TFLOP/s for MFU (default 784 on GPU)")
    progress: bool = option(True, "no progress bar or lines")
    progress_every: float = option(30.0, "seconds between progress lines when stderr is not a terminal")
    plots: bool = option(True, "do not write RUN/plots at the end")

    def __post_init__(self) -> None:
        self.validate()

    @property
    def final_lr(self) -> float:
        """The learning rate at the end of the cosine decay."""
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        """Raise :class:`TrainingError` naming the first option whose value cannot work."""
        for name in ("data", "out"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif not isinstance(value, str) or not value:
                raise TrainingError(f"{_flag(name)} must name a folder, got {value!r}")
        for name in ("preset", "config", "init_from"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise TrainingError(f"{_flag(name)} must be a non-empty string, got {value!r}")
        at_least = {"batch_size": 1, "seq_len": 1, "grad_accum": 1, "eval_every": 1, "eval_tokens": 1}
        at_least |= {"save_every": 1, "keep_last": 1, "log_every": 1, "warmup": 0, "seed": 0, "expert_parallel": 1}
        at_least["fsdp_unit_blocks"] = 0
        for name, low in at_least.items():
            _check_int(name, getattr(self, name), low)
        if self.seed >= 2**63:
            raise TrainingError(f"--seed must be below 2**63, got {self.seed}")
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        for name, strict in (("lr", True), ("weight_decay", False), ("clip", False), ("progress_every", False)):
            _check_float(name, getattr(self, name), strict)
        _check_float("dist_timeout", self.dist_timeout, True)
        for name, strict in (("min_lr", False), ("max_minutes", True), ("peak_tflops", True)):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name), strict)
        if self.min_lr is not None and self.min_lr > self.lr:
            raise TrainingError(f"--min-lr {self.min_lr} is above --lr {self.lr}: the cosine decay ends below its peak")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise TrainingError(f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not isinstance(self.device, str | torch.device):
            raise TrainingError(f"--device must be a string such as auto, cpu or cuda, got {self.device!r}")
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise TrainingError(f"{f.name} must be True or False, got {getattr(self, f.name)!r}")
        sources = [_flag(n) for n in ("preset", "config", "init_from") if getattr(self, n)]
        if len(sources) > 1:
            raise TrainingError(f"give only one of --preset, --config or --init-from (got {' and '.join(sources)})")
        if self.cast_once and self.compile:
            raise TrainingError("--cast-once runs the model's own forward: give it without --compile")
        if self.resume and self.overwrite:
            raise TrainingError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        self._check_expert_parallel()
        if not self.resume and self.max_steps is None and self.max_minutes is None:
            raise TrainingError("give --max-steps or --max-minutes")

    def _check_expert_parallel(self) -> None:
        """--expert-parallel must divide the number of experts; known here for a preset (for --config,
        --init-from and --resume the trainer checks it once the model config is read)."""
        if self.expert_parallel == 1 or not self.preset:
            return
        try:
            n_experts = BlackMambaConfig.from_preset(self.preset).n_experts
        except BlackMambaError:
            return  # an unknown preset is reported when the model is built
        if n_experts % self.expert_parallel:
            raise TrainingError(
                f"--expert-parallel {self.expert_parallel} does not divide the {n_experts} experts of --preset "
                f"{self.preset}: choose a divisor of {n_experts}"
            )


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TrainingError(f"{_flag(name)} must be a whole number, got {value!r}")
    if value < low:
        raise TrainingError(f"{_flag(name)} must be at least {low}, got {value}")


def _check_float(name: str, value: Any, strict: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating) or not math.isfinite(value):
        raise TrainingError(f"{_flag(name)} must be a finite number, got {value!r}")
    if value < 0 or (strict and value == 0):
        raise TrainingError(f"{_flag(name)} must be {'above' if strict else 'at least'} 0, got {value}")


# ------------------------------------------------------------------------------------------ data and model


@dataclass
class _Data:
    """The training data with what a run records about it: fingerprints and the largest token id."""

    path: Path
    train: TokenData
    val: TokenData | None
    tokenizer: Any | None
    manifest_sha256: str
    tokenizer_sha256: str | None
    max_token_id: int

    def record(self) -> dict[str, Any]:
        return {
            "manifest_sha256": self.manifest_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.train.vocab_size,
            "max_token_id": self.max_token_id,
        }


def _max_token_id(data: TokenData) -> int:
    chunk = 1 << 24  # scan in pieces: shards are memory-mapped and may be far larger than memory
    return max(int(data.tokens[i : i + chunk].max()) for i in range(0, len(data), chunk))


def _load_data(path: str) -> _Data:
    from tokenizers import Tokenizer

    train_data = TokenData(path, "train")
    val_data = TokenData(path, "val") if "val" in train_data.manifest["splits"] else None
    tok_file = Path(path) / "tokenizer.json"
    tokenizer = None
    if tok_file.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise TrainingError(f"{tok_file} is not a valid tokenizer file ({e})") from None
    max_id = max(_max_token_id(d) for d in (train_data, val_data) if d is not None)
    return _Data(
        path=Path(path),
        train=train_data,
        val=val_data,
        tokenizer=tokenizer,
        manifest_sha256=manifest_fingerprint(train_data.manifest),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        max_token_id=max_id,
    )


def _check_vocab(data: _Data, config: BlackMambaConfig, model_source: str) -> None:
    """Refuse data holding token ids the model has no embedding for (up front, not an IndexError later)."""
    if data.max_token_id >= config.vocab_size:
        raise TrainingError(
            f"--data {data.path} holds token id {data.max_token_id}, but {model_source} has a vocabulary of "
            f"{config.vocab_size} (ids 0..{config.vocab_size - 1}): prepare the data with the model's tokenizer"
        )


def _check_tokenizer(data: _Data, checkpoint: Path, config: BlackMambaConfig) -> None:
    """Refuse to fine-tune ``checkpoint`` on data whose token ids mean other text (another tokenizer)."""
    from tokenizers import Tokenizer

    own = checkpoint / "tokenizer.json"
    advice = "prepare the data with the checkpoint's tokenizer, or pass --force-tokenizer to train anyway"
    if own.is_file():
        try:
            theirs = Tokenizer.from_file(str(own))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise TrainingError(f"{own} is not a valid tokenizer file ({e})") from None
        if data.tokenizer is None:
            raise TrainingError(f"--data {data.path} has no tokenizer.json to compare with {own}: {advice}")
        if tokenizer_fingerprint(theirs) != data.tokenizer_sha256:
            raise TrainingError(
                f"--init-from {checkpoint} uses another tokenizer than --data {data.path} ({own}: "
                f"{theirs.get_vocab_size()} tokens; {data.path / 'tokenizer.json'}: "
                f"{data.tokenizer.get_vocab_size()} tokens, not the same ids): {advice}"
            )
        return
    # Released checkpoints carry no tokenizer.json: they use GPT-NeoX-20B (see blackmamba.tokenizer).
    if data.train.manifest.get("tokenizer") == "neox" and config.vocab_size >= NEOX_SIZE:
        return
    raise TrainingError(
        f"--init-from {checkpoint} has no tokenizer.json and is not a GPT-NeoX-20B model, while --data "
        f"{data.path} was prepared with {data.train.manifest.get('tokenizer')!r}: {advice}"
    )


def _model_config(args: TrainArgs, vocab_size: int) -> BlackMambaConfig:
    """The config named by --preset or --config, with the vocabulary widened to the data's when needed."""
    if args.preset:
        config = BlackMambaConfig.from_preset(args.preset)
    else:
        try:
            config = BlackMambaConfig.from_json(args.config)
        except OSError as e:
            raise TrainingError(f"--config {args.config}: {e.strerror or e}") from None
    updates: dict[str, Any] = {}
    if config.vocab_size < vocab_size:
        updates["vocab_size"] = vocab_size
    if config.tokenizer_vocab_size is None or config.tokenizer_vocab_size > vocab_size:
        updates["tokenizer_vocab_size"] = vocab_size
    return BlackMambaConfig.from_dict({**config.to_dict(), **updates}) if updates else config


def build_model(args: TrainArgs, vocab_size: int) -> tuple[BlackMamba, BlackMambaConfig]:
    """A new model from --preset/--config (seeded), or the weights of --init-from (a single-folder
    checkpoint, the released layout, or a distributed checkpoint)."""
    if args.init_from:
        if is_distributed_checkpoint(Path(args.init_from)):
            model = _load_distributed_weights(Path(args.init_from), args.seed)
        else:
            model = load_pretrained(args.init_from, dtype=torch.float32)
        if model.config.vocab_size < vocab_size:
            raise TrainingError(
                f"--init-from model has a vocabulary of {model.config.vocab_size}, the data needs {vocab_size}"
            )
        _refuse_quantized(model.config, f"--init-from {args.init_from}")
        return model.train(), model.config
    if not (args.preset or args.config):
        raise TrainingError("give one of --preset, --config or --init-from (or --resume to continue a run)")
    config = _model_config(args, vocab_size)
    _refuse_quantized(config, f"--config {args.config}" if args.config else f"--preset {args.preset}")
    torch.manual_seed(args.seed)
    return BlackMamba(config), config


def _refuse_quantized(config: BlackMambaConfig, source: str) -> None:
    if config.quantization is not None:
        raise TrainingError(
            f"{source} holds {config.quantization} weights (weight-only quantization, for inference only) and cannot "
            "be trained; train the unquantized model and quantize the result (blackmamba convert --quantize)"
        )


def _distributed_config(checkpoint: Path, config: dict[str, Any]) -> BlackMambaConfig:
    try:
        return BlackMambaConfig.from_dict(config)
    except ConfigError as e:
        raise TrainingError(f"{checkpoint}: the model config of the distributed checkpoint is invalid ({e})") from None


def _load_distributed_weights(checkpoint: Path, seed: int) -> BlackMamba:
    """A plain model holding the weights of a distributed checkpoint (every rank reads them whole)."""
    from . import dcp

    model = _seeded_model(_distributed_config(checkpoint, dcp.read_state(checkpoint)["config"]), seed)
    dcp.load(checkpoint, model)
    return model.train()


def _seeded_model(config: BlackMambaConfig, seed: int) -> BlackMamba:
    torch.manual_seed(seed)  # every rank builds the same model
    return BlackMamba(config)


# ------------------------------------------------------------------------------------------ resume


@dataclass
class _Resume:
    """The checkpoint a run continues from. A distributed one fills ``model`` and the optimizer only once
    the model is parallelized (:func:`_restore`); a single-folder one has its weights in ``model`` already."""

    checkpoint: Path
    state: dict[str, Any]
    model: BlackMamba
    record_file: Path
    distributed: bool


def _load_resume(run: Path, args: TrainArgs, data: _Data) -> _Resume:
    """The run's latest checkpoint, after checking it continues the same run (same batches, same data)."""
    checkpoint = checkpoints(run)[-1]
    distributed = is_distributed_checkpoint(checkpoint)
    if distributed:
        from .dcp import STATE_JSON

        state_file = checkpoint / STATE_JSON
        state, model_config = load_distributed_state(checkpoint)
    else:
        state_file = checkpoint / STATE_FILE
        state = load_state(state_file)
    recorded = state["args"]
    restart = f"to train with new settings, start a new run with --init-from {checkpoint}"
    for name in RESUME_MUST_MATCH:
        if name in recorded and recorded[name] != getattr(args, name):
            raise TrainingError(
                f"--resume: {_flag(name)} {getattr(args, name)} differs from the run's {recorded[name]} "
                f"(recorded in {state_file}); pass {_flag(name)} {recorded[name]} to continue the same run, "
                f"or {restart}"
            )
    data_record = state["data"]
    if not data_record:
        warn(f"{state_file} was written by an older version: cannot check that --data is the run's data")
    elif data_record.get("manifest_sha256") != data.manifest_sha256:
        raise TrainingError(
            f"--resume: --data {data.path} is not the data this run was trained on (its manifest differs from "
            f"the one recorded in {state_file}); {restart}"
        )
    elif data_record.get("tokenizer_sha256") != data.tokenizer_sha256:
        raise TrainingError(
            f"--resume: the tokenizer of --data {data.path} differs from the one recorded in {state_file}; {restart}"
        )
    for name in RESUME_MAY_CHANGE:
        before = recorded.get(name)
        if name == "min_lr":
            before = recorded["lr"] / 10 if before is None and "lr" in recorded else before
            now: Any = args.final_lr
        else:
            now = getattr(args, name)
        if before is not None and before != now:
            warn(f"--resume with {_flag(name)} {now} (the run had {before}): the losses will differ from before")
    if state["data_position"] != state["step"] * recorded.get("grad_accum", args.grad_accum):
        raise TrainingError(f"{state_file}: data position {state['data_position']} does not match step {state['step']}")
    max_steps = args.max_steps or state["max_steps"]
    if max_steps < state["step"]:
        raise TrainingError(f"--max-steps {max_steps} is below the step of the checkpoint to resume ({checkpoint})")
    if distributed:
        model = _seeded_model(_distributed_config(checkpoint, model_config), args.seed).train()
    else:
        model = load_pretrained(checkpoint, dtype=torch.float32).train()
    if args.preset or args.config:
        expected = _model_config(args, data.train.vocab_size).to_dict()
        actual = model.config.to_dict()
        changed = [k for k in expected if expected[k] != actual.get(k)]
        if changed:
            k = changed[0]
            source = f"--preset {args.preset}" if args.preset else f"--config {args.config}"
            raise TrainingError(
                f"--resume: {source} gives model config field {k!r} = {expected[k]!r}, the run's model has "
                f"{actual.get(k)!r} ({len(changed)} field(s) differ: {', '.join(changed[:5])}); {restart}"
            )
    _check_vocab(data, model.config, f"the run's model ({checkpoint})")
    return _Resume(checkpoint, state, model, state_file, distributed)


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], where: Path) -> None:
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise TrainingError(f"{where}: the optimizer state does not fit the model ({type(e).__name__}: {e})") from None
    for p, s in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            value = s.get(key)
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                raise TrainingError(f"{where}: the optimizer's {key!r} does not have its parameter's shape")


# ------------------------------------------------------------------------------------------ steps and saves


@torch.no_grad()
def evaluate(
    model: BlackMamba, data: TokenData, args: TrainArgs, device: torch.device, autocast, rank: int = 0, world: int = 1
) -> dict:
    """Validation loss (nats/token) and perplexity over up to ``eval_tokens`` tokens, and expert load.

    On ``world`` ranks (every rank calls this) each evaluates its share of the batches, of
    ``batch_size / world`` sequences, and the sums are added up, so the loss is the one-process loss. The
    expert load of a distributed model counts every rank's tokens, and once more a rank's repeated batch in
    the last round when the batches do not divide evenly (see :func:`.distributed.rank_eval_batches`)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    load = None
    if world > 1:
        from .distributed import rank_eval_batches

        batches = rank_eval_batches(data, args.seq_len, args.batch_size // world, args.eval_tokens, rank, world)
    else:
        batches = ((x, y, True) for x, y in data.sequential_batches(args.seq_len, args.batch_size, args.eval_tokens))
    for x, y, real in batches:
        with autocast():
            out = model(x.to(device))
        if real:
            logits = out.logits.float().flatten(0, 1)
            total += F.cross_entropy(logits, y.to(device).flatten(), reduction="sum").item()
            count += y.numel()
        if out.expert_counts is not None:
            load = out.expert_counts.double() if load is None else load + out.expert_counts.double()
    if world > 1:
        from .distributed import all_reduce_sum

        total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    model.train(was_training)
    loss = total / max(count, 1)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if load is not None:
        result["val_expert_load"] = (load / load.sum(1, keepdim=True)).tolist()
    return result


def _eval_batches(data: TokenData, args: TrainArgs, world: int = 1) -> int:
    """How many forward passes :func:`evaluate` makes on each of ``world`` ranks (as
    ``TokenData.sequential_batches`` cuts them)."""
    length = min(args.seq_len, len(data) - 1)
    limit = min(len(data) - 1, args.eval_tokens)
    windows = len(range(0, max(1, limit - length + 1), length))
    return math.ceil(math.ceil(windows / (args.batch_size // world)) / world)


def unigram_loss(train: TokenData, val: TokenData, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under add-one smoothed train unigram counts."""
    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val.tokens, dtype=np.int64)].mean())


def _non_finite_parameters(model: BlackMamba) -> list[str]:
    """The names of the parameters holding NaN or inf (in this rank's shards, for a parallelized model)."""
    named = [(name, p.to_local() if hasattr(p, "to_local") else p) for name, p in model.named_parameters()]
    finite = torch.stack([torch.isfinite(p).all() for _, p in named])
    return [] if bool(finite.all()) else [name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok]


def save_checkpoint(run: Path, model: BlackMamba, state: dict[str, Any], tokenizer: Any, keep_last: int) -> Path:
    """Write ``RUN/checkpoints/step-N`` (weights, config, tokenizer, trainer state) in one rename, then drop
    all but the newest ``keep_last``. A failed write (CheckpointError, e.g. a full disk) leaves the earlier
    checkpoints as they were; modes follow the umask (see :func:`blackmamba.checkpoint.atomic_directory`)."""
    target = run / CHECKPOINTS / f"step-{state['step']:08d}"
    with atomic_directory(target) as tmp:
        weights = tmp / "weights"
        save_pretrained(model, weights, tokenizer=tokenizer)
        for f in weights.iterdir():
            os.replace(f, tmp / f.name)
        weights.rmdir()
        save_state(tmp / STATE_FILE, state)
    prune_checkpoints(run, target, keep_last)
    return target


# ------------------------------------------------------------------------------------------ time and progress


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _Budget:
    """The time budget of ``max_minutes``, counted from the start of :func:`train`.

    Before the first step it fits the schedule length to measured times (a step, an evaluation batch)
    and estimated ones (a save, the plots); during the run it stops early when the next step, with the
    evaluation or save it triggers and the final evaluation, checkpoint and plots, would end past the
    deadline."""

    SAFETY = 0.95

    def __init__(self, started: float, minutes: float | None) -> None:
        self.deadline = None if minutes is None else started + 60 * minutes
        self.step_s: float | None = None
        self.eval_s = 0.0
        self.save_s = 0.0
        self.plots_s = 0.0

    def fit(self, per_step: float, eval_every: int, save_every: int, final: float) -> int:
        assert self.deadline is not None
        available = self.deadline - time.monotonic() - final
        per = per_step + self.eval_s / eval_every + self.save_s / save_every
        return max(1, int(self.SAFETY * available / per))

    def final_reserve(self, needs_eval: bool) -> float:
        return (self.eval_s if needs_eval else 0.0) + self.save_s + self.plots_s + 0.5

    def record_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s is None else 0.8 * self.step_s + 0.2 * seconds

    def out_of_time(self, step: int, first: int, eval_every: int, save_every: int, has_val: bool) -> bool:
        if self.deadline is None or self.step_s is None or step == first:
            return False  # every run makes at least one step
        upcoming = self.step_s
        upcoming += self.eval_s if has_val and (step + 1) % eval_every == 0 else 0.0
        upcoming += self.save_s if (step + 1) % save_every == 0 else 0.0
        return time.monotonic() + upcoming + self.final_reserve(has_val) > self.deadline


class _Progress:
    """A tqdm bar on a terminal; off one (CI, nohup, a log file) a line every ``every`` seconds with step,
    loss, tokens/s and time left; nothing when ``enabled`` is False. Everything goes to stderr, so stdout
    stays for the summary."""

    def __init__(
        self, enabled: bool, total: int | None, initial: int, every: float, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.mode = "off" if not enabled else ("bar" if tty else "lines")
        self.total, self.initial, self.every = total, initial, every
        self.started = time.monotonic()
        self.last_line = -math.inf
        self.bar = None
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=self.stream)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, final: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            return
        now = time.monotonic()
        first = self.last_line == -math.inf
        if self.mode != "lines" or self.total is None or not (first or final or now - self.last_line >= self.every):
            return
        self.last_line = now
        elapsed = now - self.started
        eta = elapsed / max(1, step - self.initial) * (self.total - step)
        self.line(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  elapsed {_clock(elapsed)}  eta {_clock(eta)}"
        )

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode == "lines":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------------ the loop


def _where(run: Path) -> str:
    good = checkpoints(run)
    return f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"


def _io_failure(what: Path, e: OSError, run: Path) -> TrainingError:
    return TrainingError(
        f"cannot write {what}: {e.strerror or e}; {_where(run)}. Free space or fix the folder, then run again "
        "with --resume"
    )


@dataclass
class _Ranks:
    """This process's part in a run: the one plain process (``env`` None), or a rank of a torchrun job
    with its layout (``dims``), the gloo group its asynchronous checkpoint writes talk on, and a gloo group
    for the per-step vote to stop for time (host to host: no wait for the GPU's queued work)."""

    env: Any = None  # distributed.DistEnv
    dims: Any = None  # distributed.ParallelDims
    saver: Any = None  # torch.distributed.ProcessGroup
    owns_group: bool = False
    control: Any = None  # torch.distributed.ProcessGroup

    @property
    def distributed(self) -> bool:
        return self.env is not None

    @property
    def rank(self) -> int:
        return self.env.rank if self.env is not None else 0

    @property
    def world(self) -> int:
        return self.env.world_size if self.env is not None else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, error: Exception | None) -> None:
        """Raise on every rank when a step failed on any (each rank checks, then all meet here): the rank
        that failed raises its own error, the others one naming it. Without ranks, raise ``error`` at once."""
        if error is not None and not self.distributed:
            raise error
        if not self.distributed:
            return
        from .distributed import all_reduce_sum

        failed = torch.zeros(self.world, dtype=torch.int32)
        failed[self.rank] = error is not None
        failed = all_reduce_sum(failed)
        if error is not None:
            raise error
        if bool(failed.any()):
            first = int(failed.nonzero()[0, 0])
            raise TrainingError(f"stopping because rank {first} failed (its error says why)")

    def close(self) -> None:
        """At the end of a run that succeeded on every rank: wait for all, leave the process group."""
        if self.distributed and self.owns_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _join(args: TrainArgs) -> _Ranks:
    """Join the torchrun job this process belongs to (if any) and check the layout against it."""
    from .distributed import launched_by_torchrun

    if not launched_by_torchrun():
        if args.expert_parallel > 1:
            raise TrainingError(
                f"--expert-parallel {args.expert_parallel} needs at least that many processes: launch with "
                f"torchrun --nproc-per-node N (N a multiple of {args.expert_parallel})"
            )
        if args.fsdp:
            warn("--fsdp: one process without torchrun has nothing to shard; training without it")
        return _Ranks()
    import torch.distributed as dist

    from .distributed import ParallelDims, init_distributed

    owns = not dist.is_initialized()
    device = "cuda" if str(args.device).startswith("cuda") else str(args.device)  # the GPU is LOCAL_RANK's
    env = init_distributed(device, args.dist_timeout)
    # The model never modifies a block's output in place, which is what this warning is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dims = ParallelDims(env.world_size, args.expert_parallel, args.fsdp)
    dims.check_batch(args.batch_size)
    saver = dist.new_group(backend="gloo")
    return _Ranks(env, dims, saver, owns, control=dist.new_group(backend="gloo"))


def train(args: TrainArgs) -> dict:
    """Train a model as described by ``args``; returns a summary (final step, losses, paths).

    Under torchrun every rank calls this with the same ``args``; it joins the process group itself."""
    args.validate()
    started = time.monotonic()
    run = Path(args.out)
    ranks = _join(args)
    summary = _train(args, run, ranks, started)
    ranks.close()
    return summary


def _train(args: TrainArgs, run: Path, ranks: _Ranks, started: float) -> dict:
    model = resume = metrics = None
    error: Exception | None = None
    with ExitStack() as stack:
        try:  # the folder's checks, the data and the model; rank 0 then takes and tidies the folder
            if ranks.main:
                check_out_path(run)
                check_out_contents(run, args.resume, args.overwrite)  # again under the lock; this one writes nothing
            if not args.resume and not (args.preset or args.config or args.init_from):
                raise TrainingError("give one of --preset, --config or --init-from (or --resume to continue a run)")
            try:
                device = ranks.env.device if ranks.distributed else resolve_device(args.device)
            except ValueError as e:
                raise TrainingError(f"--device: {e}") from None
            data = _load_data(args.data)
            if not args.resume:
                model, config = build_model(args, data.train.vocab_size)
                if args.init_from:
                    if not args.force_tokenizer:
                        _check_tokenizer(data, Path(args.init_from), config)
                    _check_vocab(data, config, f"--init-from {args.init_from}")
                else:
                    _check_vocab(data, config, "the model")
                if ranks.distributed:
                    ranks.dims.check_model(config.n_experts)
            if ranks.main:
                stack.enter_context(RunLock(run))
                check_out_contents(run, resume=args.resume, overwrite=args.overwrite)
                clean_stale(run)
                if args.overwrite and not args.resume:
                    remove_outputs(run)
        except Exception as e:
            error = e
        ranks.agree(error)
        try:  # every rank reads the checkpoint only after rank 0 holds the lock and has tidied the folder
            if args.resume:
                resume = _load_resume(run, args, data)
                model = resume.model
                if ranks.distributed:
                    ranks.dims.check_model(model.config.n_experts)
            if ranks.main:
                try:
                    metrics = MetricsLog(run, resume.state["step"] if resume else None)
                except OSError as e:
                    raise _io_failure(run / METRICS, e, run) from None
                stack.callback(metrics.close)
        except Exception as e:
            error = e
        ranks.agree(error)
        return _train_loop(args, run, data, model, device, resume, metrics, started, ranks)


def _args_record(args: TrainArgs) -> dict[str, Any]:
    """``args`` as JSON values (a torch.device becomes its name)."""
    plain = (str, int, float, bool, type(None))
    return {k: v if isinstance(v, plain) else str(v) for k, v in asdict(args).items()}


def _restore(resume: _Resume, model: BlackMamba, optimizer: torch.optim.Optimizer, full_optimizer: Any) -> None:
    """Put the checkpoint's weights and optimizer state into the (parallelized) model and its optimizer."""
    if resume.distributed:
        from . import dcp

        dcp.load(resume.checkpoint, model, optimizer)
    elif full_optimizer is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, full_optimizer, options=options)
    else:
        _load_optimizer(optimizer, resume.state["optimizer"], resume.record_file)


def _train_loop(
    args: TrainArgs,
    run: Path,
    data: _Data,
    model: BlackMamba,
    device: torch.device,
    resume: _Resume | None,
    metrics: MetricsLog | None,
    started: float,
    ranks: _Ranks,
) -> dict:
    config = model.config
    model.to(device).train()
    if args.grad_checkpointing:
        model.gradient_checkpointing = True
    use_bf16 = device.type == "cuda" and args.dtype in ("auto", "bfloat16")
    full_optimizer = None
    if ranks.distributed:
        from . import dcp
        from .distributed import (
            all_reduce_sum,
            any_rank,
            broadcast_int,
            mixed_precision,
            parallelize,
            rank_window_starts,
        )

        if resume is not None and not resume.distributed:
            # A single-folder checkpoint holds the whole optimizer state: name it by parameter before the
            # parameters are sharded, then let torch's state-dict API cut each rank's part.
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            whole = build_optimizer(model, args.lr, args.weight_decay)
            _load_optimizer(whole, resume.state["optimizer"], resume.record_file)
            full_optimizer = get_optimizer_state_dict(model, whole)
            del whole
        # bf16 compute parameters where the plain trainer autocasts to bf16; fp32 throughout otherwise.
        parallelize(
            model,
            ranks.dims.build_meshes(device.type),
            mixed_precision("cuda" if use_bf16 else "cpu"),
            blocks_per_unit=args.fsdp_unit_blocks or None,
        )
    optimizer = build_optimizer(model, args.lr, args.weight_decay, fused=device.type == "cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    step_fn = torch.compile(model) if args.compile else model
    if args.cast_once:
        if ranks.distributed:
            raise TrainingError("--cast-once is for one process: FSDP already keeps bf16 copies of the weights")
        step_fn = CastOnce(model, optimizer)
    train_data, val_data = data.train, data.val

    start_step, max_steps = 0, args.max_steps
    if resume is not None:
        _restore(resume, model, optimizer, full_optimizer)
        set_rng_state(resume.state["rng"], resume.record_file)
        start_step = resume.state["step"]
        # The stored schedule length unless the caller extends the run with a new --max-steps.
        max_steps = args.max_steps or resume.state["max_steps"]
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    fpt = flops_per_token(config, args.seq_len)["train"]
    peak = args.peak_tflops or (784.0 if device.type == "cuda" else None)

    def forward(step_index: int, micro: int):
        index = step_index * args.grad_accum + micro
        if ranks.distributed:  # this rank's part of the global batch
            starts = rank_window_starts(
                train_data, args.seed, index, args.batch_size, args.seq_len, ranks.rank, ranks.world
            )
        else:
            starts = train_data.window_starts(args.seed, index, args.batch_size, args.seq_len)
        x, y = train_data.batch(starts, args.seq_len)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = step_fn(x, targets=y)  # the head and the loss in chunks, without the (B, L, V) logits
            loss = out.loss
            objective = loss if out.aux_loss is None else loss + out.aux_loss
        return out, loss, objective

    budget = _Budget(started, args.max_minutes)
    state_bytes = 12 * sum(p.numel() for p in model.parameters())  # fp32 weights + two AdamW moments
    budget.save_s = 0.3 + state_bytes / 150e6
    budget.plots_s = 3.0 if args.plots else 0.0
    # With a time budget and no --max-steps the schedule's length is fitted after the first real steps, as
    # late as the warmup allows (up to FIT_STEPS): warmup learning rates do not depend on the length (step 0
    # starts the warmup or the cosine at its peak), so the run is exactly a --max-steps run of the fitted
    # length. The first steps are slow (allocations, lazy imports, a busy machine settling), so the step
    # time is the median of the later half of those measured.
    fit_at = None if max_steps is not None else start_step + max(1, min(args.warmup, FIT_STEPS))
    if max_steps is not None:
        _warn_about_warmup(args, max_steps, start_step)
    progress = _Progress(args.progress and ranks.main, max_steps, start_step, args.progress_every)
    step_times: list[float] = []

    def fit_schedule() -> int:
        if val_data is not None:
            rng = rng_state()  # an evaluation draws nothing, but the run must not depend on that
            budget.eval_s = _measure_eval(model, val_data, args, device, autocast, ranks.world)
            set_rng_state(rng, Path("(eval probe)"))
        budget.step_s = statistics.median(step_times[len(step_times) // 2 :])
        fitted = max(step, budget.fit(budget.step_s, args.eval_every, args.save_every, budget.final_reserve(True)))
        if ranks.distributed:
            fitted = broadcast_int(fitted)  # rank 0's clock decides for all
        if fitted < MEANINGFUL_STEPS:
            warn(
                f"the time budget of {args.max_minutes:g} minutes allows only {fitted} step(s) of about "
                f"{budget.step_s:.2f} s: too few for a meaningful result (give more --max-minutes, or a smaller "
                "model or batch)"
            )
        _warn_about_warmup(args, fitted, start_step)
        progress.set_total(fitted)
        progress.line(f"time budget {args.max_minutes:g} min: {fitted} steps of about {budget.step_s:.2f} s")
        return fitted

    last_eval: dict = {}
    last_eval_step = -1
    saved_step = start_step if resume is not None else -1
    step = start_step
    window_tokens, window_time = 0, time.monotonic()
    load_acc = None
    tps = 0.0
    loop_started = time.monotonic()
    pending: list[Any] = []  # the distributed checkpoint being written in the background
    last: StepValues | None = None  # the newest step the host has read

    def diverged(what: str, values: StepValues) -> TrainingError:
        if what == "loss":
            return TrainingError(
                f"non-finite loss ({values.objective}) at step {values.step}: training diverged; {_where(run)} "
                "(resume from it with a lower --lr or with --clip)"
            )
        return TrainingError(
            f"non-finite gradient norm at step {values.step}: training diverged; {_where(run)} "
            "(resume from it with a lower --lr)"
        )

    guard = FiniteGuard(optimizer, diverged)

    def show_progress(values: StepValues) -> None:
        rate = (values.step - start_step) * tokens_per_step / max(time.monotonic() - loop_started, 1e-9)
        progress.update(values.step, values.loss, lr, rate, final=values.step == max_steps)

    def record(row: dict[str, Any]) -> None:
        if metrics is None:
            return  # not rank 0
        try:
            metrics.write(row)
        except OSError as e:
            raise _io_failure(metrics.path, e, run) from None

    def check_finite(at: int) -> None:
        bad = _non_finite_parameters(model)
        if ranks.distributed and not any_rank(bool(bad)):
            return
        if bad or ranks.distributed:
            example = bad[0] if bad else "on another rank"
            raise TrainingError(
                f"the parameters hold NaN or inf after step {at} (e.g. {example}): training diverged and this "
                f"state was not saved; {_where(run)} (resume from it with a lower --lr or with --clip)"
            )

    def finish_save() -> None:
        """Wait for the distributed checkpoint in flight (every rank), then drop the oldest ones."""
        if not pending:
            return
        save, t0, written = pending.pop()
        try:
            target = save.wait()
        except CheckpointError as e:
            raise TrainingError(
                f"{e}; {_where(run)}. Free space or fix the folder, then run again with --resume"
            ) from None
        # The whole write, from the start to the last file: what the final save, waited for at once, costs.
        budget.save_s = (written[0] if written else time.monotonic()) - t0
        if ranks.main:
            prune_checkpoints(run, target, args.keep_last)
        progress.line(f"step {save.record['state']['step']}: saved {target}")

    def checkpoint(at: int) -> Path:
        check_finite(at)
        state = {
            "step": at,
            "max_steps": max_steps,
            "data_position": at * args.grad_accum,
            "args": asdict(args),
            "data": data.record(),
        }
        t0 = time.monotonic()
        target = run / CHECKPOINTS / f"step-{at:08d}"
        if ranks.distributed:
            finish_save()
            state |= {"rng": rng_to_json(rng_state(all_gpus=False)), "args": _args_record(args)}
            layout = {"expert_parallel": ranks.dims.ep, "fsdp": ranks.dims.fsdp}
            try:
                save = dcp.save(
                    target, model, optimizer, state, True, ranks.saver, layout=layout, tokenizer=data.tokenizer
                )
            except CheckpointError as e:
                raise TrainingError(
                    f"{e}; {_where(run)}. Free space or fix the folder, then run again with --resume"
                ) from None
            written: list[float] = []
            if save.future is not None:
                save.future.add_done_callback(lambda _: written.append(time.monotonic()))
            pending.append((save, t0, written))
            return target
        state |= {"optimizer": optimizer.state_dict(), "rng": rng_state()}
        try:
            save_checkpoint(run, model, state, data.tokenizer, args.keep_last)
        except OSError as e:
            raise _io_failure(target, e, run) from None
        except CheckpointError as e:
            raise TrainingError(
                f"{e}; {_where(run)}. Free space or fix the folder, then run again with --resume"
            ) from None
        budget.save_s = time.monotonic() - t0
        progress.line(f"step {at}: saved {target}")
        return target

    try:
        while max_steps is None or step < max_steps:
            if max_steps is not None:
                stop = budget.out_of_time(step, start_step, args.eval_every, args.save_every, val_data is not None)
                if ranks.distributed and budget.deadline is not None:
                    stop = any_rank(stop, ranks.control)  # ranks' clocks differ; all stop at the same step
                if stop:
                    progress.line(f"time budget reached: stopping at step {step} of {max_steps}")
                    break
            t_step = time.monotonic()
            lr = lr_at(step, max_steps or fit_at or 1, args.lr, args.final_lr, args.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The micro-batches' losses stay on the device. The guard reads them with the gradient norm one
            # step late where the optimizer can skip a non-finite update on the device (fused AdamW, on GPU),
            # so the host issues the next step while the GPU runs this one; otherwise before the update.
            losses, auxes, objectives, iters = [], [], [], []
            for micro in range(args.grad_accum):
                if ranks.distributed and args.grad_accum > 1:
                    model.set_requires_gradient_sync(micro == args.grad_accum - 1)  # reduce once per step
                out, loss, objective = forward(step, micro)
                (objective / args.grad_accum).backward()
                losses.append(loss.detach())
                objectives.append(objective.detach())
                if out.aux_loss is not None:
                    auxes.append(out.aux_loss.detach())
                if out.expert_counts is not None:
                    counts = out.expert_counts.detach().double()
                    load_acc = counts if load_acc is None else load_acc + counts
                iters.extend(out.sinkhorn_iters)
            params = [p for p in model.parameters() if p.grad is not None]
            grad_norm = clip_gradients(optimizer, params, args.clip, distributed=ranks.distributed)
            auxes = auxes or [torch.zeros_like(losses[0])]  # a model without router losses
            means = torch.stack([torch.stack(v).double().mean() for v in (losses, auxes, objectives)])
            if ranks.distributed:
                means = all_reduce_sum(means) / ranks.world  # on the device: no host read
            read = guard.check(step + 1, torch.cat([means, grad_norm.double().reshape(1).to(means.device)]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step
            eval_now = val_data is not None and (step % args.eval_every == 0 or step == max_steps)
            if (
                step % args.log_every == 0
                or step == max_steps
                or eval_now
                or step % args.save_every == 0
                or step == fit_at
            ):
                read += guard.flush()  # this step's values are needed now, and a bad step must not be saved
            else:
                read += guard.settle()
            last = read[-1] if read else last
            step_times.append(time.monotonic() - t_step)
            budget.record_step(step_times[-1])
            if step == fit_at:
                max_steps = fit_schedule()

            if step % args.log_every == 0 or step == max_steps:
                elapsed = time.monotonic() - window_time
                tps = window_tokens / max(elapsed, 1e-9)
                row = {
                    "step": step,
                    "loss": last.loss,
                    "lr": lr,
                    "tokens_per_s": tps,
                    "tokens": step * tokens_per_step,
                }
                row["grad_norm"] = last.grad_norm
                if last.aux_loss:
                    row["aux_loss"] = last.aux_loss
                if iters:
                    row["sinkhorn_iters"] = sum(int(i) for i in iters) / len(iters)  # device counts read here
                if load_acc is not None:
                    row["expert_load"] = (load_acc / load_acc.sum(1, keepdim=True)).tolist()
                    load_acc = None
                if peak:
                    row["mfu"] = tps * fpt / (peak * 1e12 * ranks.world)
                record(row)
            for values in read:
                show_progress(values)
            if val_data is not None and (step % args.eval_every == 0 or step == max_steps):
                t0 = time.monotonic()
                last_eval, last_eval_step = _evaluate(model, val_data, args, device, autocast, ranks), step
                budget.eval_s = time.monotonic() - t0
                record({"step": step, **last_eval})
                progress.line(f"step {step}: validation loss {last_eval['val_loss']:.4f}")
            if step % args.save_every == 0:
                checkpoint(step)
                saved_step = step
            if step % args.log_every == 0 or step % args.eval_every == 0 or step % args.save_every == 0:
                # Throughput counts training time only: restart the window after logging, evaluation or saving.
                window_tokens, window_time = 0, time.monotonic()
        for values in guard.flush():  # the loop stopped for time after a step nothing read yet
            show_progress(values)
        if val_data is not None and last_eval_step != step:
            last_eval = _evaluate(model, val_data, args, device, autocast, ranks)
            record({"step": step, **last_eval})
        final = run / CHECKPOINTS / f"step-{step:08d}"
        if saved_step != step:
            final = checkpoint(step)
        finish_save()
    finally:
        progress.close()
    summary: dict[str, Any] = {"step": step, "max_steps": max_steps, "checkpoint": str(final), **last_eval}
    summary["model"] = str(_export(model, run / MODEL, data.tokenizer, ranks) if ranks.distributed else final)
    if val_data is not None and ranks.main:
        summary["unigram_val_loss"] = unigram_loss(train_data, val_data, train_data.vocab_size)
    summary["seconds"] = round(time.monotonic() - started, 1)
    if ranks.main:
        try:
            write_text_atomic(run / SUMMARY, json.dumps(summary, indent=1) + "\n")
        except OSError as e:
            raise _io_failure(run / SUMMARY, e, run) from None
        if args.plots:
            _write_plots(run)
    return summary


def _evaluate(model: BlackMamba, data: TokenData, args: TrainArgs, device: torch.device, autocast, ranks: _Ranks):
    return evaluate(model, data, args, device, autocast, ranks.rank, ranks.world)


def _export(model: BlackMamba, folder: Path, tokenizer: Any, ranks: _Ranks) -> Path:
    """The final weights of a distributed run, gathered and written by rank 0 in the single-folder layout."""
    from . import dcp

    error = None
    try:
        dcp.export_pretrained(model, folder, tokenizer)
    except Exception as e:  # on rank 0 only (it writes): every rank must hear of it
        error = TrainingError(f"cannot export the final model to {folder}: {getattr(e, 'strerror', None) or e}")
    ranks.agree(error)
    return folder


def _warn_about_warmup(args: TrainArgs, max_steps: int, start_step: int) -> None:
    if args.warmup >= max_steps and start_step < args.warmup:
        top = lr_at(max_steps - 1, max_steps, args.lr, args.final_lr, args.warmup)
        warn(
            f"the run ({max_steps} steps) ends before its warmup (--warmup {args.warmup}) is over: the learning "
            f"rate rises to at most {top:.3g} (--lr {args.lr:g}) and never decays; the warmup is kept as given, "
            "pass a smaller --warmup to change it"
        )


def _measure_eval(
    model: BlackMamba, data: TokenData, args: TrainArgs, device: torch.device, autocast, world: int = 1
) -> float:
    """Seconds one :func:`evaluate` will take: the median of three timed batches (after a warm-up one) times
    the batch count (one timed batch on a busy 2-core machine could be twice the typical one). On ``world``
    ranks every rank calls this (the forward holds collectives)."""
    x, _ = next(data.sequential_batches(args.seq_len, args.batch_size // world, args.eval_tokens))
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.monotonic()
            with autocast():
                model(x.to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.monotonic() - t0)
    model.train(was_training)
    return statistics.median(times[1:]) * _eval_batches(data, args, world)


def _write_plots(run: Path) -> None:
    from .plots import plot_run

    try:
        plot_run(run)
    except (BlackMambaError, OSError, ImportError, ValueError) as e:
        warn(f"the plots of {run} were not written: {e}")
