"""`blackmamba experiment paper` end to end with a tiny budget: four models trained at equal FLOPs, results
rows and plots written, a rerun skips finished models, an interrupted one resumes with the losses of an
uninterrupted run, and foreign folders, other plans and impossible budgets are refused."""

from __future__ import annotations

import json
import os

import pytest

import blackmamba.training.trainer as trainer
from blackmamba.experiments import KINDS
from blackmamba.experiments.paper import ExperimentError, PaperArgs, run_paper
from blackmamba.experiments.presets import ExperimentPreset

from ..checkpoint.common import assert_refused, run_cli
from ..training.helpers import prepare_tiny_data

PRESET = ExperimentPreset(
    name="test",
    model=dict(d_model=32, layer_pattern=["mamba", "moe"], d_state=8, n_experts=4, d_ff=64),
    head_dim=16,
    budget_flops=8e7,
    batch_size=4,
    seq_len=32,
    lr=3e-3,
    warmup=2,
    evaluations=2,
    eval_tokens=512,
    saves=2,
    prompt_tokens=4,
    latency_tokens=(4, 9),
    latency_repeats=1,
    zero_shot_limit=0,
    tasks=("arc_easy",),
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def args(data_dir, out, **kw) -> PaperArgs:
    return PaperArgs(**{"data": str(data_dir), "out": str(out), "preset": PRESET, "progress": False, **kw})


@pytest.fixture(scope="module")
def experiment(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    return out, run_paper(args(data_dir, out))


def test_four_models_at_equal_training_flops(experiment):
    out, results = experiment
    models = results["models"]
    assert list(models) == list(KINDS)
    per_step = {k: m["train_flops_per_token"] * results["plan"]["tokens_per_step"] for k, m in models.items()}
    for kind, record in models.items():
        # as many steps as the budget pays for, and not one more
        assert record["train_flops"] <= PRESET.budget_flops < record["train_flops"] + per_step[kind]
        assert record["steps"] == json.loads((out / "runs" / kind / "summary.json").read_text())["step"]
        assert record["curve"][-1]["step"] == record["steps"] and len(record["curve"]) == 2
        assert set(record["latency_s"]) == {"4", "9"} and all(s > 0 for s in record["latency_s"].values())
        assert (record["expert_load"] is not None) == (kind in ("blackmamba", "transformer-moe"))
    flops = {k: m["inference_flops_per_token"] for k, m in models.items()}
    assert flops["transformer"]["9"] > flops["transformer"]["4"]  # attention: more keys, more FLOPs
    assert flops["mamba"]["9"] == flops["mamba"]["4"]
    assert results["notes"] == ["zero-shot suite skipped (--limit 0)"]


def test_results_rows_meta_and_plots(experiment):
    out, results = experiment
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    meta = results["meta"]
    assert meta["card"] is None and meta["cpu"] and meta["torch"] and meta["date"]
    assert meta["command"].startswith("blackmamba experiment paper --data ")
    fields = ["benchmark", "shape", "unit", "ours", "peer", "peer_value", "floor", "fraction_of_floor", "speedup"]
    rows = results["results"]
    assert all(list(r)[: len(fields) + 1] == [*fields, "max_err"] for r in rows)
    val = {r["shape"]: r for r in rows if r["benchmark"] == "val_loss"}
    assert list(val) == list(KINDS)
    reference = val["blackmamba"]["ours"]
    assert val["blackmamba"]["peer"] is None
    for kind in ("mamba", "transformer", "transformer-moe"):
        row = val[kind]
        assert row["ours"] == results["models"][kind]["val_loss"]
        assert row["peer"] == "blackmamba" and row["peer_value"] == reference
        assert row["speedup"] == pytest.approx(reference / row["ours"])  # lower is better: > 1 beats BlackMamba
    latency = [r for r in rows if r["benchmark"] == "generate_latency" and r["shape"] == "transformer/9 tokens"]
    assert latency[0]["speedup"] == pytest.approx(latency[0]["peer_value"] / latency[0]["ours"])
    for name in ("val_loss_vs_flops.png", "latency.png", "expert_load.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_rerun_skips_finished_models(experiment, data_dir, monkeypatch):
    out, results = experiment
    records = {p: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    monkeypatch.setattr(trainer, "train", lambda *a: pytest.fail("a finished model was trained again"))
    again = run_paper(args(data_dir, out))
    assert again["models"] == json.loads(json.dumps(results["models"]))
    assert {p: p.stat().st_mtime_ns for p in (out / "models").iterdir()} == records


def test_an_interrupted_model_resumes_with_the_losses_of_an_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    one = dict(kinds=("transformer",), budget_flops=1.6e8)
    whole = run_paper(args(data_dir, tmp_path / "whole", **one))["models"]["transformer"]
    assert whole["steps"] == 7
    real_evaluate, calls = trainer.evaluate, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the final evaluation: after the checkpoint of step 4, before the one of step 7
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(trainer, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_paper(args(data_dir, tmp_path / "cut", **one))
    assert not (tmp_path / "cut" / "models" / "transformer.json").exists()
    assert os.listdir(tmp_path / "cut" / "runs" / "transformer" / "checkpoints") == ["step-00000004"]
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    resumed = run_paper(args(data_dir, tmp_path / "cut", **one))["models"]["transformer"]
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    assert [p["val_loss"] for p in resumed["curve"]] == pytest.approx([p["val_loss"] for p in whole["curve"]])


def test_zero_shot_suite_for_one_model(data_dir, tmp_path):
    pytest.importorskip("lm_eval")
    record = run_paper(args(data_dir, tmp_path / "zs", kinds=("mamba",), limit=2))["models"]["mamba"]
    assert record["notes"] == []
    assert set(record["zero_shot"]) == {"arc_easy"} and 0 <= record["zero_shot"]["arc_easy"] <= 1


def test_other_plans_and_foreign_folders_are_refused(data_dir, tmp_path):
    out = tmp_path / "exp"
    run_paper(args(data_dir, out, kinds=("mamba",), budget_flops=2.5e7))
    for change, field in [(dict(budget_flops=4e7), "budget_flops"), (dict(seed=1), "seed"), ({}, "kinds")]:
        kinds = ("mamba",) if change else ("mamba", "transformer")
        with pytest.raises(ExperimentError, match=f"another '{field}'"):
            run_paper(args(data_dir, out, **{"kinds": kinds, "budget_flops": 2.5e7, **change}))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(ExperimentError, match="holds no experiment"):
        run_paper(args(data_dir, foreign))
    assert os.listdir(foreign) == ["mine.txt"]
    with pytest.raises(ExperimentError, match="is a file"):
        run_paper(args(data_dir, foreign / "mine.txt"))


def test_bad_options_are_one_error_line(data_dir, tmp_path):
    common = ("experiment", "paper", "--data", data_dir, "--out", tmp_path / "out", "--preset", "cpu-mini")
    assert_refused(tmp_path, *common, "--budget-flops", "1e6", fragments=("below one training step",))
    assert_refused(tmp_path, *common, "--kinds", "blackmamba,rnn", fragments=("--kinds",))
    assert_refused(tmp_path, *common, "--limit", "-1", fragments=("--limit",))
    assert_refused(tmp_path, *common, "--budget-flops", "nan", fragments=("--budget-flops",))
    assert_refused(tmp_path, *common[:3], tmp_path / "missing", fragments=("missing",))
    with pytest.raises(SystemExit) as exit_info:
        run_cli("experiment", "paper", "--data", data_dir, "--preset", "huge")
    assert exit_info.value.code == 2
    with pytest.raises(ExperimentError, match="--seed"):
        PaperArgs(data=str(data_dir), seed=-1)
