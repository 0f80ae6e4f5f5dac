"""PNG plots of a training run, from ``RUN/metrics.jsonl`` into ``RUN/plots/``.

* ``loss.png``: training loss and validation loss against the step.
* ``lr.png``: the learning-rate schedule.
* ``throughput.png``: training tokens/s (and MFU on a second axis when logged).
* ``expert_load.png``: the paper's routing analysis, one heatmap per MoE layer in a grid: x = step,
  y = expert, colour = fraction of the layer's tokens routed to that expert (white = balanced, 1/E).

A plot is written only when its metric was logged at least once. matplotlib runs with the Agg canvas
(no display, no pyplot global state), and every PNG is written to a temporary file in ``plots/`` and
renamed into place, so a reader never sees a half-written image; its mode follows the umask.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..atomic_dir import current_umask
from ..errors import BlackMambaError

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"


class PlotError(BlackMambaError, ValueError):
    """No plots can be made: the metrics are missing or corrupt, or the plots folder cannot be written."""


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file; PlotError (naming the file) when it is missing, empty or corrupt.

    A truncated last line (the trainer appending while we read) is skipped; a bad line elsewhere is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise PlotError(f"no metrics file {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PlotError(f"cannot read {path}: {e.strerror or e}") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for n, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1 and rows:
                break
            raise PlotError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int | float):
            raise PlotError(f"{path}, line {lineno}: expected a JSON object with a numeric 'step'")
        rows.append(row)
    if not rows:
        raise PlotError(f"metrics file {path} is empty")
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[Any]]:
    """(steps, values) of the rows that have a non-null ``key``, by step (the last row wins on a repeat)."""
    by_step: dict[float, Any] = {}
    for row in rows:
        value = row.get(key)
        if value is not None:
            by_step[row["step"]] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _save(fig: Any, target: Path) -> Path:
    """Render ``fig`` to ``target`` atomically (temporary file in the same folder, then os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".png.tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=110)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; a plot is not
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _loss_plot(rows: list[dict[str, Any]]) -> Any | None:
    train_steps, train_loss = _series(rows, "loss")
    val_steps, val_loss = _series(rows, "val_loss")
    if not train_steps and not val_steps:
        return None
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    if train_steps:
        ax.plot(train_steps, train_loss, label="train", color="tab:blue", linewidth=1.2)
    if val_steps:
        ax.plot(val_steps, val_loss, label="validation", color="tab:orange", marker="o", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _simple_plot(rows: list[dict[str, Any]], key: str, ylabel: str, title: str, color: str) -> Any | None:
    steps, values = _series(rows, key)
    if not steps:
        return None
    fig = _figure(7, 4.2)
    ax = fig.add_subplot()
    ax.plot(steps, values, color=color, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
    ax.set_ylim(bottom=0)
    return fig


def _throughput_plot(rows: list[dict[str, Any]]) -> Any | None:
    fig = _simple_plot(rows, "tokens_per_s", "tokens/s", "training throughput", "tab:green")
    if fig is None:
        return None
    steps, mfu = _series(rows, "mfu")
    if steps:
        ax2 = fig.axes[0].twinx()
        ax2.plot(steps, [100 * m for m in mfu], color="tab:purple", linewidth=1.0, linestyle="--")
        ax2.set_ylabel("MFU (%, dashed)", color="tab:purple")
        ax2.set_ylim(bottom=0)
    return fig


def _edges(steps: list[float]) -> list[float]:
    """Cell boundaries around each step: midpoints between neighbours (steps may be unevenly spaced)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:], strict=True)]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def _expert_load_plot(rows: list[dict[str, Any]]) -> Any | None:
    key, title = "expert_load", "training"
    steps, loads = _series(rows, key)
    if not steps:  # no training routing logged: show the validation (eval-mode routing) load instead
        key, title = "val_expert_load", "validation"
        steps, loads = _series(rows, key)
    if not steps:
        return None
    # Every row must have the shape of the first (n_layers x n_experts); rows that do not are skipped.
    n_layers, n_experts = len(loads[0]), len(loads[0][0]) if loads[0] else 0
    if n_layers == 0 or n_experts == 0:
        return None
    kept = [
        (s, load)
        for s, load in zip(steps, loads, strict=True)
        if len(load) == n_layers and all(len(layer) == n_experts for layer in load)
    ]
    steps = [s for s, _ in kept]
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm

    grid = np.array([load for _, load in kept], dtype=float)  # (steps, layers, experts)
    balanced = 1.0 / n_experts
    top = float(np.nanmax(grid)) if grid.size else balanced
    if n_experts > 1:
        norm: Normalize = TwoSlopeNorm(vcenter=balanced, vmin=0.0, vmax=max(top, 2 * balanced))
    else:
        norm = Normalize(vmin=0.0, vmax=1.0)
    ncols = min(n_layers, 4)
    nrows = math.ceil(n_layers / ncols)
    fig = _figure(3.4 * ncols + 1.2, 2.4 * nrows + 0.8)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    x_edges = _edges(steps)
    y_edges = np.arange(n_experts + 1) - 0.5
    mesh = None
    for layer in range(nrows * ncols):
        ax = axes[layer // ncols][layer % ncols]
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        mesh = ax.pcolormesh(x_edges, y_edges, grid[:, layer, :].T, cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_title(f"MoE layer {layer}", fontsize=10)
        ax.set_yticks(range(n_experts) if n_experts <= 16 else range(0, n_experts, max(1, n_experts // 8)))
        if layer % ncols == 0:
            ax.set_ylabel("expert")
        if layer + ncols >= n_layers:  # nothing below this one
            ax.set_xlabel("step")
    assert mesh is not None
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label=f"fraction of tokens (balanced = 1/{n_experts})")
    fig.suptitle(f"expert load per MoE layer ({title} routing)")
    return fig


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Write the plots of the run in ``run_dir`` into ``run_dir/plots/``; returns the paths written."""
    run = Path(run_dir)
    rows = read_metrics(run / METRICS_FILE)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError("plots need matplotlib: pip install matplotlib") from None
    out = run / PLOTS_DIR
    if out.exists() and not out.is_dir():
        raise PlotError(f"{out} is a file, not a folder: move it away to write the plots there")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(f"cannot make {out}: {e.strerror or e}") from None
    makers = {
        "loss.png": lambda: _loss_plot(rows),
        "lr.png": lambda: _simple_plot(rows, "lr", "learning rate", "learning rate", "tab:red"),
        "throughput.png": lambda: _throughput_plot(rows),
        "expert_load.png": lambda: _expert_load_plot(rows),
    }
    written = []
    for name, make in makers.items():
        fig = make()
        if fig is not None:
            try:
                written.append(_save(fig, out / name))
            except OSError as e:
                raise PlotError(f"cannot write {out / name}: {e.strerror or e}") from None
    return written
