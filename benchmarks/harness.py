"""What every benchmark script shares: run metadata, result rows, results files, timers and measured ceilings.

A results file is one JSON object ``{"meta": ..., "results": [...], ...}``: ``meta`` comes from
:func:`run_meta` (date, command line, card or CPU, library versions, plus what the script adds) and each
entry of ``results`` is a :class:`Row`, whose fields are the results contract the README tables are built
from::

    benchmark, shape, unit, ours, peer, peer_value, floor, fraction_of_floor, speedup, max_err, <extra...>

``speedup`` and ``fraction_of_floor`` are derived, never passed: for a time (unit ``s``, ``ms``, ``us``)
lower is better, so speedup = peer / ours and fraction of floor = floor / ours; for a rate (a unit ending
in ``/s``) speedup = ours / peer and fraction of floor = ours / floor. Either way 1.0 means "at the
floor" and a speedup above 1 means faster than the peer.

Timers: :func:`wall_times` (host clock, with a device sync) for whole steps, :func:`bench_ms`
(``triton.testing.do_bench`` medians) for kernels, :func:`cuda_event_us` (CUDA events, back to back) for
graph replays. Ceilings are measured in the same run as the figures they bound: :func:`gpu_ceilings`
(copy bandwidth, bf16 matmul rate) and :func:`cpu_matmul_rates` (fp32 GEMMs of given shapes).

Importing this module does nothing but define names; scripts run as ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import torch

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.model import cast_model
from blackmamba.runinfo import cpu_model, package_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BF16 = torch.bfloat16
# The MFU denominator of the training benchmarks (--peak-tflops): the bf16 matmul rate measured on the H200.
H200_BF16_TFLOPS = 784.0
TIME_UNITS = ("s", "ms", "us")
# Units that are neither: a ratio of two rates (higher is better) and a loss (lower is better).
OTHER_UNITS = ("ratio", "loss")
_START = time.perf_counter()


def argument_parser(spec: ModuleSpec | None, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose usage line reads ``python -m benchmarks.<name>`` and whose description is the
    first paragraph of the script's docstring."""
    prog = f"python -m {spec.name}" if spec is not None else None
    return argparse.ArgumentParser(prog=prog, description=(doc or "").strip().split("\n\n")[0])


def require_cuda(parser: argparse.ArgumentParser) -> None:
    """Stop with the parser's one-line usage error (exit 2, no traceback) when torch sees no CUDA GPU: for the
    scripts that time GPU kernels."""
    if not torch.cuda.is_available():
        parser.error("this benchmark times GPU kernels and needs a CUDA GPU; torch sees none on this machine")


