"""Plots of a training run: PNG files from a fake metrics.jsonl, clear errors without metrics."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")

from blackmamba.training.plots import plot_run  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = ["loss.png", "lr.png", "throughput.png", "expert_load.png"]


def fake_rows(n_steps: int = 40, n_layers: int = 2, n_experts: int = 4) -> list[dict]:
    rows = []
    for step in range(1, n_steps + 1):
        load = []
        for layer in range(n_layers):
            weights = [1.0 + 0.5 * math.sin(0.2 * step + layer + e) for e in range(n_experts)]
            load.append([w / sum(weights) for w in weights])
        rows.append(
            {
                "step": step,
                "loss": 8.3 * math.exp(-step / 30) + 3.0,
                "lr": 1e-3 * min(1.0, step / 5),
                "tokens_per_s": 20000.0 + 100 * (step % 3),
                "tokens": step * 4096,
                "grad_norm": 1.0 / step,
                "sinkhorn_iters": 1.0,
                "expert_load": load,
                "mfu": 0.01,
            }
        )
        if step % 10 == 0:
            rows.append(
                {
                    "step": step,
                    "val_loss": 8.0 * math.exp(-step / 30) + 3.2,
                    "val_ppl": math.exp(8.0 * math.exp(-step / 30) + 3.2),
                    "val_expert_load": load,
                }
            )
    return rows


def write_metrics(run, rows) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is suspiciously small ({len(data)} bytes)"


def test_plot_run_writes_valid_pngs(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, fake_rows())
    paths = plot_run(run)
    assert [p.name for p in paths] == EXPECTED
    for p in paths:
        assert p.parent == run / "plots"
        assert_png(p)
    # Only the four PNGs are left in plots/ (no temporary files).
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(EXPECTED)


def test_plot_run_skips_metrics_never_logged(tmp_path):
    run = tmp_path / "run"
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 6)]
    # A truncated last line (the trainer writing while we read) is ignored.
    write_metrics(run, rows)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    # An existing plot is replaced.
    (run / "plots").mkdir()
    (run / "plots" / "loss.png").write_bytes(b"stale")
    paths = plot_run(str(run))
    assert [p.name for p in paths] == ["loss.png", "lr.png"]
    for p in paths:
        assert_png(p)
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "lr.png"]


def test_missing_metrics_raises(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(tmp_path)


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_metrics_raises(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_corrupt_metrics_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        plot_run(tmp_path)
