"""Sizes of the paper-comparison experiment: the BlackMamba base model (the other three are matched to it,
:mod:`.baselines`), the training batch and schedule, and what is measured after training.

``cpu-mini`` runs the whole experiment on a 2-core CPU in about 20 minutes on Shakespeare (prepared with
``--tokenizer bpe:4096``): four models of 0.65M active parameters (embedding excluded; 6 blocks of width 128),
about 600 steps of 8 x 128 tokens each (the Mamba models train at about half the transformers' tokens per
second on a CPU, so they take about two thirds of the time). ``gpu`` is the default: models of 26M active
parameters (16 blocks of width 512), sequences of 512, generation latency up to 8K tokens, sized for one H200
in under 30 minutes (14 minutes measured, benchmarks/results/paper_gpu.json).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExperimentPreset:
    """What one preset fixes. ``model`` holds the BlackMamba base config's fields (the vocabulary comes from
    the data); ``head_dim`` is the attention baselines' head width; the budget is in training FLOPs per
    model (:mod:`blackmamba.training.flops`)."""

    name: str
    model: dict[str, Any]
    head_dim: int
    budget_flops: float
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    evaluations: int  # validation points on each model's loss curve
    eval_tokens: int
    saves: int  # checkpoints per model, so that an interrupted run resumes
    prompt_tokens: int  # prompt of the latency measurement
    latency_tokens: tuple[int, ...]  # generation lengths timed
    latency_repeats: int
    zero_shot_limit: int | None  # documents per task of the paper's suite (None: all)
    tasks: tuple[str, ...] = ("paper",)


PRESETS: dict[str, ExperimentPreset] = {
    "cpu-mini": ExperimentPreset(
        name="cpu-mini",
        model=dict(d_model=128, layer_pattern=["mamba", "moe"] * 3, d_state=16, n_experts=8, d_ff=256),
        head_dim=32,
        budget_flops=4.5e12,
        batch_size=8,
        seq_len=128,
        lr=3e-3,
        warmup=20,
        evaluations=5,
        eval_tokens=16384,
        saves=4,
        prompt_tokens=16,
        latency_tokens=(128, 512, 1024, 2048),
        latency_repeats=1,
        zero_shot_limit=20,
    ),
    "gpu": ExperimentPreset(
        name="gpu",
        model=dict(d_model=512, layer_pattern=["mamba", "moe"] * 8, d_state=16, n_experts=8, d_ff=1024),
        head_dim=64,
        budget_flops=4e15,
        batch_size=32,
        seq_len=512,
        lr=1.5e-3,
        warmup=100,
        evaluations=8,
        eval_tokens=131072,
        saves=4,
        prompt_tokens=64,
        latency_tokens=(512, 1024, 2048, 4096, 8192),
        latency_repeats=3,
        zero_shot_limit=1000,
    ),
}
DEFAULT_PRESET = "gpu"