def command_line() -> str:
    """How this process was started, as it could be typed again (``python -m benchmarks.cpu --only small``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def log(message: str) -> None:
    """Progress on stderr with the seconds since start; stdout is kept for the tables."""
    print(f"[{elapsed_s():7.1f}s] {message}", file=sys.stderr, flush=True)


def elapsed_s() -> float:
    """Seconds since the harness was imported (the start of the run, for ``wall_s``)."""
    return time.perf_counter() - _START


def run_meta(device: str | torch.device = "cpu", /, **extra: Any) -> dict[str, Any]:
    """The run's metadata, the same keys for every script: date, command, card (None on CPU), CPU, cores,
    torch threads, torch/triton/CUDA/transformers/python versions, platform; then ``extra``."""
    device = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **extra,
    }


def meta_line(meta: dict[str, Any]) -> str:
    """One line naming the machine, versions and date of a run, for the heads of tables."""
    machine = meta["card"] or f"{meta['cpu']}, {meta['cores']} cores"
    libs = [f"{name} {meta[name]}" for name in ("torch", "triton", "transformers") if meta.get(name)]
    return ", ".join([meta["date"], machine, *libs, f"python {meta['python']}"])


def load_average() -> list[float]:
    return list(os.getloadavg())


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of the machine's CPU time spent busy over ``interval`` seconds (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(interval)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (busy1 - busy0) / max(1, total1 - total0)


def wait_for_idle(max_wait_s: float, threshold: float = 0.1) -> float:
    """Wait (at most ``max_wait_s``) until other processes leave the CPU idle; returns the busy fraction."""
    deadline = time.perf_counter() + max_wait_s
    busy = cpu_busy()
    while busy > threshold and time.perf_counter() < deadline:
        log(f"CPU {busy:.0%} busy with other work; waiting")
        time.sleep(10)
        busy = cpu_busy()
    return busy


@dataclass
class Row:
    """One measured figure against its peer, floor and reference (see the module docstring)."""

    benchmark: str
    shape: str
    unit: str
    ours: float
    peer: str | None = None
    peer_value: float | None = None
    floor: float | None = None
    max_err: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in TIME_UNITS + OTHER_UNITS and not self.unit.endswith("/s"):
            raise ValueError(
                f"unit {self.unit!r}: expected a time ({', '.join(TIME_UNITS)}), a rate ('.../s') or one of "
                f"{', '.join(OTHER_UNITS)}"
            )

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> Row:
        """The row :meth:`to_json` wrote (the derived speedup and fraction of floor are recomputed)."""
        fields = ("benchmark", "shape", "unit", "ours", "peer", "peer_value", "floor", "max_err")
        derived = ("fraction_of_floor", "speedup")
        extra = {k: v for k, v in row.items() if k not in fields + derived}
        return cls(**{k: row.get(k) for k in fields}, extra=extra)

    @property
    def higher_is_better(self) -> bool:
        return self.unit.endswith("/s") or self.unit == "ratio"

    @property
    def speedup(self) -> float | None:
        if self.peer_value is None:
            return None
        return self.ours / self.peer_value if self.higher_is_better else self.peer_value / self.ours

    @property
    def fraction_of_floor(self) -> float | None:
        if self.floor is None:
            return None
        return self.ours / self.floor if self.higher_is_better else self.floor / self.ours

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "shape": self.shape,
            "unit": self.unit,
            "ours": self.ours,
            "peer": self.peer,
            "peer_value": self.peer_value,
            "floor": self.floor,
            "fraction_of_floor": self.fraction_of_floor,
            "speedup": self.speedup,
            "max_err": self.max_err,
            **self.extra,
        }


def mark_targets(rows: Sequence[Row], meets: Callable[[Row, str | None], bool | None]) -> None:
    """Put ``meets_target`` (``meets(row, target)``) right after each row's ``target`` extra, once the row's
    figures are final."""
    for r in rows:
        target = r.extra.pop("target")
        r.extra = {"target": target, "meets_target": meets(r, target), **r.extra}


def max_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref| in float64; the absolute max |ours - ref| where the reference is all zero."""
    ours, ref = ours.detach().double(), ref.detach().double()
    diff = (ours - ref).abs().max()
    scale = ref.abs().max()
    return float(diff / scale if scale > 0 else diff)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: 'n/a' for None, scientific notation for very small or large values."""
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def text_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A plain-text table with aligned columns and a rule under the header."""
    lines = [list(header), *(list(line) for line in body)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(line) + " |" for line in [header, *body]]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one rename, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON (values JSON does not know, such as lm-eval's, become strings)."""
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_results(
    path: Path, meta: dict[str, Any], rows: Sequence[Row], markdown: str | None = None, **sections: Any
) -> None:
    """``{"meta": meta, "results": rows, **sections}`` to ``path`` and, when given, ``markdown`` beside it
    (same name, ``.md``)."""
    path = Path(path)
    write_json(path, {"meta": meta, "results": [r.to_json() for r in rows], **sections})
    if markdown is not None:
        write_text(path.with_suffix(".md"), markdown)


def build_model(
    config: BlackMambaConfig | str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    train: bool = False,
    seed: int = 0,
) -> BlackMamba:
    """A BlackMamba with random weights (seeded), built on ``device``; ``dtype`` casts all but the fp32
    parameters (``cast_model``)."""
    if isinstance(config, str):
        config = BlackMambaConfig.from_preset(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = BlackMamba(config)
    if dtype is not None:
        model = cast_model(model, dtype)
    return model.train(train)


def random_ids(batch: int, length: int, vocab: int, seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Random token ids in [1, vocab) (never the all-zeros input), shape (batch, length), drawn on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=gen).to(device)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def sync_time(device: str | torch.device = "cuda") -> float:
    """``time.perf_counter()`` after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def wall_times(fn: Callable[[], object], warmup: int, repeats: int, device: str | torch.device = "cpu") -> list[float]:
    """Wall times in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, each ended by a
    device sync."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(sync_time(device) - start)
    return times


def median_s(fn: Callable[[], object], warmup: int, repeats: int, device: str | torch.device = "cpu") -> float:
    return statistics.median(wall_times(fn, warmup, repeats, device))


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` on the GPU from ``triton.testing.do_bench`` (L2 flushed between calls)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def cuda_graph(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph after ``warmup`` eager calls (which compile its kernels)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def cuda_event_us(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Mean microseconds per call of ``fn`` run ``reps`` times back to back, between two CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / reps


def gpu_ceilings(device: str = "cuda") -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting bytes read and written; bf16 matmul FLOP/s), measured now on
    this card with :func:`bench_ms` (medians): a 2 GiB device copy and an 8192^3 product."""
    src = torch.randn(2**30, device=device, dtype=BF16)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / (bench_ms(lambda: dst.copy_(src)) * 1e-3)
    a, b = (torch.randn(8192, 8192, device=device, dtype=BF16) for _ in range(2))
    flops = 2 * 8192**3 / (bench_ms(lambda: a @ b) * 1e-3)
    return bw, flops


def cpu_matmul_rates(shapes: Sequence[tuple[int, int, int]], repeats: int = 5) -> dict[str, float]:
    """fp32 ``torch.matmul`` FLOP/s per (M, K, N) shape, named ``MxKxN``: median of ``repeats`` after two
    warm-up calls."""
    gen = torch.Generator().manual_seed(0)
    rates: dict[str, float] = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        seconds = median_s(lambda a=a, b=b: torch.matmul(a, b), warmup=2, repeats=repeats)
        rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n / seconds
    return rates
