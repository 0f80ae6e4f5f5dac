"""benchmarks.scaling, the several-GPU measurement: its layouts and scaling rows, and the whole script on
gloo processes (tiny preset), resumption across world sizes included."""

import json
import math

import pytest

from benchmarks import scaling
from benchmarks.harness import Row

from ..training.helpers import prepare_tiny_data


def test_layouts_follow_the_gpus_and_the_experts():
    assert scaling.layouts_for(1, 8) == ["fsdp"]
    assert scaling.layouts_for(2, 8) == ["fsdp", "fsdp+ep2"]
    assert scaling.layouts_for(8, 8) == ["fsdp", "fsdp+ep2", "fsdp+ep4", "fsdp+ep8"]
    assert scaling.layouts_for(6, 8) == ["fsdp", "fsdp+ep2"]  # 4 and 8 do not divide 6
    assert scaling.layouts_for(8, 4) == ["fsdp", "fsdp+ep2", "fsdp+ep4"]  # 8 does not divide 4 experts


def test_scaling_rows_divide_by_fsdp_on_one_gpu():
    rows = [
        Row("train_step", "2.8b/fsdp/1gpu", "tokens/s", 40_000.0).to_json(),
        Row("train_step", "2.8b/fsdp/2gpu", "tokens/s", 37_000.0).to_json(),
        Row("train_step", "2.8b/fsdp+ep2/2gpu", "tokens/s", 38_000.0).to_json(),
        Row("train_step", "1.5b/fsdp/2gpu", "tokens/s", 50_000.0).to_json(),  # no one-GPU row: no ratio
    ]
    out = {r.shape: r for r in scaling.scaling_rows(rows, "gpu")}
    assert set(out) == {"2.8b/fsdp/1to2", "2.8b/fsdp+ep2/1to2"}
    assert out["2.8b/fsdp/1to2"].ours == pytest.approx(0.925)
    assert out["2.8b/fsdp+ep2/1to2"].ours == pytest.approx(0.95)
    assert out["2.8b/fsdp/1to2"].peer_value == 40_000.0 and out["2.8b/fsdp/1to2"].extra["target"] == 0.90


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="must include 1"):
        scaling.main(["--device", "cpu", "--gpus", "2", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="give --data"):
        scaling.main(["--device", "cpu", "--resume-check", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match=r"must lie in 1\.\.2"):
        scaling.main(["--device", "cpu", "--gpus", "1", "3", "--out", str(tmp_path / "x.json")])


@pytest.mark.torchrun
def test_the_script_on_gloo_processes(tmp_path):
    data = prepare_tiny_data(tmp_path)
    out = tmp_path / "scaling.json"
    scaling.main(
        ["--device", "cpu", "--presets", "tiny", "--gpus", "1", "2", "--batch", "2", "--seq-len", "32",
         "--steps", "1", "--resume-check", "--data", str(data), "--out", str(out)]
    )  # fmt: skip
    result = json.loads(out.read_text())
    rows = {(r["benchmark"], r["shape"]): r for r in result["results"]}
    step = {s: rows[("train_step", f"tiny/{s}")] for s in ("fsdp/1proc", "fsdp/2proc", "fsdp+ep2/2proc")}
    assert all(r["ours"] > 0 and len(r["losses"]) == 3 for r in step.values())
    for layout in ("fsdp", "fsdp+ep2"):
        eff = rows[("scaling_efficiency", f"tiny/{layout}/1to2")]
        assert eff["ours"] == pytest.approx(step[f"{layout}/2proc"]["ours"] / step["fsdp/1proc"]["ours"])
    resumed = rows[("resume_across_world_size", "tiny/fsdp+ep2:2to1+ep1")]
    # fp32 on gloo: the run resumed on one process continues as the run on two did.
    assert resumed["max_err"] < 1e-4 and len(resumed["losses_resumed"]) == 2
    assert [m["gpus"] for m in result["meta"]["runs"]] == [1, 2]


def test_train_distributed_layout_names():
    from benchmarks.train_distributed import parse_layout

    assert parse_layout("plain") == (False, 1, None, None, False, False)
    assert parse_layout("fsdp") == (True, 1, None, None, False, False)
    assert parse_layout("fsdp+ep4:keep") == (True, 4, False, None, False, False)
    assert parse_layout("fsdp:reshard:u2") == (True, 1, True, 2, False, False)
    assert parse_layout("fsdp:u4:chunkcat:rcopy") == (True, 1, None, 4, True, True)
    for bad in ("plain:keep", "fsdp:rfp32", "plain:rcopy", "fsdp:u0", "fsdp:sometimes", "fsdp+ep0", "ddp"):
        with pytest.raises(SystemExit, match="unknown layout"):
            parse_layout(bad)


@pytest.mark.torchrun
def test_train_distributed_rounds_host_profile_and_readme_table(tmp_path, capsys):
    """Two rounds of plain and FSDP on one gloo process: each row is its median round against the plain step's
    median, with every round's tokens/s and its ratio to the plain step of that round; --host-profile adds the
    top host functions; --readme-table prints the file as the README's table."""
    import subprocess
    import sys

    from benchmarks import train_distributed

    out = tmp_path / "distributed.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "benchmarks.train_distributed",
        "--device",
        "cpu",
        "--presets",
        "tiny",
        "--layouts",
        "plain",
        "fsdp:u2",
        "--rounds",
        "2",
        "--host-profile",
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    plain, fsdp = result["results"]
    assert result["meta"]["timing"] == plain["timing"] == "pipelined"
    assert len(plain["losses"]) == len(fsdp["losses"]) == 3  # two warm-up steps and the timed one, all read
    assert plain["rounds"] == fsdp["rounds"] == 2 and len(plain["rounds_tokens_per_s"]) == 2
    assert fsdp["ours"] == pytest.approx(
        sorted(fsdp["rounds_tokens_per_s"])[1] / 2 + sorted(fsdp["rounds_tokens_per_s"])[0] / 2
    )
    assert fsdp["peer_value"] == pytest.approx(sum(plain["rounds_tokens_per_s"]) / 2)
    for ratio, ours, peer in zip(fsdp["rounds_vs_plain"], fsdp["rounds_tokens_per_s"], plain["rounds_tokens_per_s"],
                                 strict=True):  # fmt: skip
        assert ratio == pytest.approx(ours / peer)
    top = fsdp["host_profile_top"]
    assert top and {"function", "calls", "own_ms", "cumulative_ms"} <= set(top[0])
    assert top == sorted(top, key=lambda f: -f["own_ms"])
    train_distributed.main(["--readme-table", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| layout | tokens/s | vs plain | by round |") and len(lines) == 4
    assert lines[3].startswith(f"| fsdp:u2 | {fsdp['ours']:,.0f} | {fsdp['speedup']:.3f} | ")


@pytest.mark.torchrun
def test_train_distributed_synced_timing(tmp_path):
    """``--timing synced`` times each step alone, as the trainer ran before its non-finite guard read late."""
    import subprocess
    import sys

    out = tmp_path / "distributed.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "benchmarks.train_distributed", "--device", "cpu", "--presets", "tiny", "--layouts", "fsdp:u2",
           "--timing", "synced", "--steps", "2", "--batch", "2", "--seq-len", "32", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert result["meta"]["timing"] == row["timing"] == "synced"
    assert len(row["losses"]) == 4 and all(math.isfinite(v) for v in row["losses"])
