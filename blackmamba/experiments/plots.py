"""The experiment's three figures (PNG): validation loss against training FLOPs for every model on one axis,
generation latency against tokens generated, and the expert load per MoE block of the two MoE models."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .baselines import LABELS

STYLE = {"blackmamba": "C3", "mamba": "C0", "transformer": "C2", "transformer-moe": "C1"}


def _save(path: Path, draw: Callable[[Any], None], figsize: tuple[float, float]) -> Path:
    """Draw on a new figure and write it as PNG through a temporary file and one rename."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize, layout="constrained")
    try:
        draw(fig)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path


def plot_loss_vs_flops(models: dict[str, dict], path: Path) -> Path:
    """Validation loss (nats/token) against training FLOPs spent, one line per model."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        for kind, record in models.items():
            curve = record["curve"]
            if curve:
                flops, loss = zip(*[(p["train_flops"], p["val_loss"]) for p in curve], strict=True)
                ax.plot(flops, loss, "o-", color=STYLE.get(kind), label=LABELS.get(kind, kind), markersize=3)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("validation loss at equal training FLOPs")
        ax.grid(True, alpha=0.3)
        ax.legend()

    return _save(path, draw, (6.4, 4.4))


def plot_latency(models: dict[str, dict], path: Path) -> Path:
    """Seconds to generate n tokens (left) and seconds per token (right) against n, one line per model."""

    def draw(fig: Any) -> None:
        total, per_token = fig.subplots(1, 2)
        for kind, record in models.items():
            latency = record.get("latency_s") or {}
            if not latency:
                continue
            n = sorted(latency, key=int)
            seconds = [latency[k] for k in n]
            x = [int(k) for k in n]
            style = dict(color=STYLE.get(kind), label=LABELS.get(kind, kind), markersize=3)
            total.plot(x, seconds, "o-", **style)
            per_token.plot(x, [1e3 * s / k for s, k in zip(seconds, x, strict=True)], "o-", **style)
        total.set_xlabel("tokens generated")
        total.set_ylabel("latency (s)")
        total.set_title("generation latency")
        per_token.set_xlabel("tokens generated")
        per_token.set_ylabel("ms per token")
        per_token.set_title("mean time per token")
        for ax in (total, per_token):
            ax.grid(True, alpha=0.3)
            ax.legend()

    return _save(path, draw, (10.0, 4.2))


def plot_expert_load(models: dict[str, dict], path: Path) -> Path | None:
    """Heatmaps (MoE block x expert) of the fraction of validation tokens each expert takes, one per MoE
    model; None when no model has an MoE block."""
    loads = {kind: r["expert_load"] for kind, r in models.items() if r.get("expert_load")}
    if not loads:
        return None

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, len(loads), squeeze=False)[0]
        top = max(max(max(row) for row in load) for load in loads.values())
        for ax, (kind, load) in zip(axes, loads.items(), strict=True):
            image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, vmax=top)
            ax.set_title(f"{LABELS.get(kind, kind)}: expert load")
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE block")
            ax.set_xticks(range(len(load[0])))
            ax.set_yticks(range(len(load)))
        fig.colorbar(image, ax=list(axes), label="fraction of validation tokens")

    return _save(path, draw, (4.0 + 3.2 * len(loads), 3.6))
