"""Helpers shared by the benchmark scripts: machine description, idle detection and result tables."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def text_table(header: list[str], body: list[list[str]]) -> str:
    """A plain-text table with aligned columns and a rule under the header."""
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(line) + " |" for line in [header, *body]]
    lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table: 'n/a' for None, scientific notation for very small or large values."""
    if value is None:
        return "n/a"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.{digits}g}"


def max_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (tensors; computed in fp32)."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def gpu_ceilings(device: str = "cuda") -> tuple[float, float]:
    """(copy bandwidth in bytes/s, counting bytes read and written; bf16 matmul FLOP/s), measured now on
    this card with ``triton.testing.do_bench`` (medians): a 2 GiB device copy and an 8192^3 product."""
    import torch
    from triton.testing import do_bench

    def ms(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    src = torch.randn(2**30, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / (ms(lambda: dst.copy_(src)) * 1e-3)
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    flops = 2 * 8192**3 / (ms(lambda: a @ b) * 1e-3)
    return bw, flops
