"""A time budget under torchrun: every rank stops at the same step, the vote travelling on a gloo group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from ..training.helpers import prepare_tiny_data
from . import harness as h

pytestmark = pytest.mark.torchrun

ROOT = Path(__file__).resolve().parents[2]


def _vote(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from blackmamba.training.distributed import any_rank

    h.set_env(rank, world, port)
    dist.init_process_group("gloo")
    control = dist.new_group(backend="gloo")
    votes = [any_rank(rank == 1, control), any_rank(False, control), any_rank(rank == 0)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(votes))
    dist.destroy_process_group()


def test_any_rank_on_a_gloo_group(tmp_path):
    mp.spawn(_vote, args=(2, h.free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, False, True]


def test_time_budget_under_torchrun_stops_every_rank_at_one_step(tmp_path):
    data = prepare_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts",
           "0", "-m", "blackmamba", "train", "--preset", "tiny", "--data", str(data), "--out", str(run),
           "--max-minutes", "0.5", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "1024", "--warmup", "2",
           "--no-plots", "--no-progress", "--fsdp"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] >= 1 and summary["step"] <= summary["max_steps"]
    assert (run / "checkpoints" / f"step-{summary['step']:08d}").is_dir()  # both ranks saved the same step
    assert summary["seconds"] < 0.5 * 60 + 30  # the budget covers the whole command (start-up aside)
