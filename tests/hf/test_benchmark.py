"""benchmarks/hf_generate.py runs as a smoke test on the CPU and writes no results file."""

from __future__ import annotations

from benchmarks import harness, hf_generate


def test_smoke_run_prints_the_table_and_writes_nothing(capsys):
    before = {p.name: p.stat().st_mtime_ns for p in harness.RESULTS_DIR.iterdir()}
    hf_generate.main(["--smoke"])
    out = capsys.readouterr().out
    assert "hf generate" in out and "b1 p8 n8" in out and "b2 p8 n8" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("b")]
    assert all(float(row[-1]) == 1.0 for row in rows)  # the wrapper gave blackmamba.generate's tokens
    assert {p.name: p.stat().st_mtime_ns for p in harness.RESULTS_DIR.iterdir()} == before
