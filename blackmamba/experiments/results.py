"""The experiment's results file: run metadata and result rows in the shape of ``benchmarks/harness.py``.

    {"meta": {date, command, card, cpu, cores, torch_threads, versions...}, "results": [rows], "models": {...}}

Each row has the fields the benchmark tables are built from::

    benchmark, shape, unit, ours, peer, peer_value, floor, fraction_of_floor, speedup, max_err, <extra...>

``ours`` is the figure of the model the row is about (its kind starts ``shape``; a ``val_loss`` row's shape is
the kind alone). A baseline's row has BlackMamba as its ``peer``; ``speedup`` is then the ratio in the
better direction (above 1: the baseline does better than BlackMamba): peer / ours for what is better lower
(seconds, losses, FLOPs), ours / peer for what is better higher (accuracies, rates). There is no floor here.
"""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

from ..runinfo import cpu_model, package_version

HIGHER_IS_BETTER = ("acc",)
REFERENCE = "blackmamba"


def _higher_is_better(unit: str) -> bool:
    return unit in HIGHER_IS_BETTER or unit.endswith("/s")


def row(
    benchmark: str,
    shape: str,
    unit: str,
    ours: float,
    peer: str | None = None,
    peer_value: float | None = None,
    **extra,
) -> dict[str, Any]:
    """One result row (see the module docstring)."""
    speedup = None
    if peer_value is not None and ours and peer_value:
        speedup = ours / peer_value if _higher_is_better(unit) else peer_value / ours
    return {
        "benchmark": benchmark,
        "shape": shape,
        "unit": unit,
        "ours": ours,
        "peer": peer,
        "peer_value": peer_value,
        "floor": None,
        "fraction_of_floor": None,
        "speedup": speedup,
        "max_err": None,
        **extra,
    }


def _model_rows(kind: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [
        row(
            "val_loss",
            kind,
            "nats/token",
            record["val_loss"],
            val_ppl=record["val_ppl"],
            steps=record["steps"],
            train_tokens=record["train_tokens"],
            train_flops=record["train_flops"],
            active_params=record["active_params"],
            parameters=record["parameters"],
        ),
        row("train_flops_per_token", kind, "FLOP/token", record["train_flops_per_token"]),
    ]
    for n, flops in record["inference_flops_per_token"].items():
        rows.append(row("inference_flops_per_token", f"{kind}/{n} tokens", "FLOP/token", flops))
    for n, seconds in (record.get("latency_s") or {}).items():
        rows.append(row("generate_latency", f"{kind}/{n} tokens", "s", seconds))
    for task, acc in (record.get("zero_shot") or {}).items():
        rows.append(row("zero_shot_acc", f"{kind}/{task}", "acc", acc))
    return rows


def result_rows(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every model's rows; the baselines' with BlackMamba's figure of the same benchmark and shape as peer."""
    rows = [r for kind, record in models.items() for r in _model_rows(kind, record)]
    reference = {
        (r["benchmark"], r["shape"].partition("/")[2]): r["ours"] for r in rows if r["shape"].split("/")[0] == REFERENCE
    }
    out = []
    for r in rows:
        kind, _, rest = r["shape"].partition("/")
        value = reference.get((r["benchmark"], rest))
        if kind != REFERENCE and value is not None:
            extra = {k: v for k, v in r.items() if k not in _ROW_FIELDS}
            r = row(r["benchmark"], r["shape"], r["unit"], r["ours"], REFERENCE, value, **extra)
        out.append(r)
    return out


_ROW_FIELDS = frozenset(row("", "", "", 0.0))


def run_meta(device: torch.device, command: str, /, **extra: Any) -> dict[str, Any]:
    """Date, command, card (None on a CPU), CPU, cores, torch threads and library versions, then ``extra``."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "lm_eval": package_version("lm-eval"),
        "blackmamba": package_version("blackmamba-toolkit"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }
