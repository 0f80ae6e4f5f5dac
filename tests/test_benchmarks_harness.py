"""The benchmark harness: result rows, results files, metadata, and that every benchmark module imports cleanly
and runs as ``python -m benchmarks.<name>``."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import sys

import pytest
import torch

import benchmarks
from benchmarks import harness
from benchmarks.harness import Row

MODULES = sorted(info.name for info in pkgutil.walk_packages(benchmarks.__path__, "benchmarks.") if not info.ispkg)
LIBRARIES = {"benchmarks.harness", "benchmarks.peers", "benchmarks.kernel_inputs"}
SCRIPTS = [name for name in MODULES if name not in LIBRARIES]
CONTRACT = ["benchmark", "shape", "unit", "ours", "peer", "peer_value", "floor", "fraction_of_floor", "speedup"]


def test_every_script_is_found():
    expected = {"benchmarks.cpu", "benchmarks.tune.tune_scan", "benchmarks.studies.sinkhorn", "benchmarks.kernels"}
    assert expected <= set(SCRIPTS) and LIBRARIES <= set(MODULES)


def test_time_row_derives_speedup_and_fraction_of_floor():
    row = Row("forward", "small/1x2048", "ms", ours=2.0, peer="p", peer_value=5.0, floor=0.5, max_err=1e-6)
    assert not row.higher_is_better
    assert row.speedup == pytest.approx(2.5)  # the peer takes 2.5x as long
    assert row.fraction_of_floor == pytest.approx(0.25)  # floor / ours


def test_rate_row_derives_speedup_and_fraction_of_floor():
    row = Row("decode", "2.8b/b1", "tokens/s", ours=800.0, peer="p", peer_value=200.0, floor=1000.0)
    assert row.higher_is_better
    assert row.speedup == pytest.approx(4.0)
    assert row.fraction_of_floor == pytest.approx(0.8)  # ours / floor


def test_row_without_peer_or_floor_has_no_derived_figures():
    row = Row("train_step", "small/8x256", "tokens/s", ours=100.0)
    assert row.speedup is None and row.fraction_of_floor is None


def test_row_rejects_a_unit_that_is_neither_time_nor_rate():
    with pytest.raises(ValueError, match="furlongs"):
        Row("forward", "x", "furlongs", ours=1.0)


def test_row_json_keeps_the_contract_fields_in_order_then_extras():
    row = Row("decode", "b1", "tokens/s", 10.0, "peer", 5.0, 20.0, 1e-3, {"p50_ms": 1.5, "target": "t"})
    out = row.to_json()
    assert list(out) == [*CONTRACT, "max_err", "p50_ms", "target"]
    assert out["speedup"] == pytest.approx(2.0) and out["fraction_of_floor"] == pytest.approx(0.5)
    assert out["p50_ms"] == 1.5


def test_ratio_and_loss_rows_and_the_json_round_trip():
    ratio = Row("scaling_efficiency", "2.8b/fsdp/1to2", "ratio", 0.9, "one GPU", 1.0)
    loss = Row("resume", "tiny", "loss", 2.0, "continued", 1.9, max_err=0.1, extra={"steps": [4, 5]})
    assert ratio.higher_is_better and ratio.speedup == pytest.approx(0.9)
    assert not loss.higher_is_better and loss.speedup == pytest.approx(0.95)
    for row in (ratio, loss, Row("decode", "b1", "tokens/s", 10.0, "peer", 5.0, 20.0, 1e-3, {"p50_ms": 1.5})):
        back = Row.from_json(json.loads(json.dumps(row.to_json())))
        assert back == row and back.to_json() == row.to_json()


def test_write_results_writes_meta_rows_sections_and_markdown(tmp_path):
    meta = harness.run_meta("cpu", wall_s=1.5)
    rows = [Row("forward", "s1", "s", 2.0, "peer", 4.0), Row("decode", "s1", "tokens/s", 3.0)]
    path = tmp_path / "sub" / "bench.json"
    harness.write_results(path, meta, rows, "# table\n", extras={"curve": [[1, 0.5]]})
    data = json.loads(path.read_text())
    assert list(data) == ["meta", "results", "extras"]
    assert data["meta"]["wall_s"] == 1.5 and data["meta"]["torch"] == torch.__version__
    assert [r["benchmark"] for r in data["results"]] == ["forward", "decode"]
    assert data["results"][0]["speedup"] == pytest.approx(2.0)
    assert data["extras"] == {"curve": [[1, 0.5]]}
    assert path.with_suffix(".md").read_text() == "# table\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["bench.json", "bench.md"]  # no temporary left


def test_run_meta_names_machine_versions_date_and_command():
    meta = harness.run_meta("cpu", batch=4)
    for key in ("date", "command", "card", "cpu", "cores", "torch", "triton", "transformers", "python", "platform"):
        assert key in meta
    assert meta["card"] is None and meta["batch"] == 4
    assert meta["command"].startswith("python ")
    line = harness.meta_line(meta)
    assert meta["date"] in line and f"torch {torch.__version__}" in line


def test_max_err_is_relative_to_the_reference_and_absolute_on_a_zero_reference():
    assert harness.max_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == pytest.approx(0.5)
    assert harness.max_err(torch.tensor([0.0, -0.25]), torch.zeros(2)) == pytest.approx(0.25)


def test_random_ids_are_seeded_and_never_zero():
    a = harness.random_ids(3, 50, 4, seed=1)
    assert a.shape == (3, 50) and int(a.min()) >= 1 and int(a.max()) <= 3
    assert torch.equal(a, harness.random_ids(3, 50, 4, seed=1))
    assert not torch.equal(a, harness.random_ids(3, 50, 4, seed=2))


def test_tables_align_and_format_numbers():
    text = harness.text_table(["a", "bb"], [["xyz", "1"]])
    assert text.splitlines() == ["a   | bb", "----+---", "xyz | 1 "]
    assert harness.markdown_table(["a"], [["1"]]) == "| a |\n|---|\n| 1 |"
    assert harness.fmt(None) == "n/a" and harness.fmt(0.5) == "0.5" and harness.fmt(1e-4) == "1.00e-04"


def test_every_module_imports_without_side_effects(capsys, monkeypatch):
    """Importing a benchmark afresh prints nothing, writes nothing and changes no environment, search path
    or thread count: everything happens in main()."""
    for name in [m for m in sys.modules if m == "benchmarks" or m.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    env, path, threads = dict(os.environ), list(sys.path), torch.get_num_threads()
    results = {p.name: p.stat().st_mtime_ns for p in harness.RESULTS_DIR.iterdir()}
    for name in MODULES:
        importlib.import_module(name)
    assert dict(os.environ) == env
    assert sys.path == path
    assert torch.get_num_threads() == threads
    assert {p.name: p.stat().st_mtime_ns for p in harness.RESULTS_DIR.iterdir()} == results
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_has_help_under_its_module_name(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(name).main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {name} ")


GPU_SCRIPTS = ["benchmarks.kernels", "benchmarks.train_profile", "benchmarks.generate", "benchmarks.tune.gemv",
               "benchmarks.tune.moe_layer", "benchmarks.tune.profile_decode", "benchmarks.tune.ssm_update",
               "benchmarks.tune.tune_moe_decode", "benchmarks.tune.tune_scan", "benchmarks.tune.sinkhorn_tiles",
               "benchmarks.train_distributed"]  # fmt: skip


@pytest.mark.parametrize("name", GPU_SCRIPTS)
def test_gpu_scripts_stop_with_a_usage_error_without_a_gpu(name, capsys, monkeypatch):
    """On a machine without CUDA a GPU benchmark exits 2 with one line naming what is missing, no traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(name).main([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m {name}: error: this benchmark times GPU kernels and needs a CUDA GPU; torch sees none on this "
        "machine"
    )


def test_a_study_runs_end_to_end_into_a_chosen_folder(tmp_path, capsys):
    from benchmarks.studies import sinkhorn

    threads = torch.get_num_threads()
    try:
        sinkhorn.main(["--tokens", "16", "--scales", "1", "--seeds", "1", "--time-repeats", "1", "--threads", "1",
                       "--out", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "sinkhorn.json").read_text())
    assert data["meta"]["cpu"] == harness.cpu_model() and data["meta"]["wall_s"] > 0
    assert {r["criterion"] for r in data["results"]} == {"released", "marginals"}
    assert "Sinkhorn routing" in (tmp_path / "sinkhorn.md").read_text()
    assert "T  | init" in capsys.readouterr().out


@pytest.mark.slow
def test_cpu_benchmark_quick_run_writes_the_contract_rows(tmp_path):
    from benchmarks import cpu

    threads = torch.get_num_threads()
    try:
        cpu.main(["--quick", "--skip-peer", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert [r["benchmark"] for r in data["results"]] == ["forward", "decode"]
    for r in data["results"]:
        assert list(r)[:10] == [*CONTRACT, "max_err"] and r["ours"] > 0 and r["max_err"] < 1e-3
    assert data["results"][0]["fraction_of_floor"] > 0


def test_generate_readme_table_prints_results_files_in_order(tmp_path, capsys):
    from benchmarks import generate

    rows = [
        Row("decode", "2.8b/b1", "tokens/s", 1262.4, "Jamba", 21.6, 3374.0, 0.0284, extra=dict(p50_ms=0.784)),
        Row("prefill", "2.8b/1x2048", "tokens/s", 155657.0, None, None, 622008.0, 0.0),
    ]
    harness.write_results(tmp_path / "a.json", {}, rows[:1])
    harness.write_results(tmp_path / "b.json", {}, rows[1:])
    generate.main(["--readme-table", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| benchmark | shape | ours (tokens/s) |") and len(lines) == 4
    assert lines[2] == "| decode | 2.8b/b1 | 1,262 | 21.6 | 58.4x | 3,374 | 37% | 0.78 |  | 0.028 |"
    assert lines[3] == "| prefill | 2.8b/1x2048 | 155,657 | n/a | n/a | 622,008 | 25% |  |  | 0.000 |"
    generate.main(["--readme-table", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--benchmarks", "prefill"])
    only = capsys.readouterr().out.strip().splitlines()
    assert len(only) == 3 and only[2] == lines[3]


ONLY_ROWS = [("decode", [1, 16, 64, 256], []), ("prefill", [], [1, 8]), ("fp8", [1, 16, 64, 256], [1, 8]),
             (None, [1, 16, 64, 256], [1, 8, 64])]  # fmt: skip


@pytest.mark.parametrize("only,decode,prefill", ONLY_ROWS)
def test_generate_only_picks_its_rows(only, decode, prefill):
    from types import SimpleNamespace

    from benchmarks import generate

    args = SimpleNamespace(only=only, quick=False)
    assert generate.decode_batches(args) == decode and generate.prefill_batches(args) == prefill
