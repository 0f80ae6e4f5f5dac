"""Progress of long scoring loops (lm-eval requests, perplexity tokens).

On a terminal: a tqdm bar. Off a terminal (CI, nohup, a log file) a bar is either invisible or floods the
log, so instead one plain line every ``every`` seconds -- done / total, tokens/s, time left -- and a closing
line if any was printed. A job shorter than ``every`` prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

PROGRESS_EVERY_S = 15.0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts ``unit``s done out of ``total`` (None: unknown) and the tokens they held.

    ``update(n, tokens)`` after each piece of work; ``close()`` (or use as a context manager) at the end.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "requests",
        every: float = PROGRESS_EVERY_S,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.clock = clock
        self.done = self.tokens = 0
        self.lines = 0  # plain lines printed so far
        self.start = self.last = clock()
        self.bar = None
        if enabled and _isatty(self.stream):
            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(n)
            if tokens:
                self.bar.set_postfix_str(f"{self.tokens_per_s():,.0f} tokens/s", refresh=False)
        elif self.enabled and self.clock() - self.last >= self.every:
            self._line()

    def tokens_per_s(self) -> float:
        return self.tokens / max(self.clock() - self.start, 1e-9)

    def status(self) -> str:
        """``desc: done/total unit (pct), tokens/s, elapsed, time left`` (what a plain line says)."""
        elapsed = self.clock() - self.start
        count = f"{self.done:,}" if self.total is None else f"{self.done:,}/{self.total:,}"
        parts = [f"{self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.1f}%)"
        if self.tokens:
            parts.append(f"{self.tokens_per_s():,.0f} tokens/s")
        parts.append(f"{_clock_text(elapsed)} elapsed")
        if self.total and 0 < self.done < self.total:
            parts.append(f"~{_clock_text(elapsed * (self.total - self.done) / self.done)} left")
        return ", ".join(parts)

    def _line(self) -> None:
        print(self.status(), file=self.stream, flush=True)
        self.lines += 1
        self.last = self.clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.lines:
            self._line()  # the closing line of a job that printed progress
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
