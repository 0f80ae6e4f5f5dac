"""On one or more GPUs (NCCL): FSDP with bf16 compute parameters, fp32 reduction and fp32 master weights
trains like the plain trainer's recipe, keeps A_log / D / dt bias in fp32, and saves and exports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blackmamba import load_pretrained

pytestmark = [pytest.mark.gpu, pytest.mark.torchrun]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_bf16_trains_like_the_plain_recipe(tmp_path):
    n = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           "-m", "tests.distributed.workers", "gpu", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "gpu.pt", weights_only=True)
    assert result["seen"]["a_log"] == "Parameter torch.float32"  # outside FSDP, in fp32
    assert result["seen"]["in_proj"] == "DTensor torch.float32"  # sharded fp32 master weights
    want, got = torch.tensor(result["want"]), torch.tensor(result["got"])
    assert got[-1] < got[0] - 0.3
    # bf16 compute (norms and routers included) against fp32 weights under autocast: close, not equal.
    torch.testing.assert_close(got, want, rtol=0.03, atol=0)
    model = load_pretrained(tmp_path / "export", dtype=torch.float32)
    assert model.layers[1].mixer.w1.shape[0] == 8
