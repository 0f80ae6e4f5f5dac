"""A rank that dies or raises mid-step ends a torchrun job with a non-zero status, promptly, naming the rank."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.torchrun

ROOT = Path(__file__).resolve().parents[2]
# Seconds from launch to exit: start-up of three Python processes on a busy 2-core machine, a few steps,
# then the failure; a hang would run into the subprocess timeout instead.
BOUND_S = 150


def _torchrun(mode: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", "-m", "tests.distributed.workers", mode, "20"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BOUND_S + 60)
    return done, time.monotonic() - t0


def test_killed_rank_ends_the_job():
    done, seconds = _torchrun("kill")
    assert done.returncode != 0
    assert seconds < BOUND_S
    out = done.stdout + done.stderr
    assert "finished" not in out  # no rank ran to the end
    assert "rank    : 1" in out or "rank: 1" in out or "local_rank: 1" in out, out[-3000:]
    assert "SIGKILL" in out or "-9" in out, out[-3000:]


def test_raising_rank_names_itself_and_the_error():
    done, seconds = _torchrun("raise")
    assert done.returncode != 0
    assert seconds < BOUND_S
    assert "error: rank 1 of 2 failed with ValueError: injected failure at step 2" in done.stderr, done.stderr[-3000:]
    assert "finished" not in done.stdout
