"""Bad training options: each gives one TrainingError naming the option (from the Python API and the CLI), before
anything is read or written."""

from __future__ import annotations

import math

import pytest

from blackmamba.cli import main
from blackmamba.training.trainer import TrainArgs, TrainingError, train

from .helpers import tiny_args

BAD = [
    ({"grad_accum": 0}, "--grad-accum"),
    ({"warmup": -5}, "--warmup"),
    ({"max_steps": -3}, "--max-steps"),
    ({"max_steps": 0}, "--max-steps"),
    ({"save_every": 0}, "--save-every"),
    ({"log_every": 0}, "--log-every"),
    ({"eval_every": 0}, "--eval-every"),
    ({"eval_tokens": 0}, "--eval-tokens"),
    ({"seq_len": 0}, "--seq-len"),
    ({"batch_size": 0}, "--batch-size"),
    ({"keep_last": 0}, "--keep-last"),
    ({"keep_last": -1}, "--keep-last"),
    ({"seed": -1}, "--seed"),
    ({"lr": -1e-3}, "--lr"),
    ({"lr": 0.0}, "--lr"),
    ({"lr": math.nan}, "--lr"),
    ({"min_lr": -1.0}, "--min-lr"),
    ({"min_lr": 1.0}, "--min-lr"),
    ({"weight_decay": -0.1}, "--weight-decay"),
    ({"clip": math.inf}, "--clip"),
    ({"max_minutes": 0.0}, "--max-minutes"),
    ({"max_minutes": -1.0}, "--max-minutes"),
    ({"peak_tflops": 0.0}, "--peak-tflops"),
    ({"progress_every": -1.0}, "--progress-every"),
    ({"batch_size": 2.5}, "--batch-size"),
    ({"batch_size": True}, "--batch-size"),
    ({"lr": "fast"}, "--lr"),
    ({"dtype": "float16"}, "--dtype"),
    ({"resume": True, "overwrite": True}, "--overwrite"),
    ({"init_from": "somewhere"}, "--init-from"),
    ({"max_steps": None}, "--max-steps or --max-minutes"),
]


@pytest.mark.parametrize("change,flag", BAD, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in BAD])
def test_bad_option_is_refused_naming_it(tmp_path, change, flag):
    with pytest.raises(TrainingError, match=flag.replace("+", r"\+")):
        tiny_args(tmp_path / "data", tmp_path / "run", **change)
    assert not (tmp_path / "run").exists()


def test_validate_catches_a_field_changed_after_construction(tmp_path):
    args = tiny_args(tmp_path / "data", tmp_path / "run")
    args.grad_accum = 0
    with pytest.raises(TrainingError, match="--grad-accum must be at least 1, got 0"):
        train(args)
    assert not (tmp_path / "run").exists()


def test_defaults_are_valid_and_min_lr_follows_lr(tmp_path):
    args = TrainArgs(data="d", out="o", preset="tiny", max_steps=10, lr=1e-4)
    assert args.final_lr == pytest.approx(1e-5)
    assert TrainArgs(data="d", out="o", preset="tiny", max_minutes=1.0, min_lr=0.0).final_lr == 0.0


@pytest.mark.parametrize(
    "option,value",
    [
        ("--grad-accum", "0"),
        ("--warmup", "-5"),
        ("--max-steps", "-3"),
        ("--save-every", "0"),
        ("--log-every", "0"),
        ("--eval-every", "0"),
        ("--seq-len", "0"),
        ("--keep-last", "0"),
        ("--lr", "-1"),
        ("--lr", "nan"),
    ],
)
def test_cli_prints_one_error_line(tmp_path, capsys, option, value):
    argv = ["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    assert main([*argv, "--max-steps", "5", option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and option in err[0]
    assert not (tmp_path / "run").exists()
