"""`blackmamba plot RUN`: a missing or corrupt metrics file, or a plots folder that cannot be written, is one error
line naming the path (exit 1), and nothing is half-written."""

from __future__ import annotations

import json

import pytest

from blackmamba.cli import main

pytest.importorskip("matplotlib")

from blackmamba.training.plots import PlotError, plot_run  # noqa: E402


def write_rows(run, n=5):
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"step": s, "loss": 5.0 - 0.3 * s, "lr": 1e-3 * s} for s in range(1, n + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_folder_that_is_a_file(tmp_path):
    write_rows(tmp_path)
    (tmp_path / "plots").write_text("not a folder")
    with pytest.raises(PlotError, match="plots is a file, not a folder"):
        plot_run(tmp_path)
    assert (tmp_path / "plots").read_text() == "not a folder"


def test_unwritable_plot_is_a_clear_error(tmp_path, monkeypatch):
    write_rows(tmp_path)
    import blackmamba.training.plots as plots

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots.os, "replace", full)
    with pytest.raises(PlotError, match=r"cannot write .*loss.png: No space left on device"):
        plot_run(tmp_path)
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("case", ["missing", "corrupt", "plots-file"])
def test_cli_plot_errors_are_one_line(tmp_path, capsys, case):
    if case == "corrupt":
        (tmp_path / "metrics.jsonl").write_text('not json\n{"step": 1}\n')
    elif case == "plots-file":
        write_rows(tmp_path)
        (tmp_path / "plots").write_text("x")
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path) in err[0]
