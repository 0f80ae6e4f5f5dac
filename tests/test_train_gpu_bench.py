"""benchmarks/train_gpu.py on the CPU (its check mode): both timings write the contract rows."""

import json
import math

import pytest

from benchmarks import train_gpu


@pytest.mark.parametrize("timing", ["pipelined", "synced"])
def test_train_gpu_check_mode_writes_rows_for_each_timing(tmp_path, timing):
    out = tmp_path / "train.json"
    train_gpu.main(["--device", "cpu", "--presets", "tiny", "--batch", "2", "--seq-len", "32", "--steps", "2",
                    "--accum", "2", "--accum-steps", "1", "--timing", timing, "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["meta"]["timing"] == timing
    rows = {row["benchmark"]: row for row in result["results"]}
    assert set(rows) == {"train_step", "train_step_accum2"}
    for row in rows.values():
        assert row["timing"] == timing and row["ours"] > 0 and math.isfinite(row["first_loss"])
        assert row["tokens_per_step"] == 2 * 32 * row["micro_batches"]
        assert row["ours"] == pytest.approx(row["tokens_per_step"] / row["step_s"])
    # The learning rate is zero and both rows start from the same ids: the same first loss.
    assert rows["train_step"]["first_loss"] == rows["train_step_accum2"]["first_loss"]


def test_end_step_reads_late_with_a_fused_optimizer_and_clips_in_its_step():
    import torch

    from blackmamba.training.guard import FiniteGuard

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = FiniteGuard(opt, train_gpu.diverged)
    read = []
    for step in (1, 2):
        loss = model(torch.randn(5, 4)).pow(2).sum() * 100  # a large gradient: clipped to norm 1
        loss.backward()
        read += train_gpu.end_step(model, opt, guard, step, [loss.detach()])
        assert float(opt.grad_scale) > 1.0
    assert [v.step for v in read] == [1]  # the newest step is still pending
    read += guard.flush()
    assert [v.step for v in read] == [1, 2] and all(v.grad_norm > 1 for v in read)
