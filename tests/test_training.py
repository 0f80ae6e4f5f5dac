"""Training: data preparation, the loop, exact resume, crash safety, non-finite stops, fine-tuning.

The trainer's safety rules (run folder, trainer state, resume checks, bad options, faults) are tested in
tests/training/.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, load_pretrained, save_released
from blackmamba.training.data import DataError, TokenData, prepare, token_dtype
from blackmamba.training.flops import active_params, comparison, flops_per_token
from blackmamba.training.trainer import TrainingError, train

from .training.faults import KILLED
from .training.helpers import checkpoint_names, losses, metric_rows, prepare_tiny_data, tiny_args, write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


def test_prepare_is_deterministic_and_splits_by_document(tmp_path):
    text = write_corpus(tmp_path / "text")
    a = prepare([str(text)], tmp_path / "a", tokenizer="bpe:300", val_fraction=0.25)
    b = prepare([str(text)], tmp_path / "b", tokenizer="bpe:300", val_fraction=0.25)
    assert a == b
    for split in ("train", "val"):
        for shard in a["splits"][split]["shards"]:
            assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    train_docs, val_docs = set(a["splits"]["train"]["documents"]), set(a["splits"]["val"]["documents"])
    assert train_docs and val_docs and not train_docs & val_docs
    assert len(train_docs | val_docs) == 12
    assert a["dtype"] == "uint16"
    data = TokenData(tmp_path / "a", "train")
    assert len(data) == a["splits"]["train"]["tokens"]
    x, y = data.batch(data.window_starts(0, 3, 2, 16), 16)
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_prepare_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="unknown source"):
        prepare(["no-such-corpus"], tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt"):
        prepare([str(empty)], tmp_path / "o")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(DataError, match="bad.txt is not valid UTF-8"):
        prepare([str(bad)], tmp_path / "o", tokenizer="bpe:300")
    with pytest.raises(DataError, match="does not fit in uint16"):
        token_dtype(70000, "uint16")
    assert token_dtype(70000).name == "uint32"
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"text": "hello"}\n{"no_text": 1}\n')
    with pytest.raises(DataError, match="d.jsonl line 2"):
        prepare([str(lines)], tmp_path / "o")


def test_loss_decreases_and_metrics_are_written(data_dir, tmp_path):
    summary = train(tiny_args(data_dir, tmp_path / "run", max_steps=30, eval_every=30, save_every=100))
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert summary["val_loss"] < rows[0]["loss"] - 0.5
    assert 0 < summary["unigram_val_loss"] < np.log(300)
    assert {"step", "loss", "lr", "tokens_per_s", "expert_load", "sinkhorn_iters"} <= set(rows[0])
    assert len(rows[0]["expert_load"]) == 2 and abs(sum(rows[0]["expert_load"][0]) - 1) < 1e-6
    model = load_pretrained(summary["checkpoint"])
    assert model.config.vocab_size >= 300


def test_resume_gives_the_same_loss_curve(data_dir, tmp_path):
    train(tiny_args(data_dir, tmp_path / "full"))
    train(tiny_args(data_dir, tmp_path / "cut", max_steps=12, save_every=6))
    # Simulate an interruption after step 6: keep only the step-6 checkpoint, then resume.
    ckpts = sorted((tmp_path / "cut" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000006", "step-00000012"]
    import shutil

    shutil.rmtree(ckpts[-1])
    train(tiny_args(data_dir, tmp_path / "cut", resume=True))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_kill_during_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    """A trainer killed (os._exit, as by kill -9) while writing its trainer state leaves the previous
    checkpoint complete and no trace of the interrupted one; --resume then finishes the run."""
    run = tmp_path / "run"
    spec = {"args": vars(tiny_args(data_dir, run)), "target": "save", "step": 12, "fail_on": "torch.save"}
    code = "from tests.training.faults import child_main; child_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=REPO, timeout=300)
    assert proc.returncode == KILLED
    assert checkpoint_names(run) == ["step-00000006"]  # the interrupted write never appears
    assert len(checkpoint_names(run, hidden=True)) == 2  # its temporary folder is left behind
    load_pretrained(run / "checkpoints" / "step-00000006")
    train(tiny_args(data_dir, run, resume=True))
    assert checkpoint_names(run, hidden=True) == ["step-00000006", "step-00000012"]  # the leftover was cleaned
    train(tiny_args(data_dir, tmp_path / "uninterrupted"))
    assert losses(run) == losses(tmp_path / "uninterrupted")


def test_resume_rejects_a_corrupt_checkpoint(data_dir, tmp_path):
    train(tiny_args(data_dir, tmp_path / "run", max_steps=6))
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(Exception, match="truncated or corrupt"):
        train(tiny_args(data_dir, tmp_path / "run", resume=True))


def test_non_finite_loss_stops_and_the_last_good_checkpoint_resumes(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(data_dir, run, max_steps=6, save_every=6))
    before = checkpoint_names(run)
    with pytest.raises(TrainingError, match="non-finite") as info:
        train(tiny_args(data_dir, run, resume=True, max_steps=30, lr=1e30, min_lr=0.0, warmup=0, clip=0))
    assert f"the last good checkpoint is {run / 'checkpoints' / before[-1]}" in str(info.value)
    assert checkpoint_names(run) == before
    load_pretrained(run / "checkpoints" / before[-1])
    # The checkpoint named "good" really is: the run continues from it with a sane learning rate.
    summary = train(tiny_args(data_dir, run, resume=True, max_steps=12))
    assert summary["step"] == 12 and np.isfinite(summary["val_loss"])


def test_init_from_a_released_layout_checkpoint(data_dir, tmp_path):
    from tokenizers import Tokenizer

    config = BlackMambaConfig.from_preset("tiny", vocab_size=320, n_experts=8)
    torch.manual_seed(0)
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    save_released(BlackMamba(config), tmp_path / "released", tokenizer=tokenizer)
    summary = train(
        tiny_args(data_dir, tmp_path / "ft", preset=None, init_from=str(tmp_path / "released"), max_steps=4)
    )
    assert load_pretrained(summary["checkpoint"]).config.n_experts == 8


def test_flops_counts():
    config = BlackMambaConfig.from_preset("blackmamba-2.8b")
    assert active_params(config, embedding=True) == 628_770_832
    fpt = flops_per_token(config)
    assert 2 * 628_770_832 * 0.95 < fpt["forward"] < 2 * 628_770_832 * 1.05
    assert fpt["train"] == 3 * fpt["forward"]
    rows = comparison(config, seq_len=2048)
    assert rows[2]["forward"] > rows[0]["forward"]  # attention costs extra at L = 2048


def test_time_budget_fits_the_schedule(data_dir, tmp_path):
    summary = train(tiny_args(data_dir, tmp_path / "run", max_steps=None, max_minutes=0.05, save_every=10**6))
    assert 1 <= summary["step"] <= summary["max_steps"]
    rows = [r for r in metric_rows(tmp_path / "run") if "lr" in r]
    assert rows and all(r["lr"] > 0 for r in rows)
    with pytest.raises(TrainingError, match="max-steps or --max-minutes"):
        train(tiny_args(data_dir, tmp_path / "run2", max_steps=None))
