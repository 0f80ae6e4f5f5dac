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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_under_torchrun_on_gpus(tmp_path):
    """`torchrun -m blackmamba train --fsdp [--expert-parallel 2]` on every GPU (NCCL, bf16 compute) learns
    like the plain one-GPU trainer, writes distributed checkpoints and exports a loadable model."""
    import json

    from tests.training.helpers import losses, prepare_tiny_data

    data = prepare_tiny_data(tmp_path)
    n = torch.cuda.device_count()
    flags = ["--preset", "tiny", "--data", str(data), "--max-steps", "8", "--batch-size", str(4 * n), "--seq-len", "32",
             "--lr", "3e-3", "--warmup", "2", "--eval-every", "4", "--save-every", "4", "--log-every", "1",
             "--no-progress", "--no-plots"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    plain = subprocess.run([sys.executable, "-m", "blackmamba", "train", *flags, "--out", str(tmp_path / "plain")],
                           cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    layout = ["--fsdp"] + (["--expert-parallel", "2"] if n >= 2 else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
           "blackmamba", "train", *flags, *layout, "--out", str(tmp_path / "dist")]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    want, got = (
        torch.tensor([v for _, v in losses(tmp_path / "plain")]),
        torch.tensor([v for _, v in losses(tmp_path / "dist")]),
    )
    assert got[-1] < got[0] - 0.3
    torch.testing.assert_close(got, want, rtol=0.03, atol=0)  # bf16 parameters against bf16 autocast: close
    assert json.loads(done.stdout)["model"] == str(tmp_path / "dist" / "model")
    assert (tmp_path / "dist" / "checkpoints" / "step-00000008" / "dcp_state.json").is_file()
    model = load_pretrained(tmp_path / "dist" / "model", dtype=torch.float32)
    assert model.layers[1].mixer.w1.shape[0] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_reduce_scatter_copy_in_on_cuda_writes_what_torch_chunk_cat_writes(world):
    """The copy-in that replaces ``torch._chunk_cat``'s CUDA kernel under FSDP, at a 2.8B block's gradient
    shapes (bf16 into fp32 and into bf16), ragged chunks included."""
    from blackmamba.training.distributed import reduce_scatter_copy_in

    gen = torch.Generator(device="cuda").manual_seed(world)
    shapes = [(5888, 2560), (2560, 5888), (192, 2944), (2944, 160), (2944, 4), (2560,), (8, 2560), (8, 13, 2560)]
    grads = [torch.randn(s, generator=gen, device="cuda", dtype=torch.bfloat16) for s in shapes]
    numel = world * sum(-(-g.size(0) // world) * (g.numel() // g.size(0)) for g in grads)
    for out_dtype in (torch.float32, torch.bfloat16):
        junk = torch.randn(numel, generator=gen, device="cuda").to(out_dtype)
        want, got = junk.clone(), junk.clone()
        torch._chunk_cat(grads, 0, world, out=want.view(world, -1))
        reduce_scatter_copy_in(grads, 0, world, got.view(world, -1))
        assert torch.equal(got, want)
