"""Fault injection at every filesystem step of the trainer's writers (hostile suite: ``pytest -m hostile``).

For each step k of a checkpoint save, of a metrics append and of the metrics rewrite at resume, the step
fails with ENOSPC (in process) or the trainer dies there (a child process ended with ``os._exit``, as by
``kill -9``). Afterwards every visible checkpoint loads, the error (if any) names what failed and the last
good checkpoint, and ``--resume`` finishes the run with exactly the losses of an uninterrupted one.
The fast suite keeps one representative of each kind (tests/test_training.py, tests/training/test_run_folder.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blackmamba import load_pretrained
from blackmamba.training.rundir import STATE_FILE, checkpoints, load_state
from blackmamba.training.trainer import TrainingError, train

from .faults import KILLED, Injector, patched
from .helpers import losses, metric_rows, tiny_args

pytestmark = pytest.mark.hostile

REPO = Path(__file__).resolve().parents[2]
# Checkpoints at steps 4 and 8, keep_last 1: the save at step 8 also deletes step 4.
ARGS = dict(max_steps=8, save_every=4, keep_last=1, eval_every=100)


def kwargs(data_dir, run, **extra):
    return {**tiny_args(data_dir, run, **ARGS).__dict__, **extra}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_args(data_dir, run, **ARGS))
    return losses(run)


def count_steps(data_dir, root: Path, target: str, step: int) -> list[str]:
    probe = Injector()
    with patched(probe, target, step):
        train(tiny_args(data_dir, root / f"probe-{target}", **ARGS))
    assert probe.calls, f"no filesystem step seen in {target}"
    return probe.calls


@pytest.fixture(scope="module")
def save_steps(data_dir, tmp_path_factory):
    return count_steps(data_dir, tmp_path_factory.mktemp("probe"), "save", 8)


@pytest.fixture(scope="module")
def metrics_steps(data_dir, tmp_path_factory):
    return count_steps(data_dir, tmp_path_factory.mktemp("probe"), "metrics", 6)


def assert_usable_and_resumable(run: Path, data_dir, reference) -> None:
    """Every visible checkpoint loads with its trainer state; --resume (when unfinished) ends like the
    uninterrupted run, and the metrics hold each step once."""
    found = checkpoints(run)
    for ckpt in found:
        load_pretrained(ckpt)
        load_state(ckpt / STATE_FILE)
    if not found or load_state(found[-1] / STATE_FILE)["step"] < ARGS["max_steps"]:
        assert found, "no checkpoint left to resume from"
        train(tiny_args(data_dir, run, **ARGS, resume=True))
    assert losses(run) == reference
    steps = [r["step"] for r in metric_rows(run) if "loss" in r]
    assert steps == sorted(set(steps))


def run_raising(data_dir, run: Path, target: str, step: int, k: int) -> None:
    with patched(Injector(k), target, step):
        try:
            train(tiny_args(data_dir, run, **ARGS))
        except TrainingError as e:
            assert "No space left on device" in str(e), e
            assert "last good checkpoint is" in str(e) and "step-00000004" in str(e), e


def run_killed(data_dir, run: Path, target: str, step: int, k: int) -> None:
    spec = {"args": kwargs(data_dir, run), "target": target, "step": step, "fail_at": k}
    code = "from tests.training.faults import child_main; child_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=REPO, timeout=600)
    assert proc.returncode in (KILLED, 0)


def test_save_has_the_expected_steps(save_steps):
    for name in ("torch.save", "os.replace", "os.fsync", "shutil.rmtree"):
        assert name in save_steps, save_steps


@pytest.mark.parametrize("k", range(64))
def test_full_disk_at_each_step_of_a_checkpoint_save(data_dir, tmp_path, save_steps, reference, k):
    if k >= len(save_steps):
        pytest.skip(f"the save has {len(save_steps)} steps")
    run_raising(data_dir, tmp_path / "run", "save", 8, k)
    assert_usable_and_resumable(tmp_path / "run", data_dir, reference)


@pytest.mark.parametrize("k", range(64))
def test_kill_at_each_step_of_a_checkpoint_save(data_dir, tmp_path, save_steps, reference, k):
    if k >= len(save_steps):
        pytest.skip(f"the save has {len(save_steps)} steps")
    run_killed(data_dir, tmp_path / "run", "save", 8, k)
    assert_usable_and_resumable(tmp_path / "run", data_dir, reference)


@pytest.mark.parametrize("k", range(4))
def test_full_disk_and_kill_at_each_step_of_a_metrics_write(data_dir, tmp_path, metrics_steps, reference, k):
    if k >= len(metrics_steps):
        pytest.skip(f"a metrics write has {len(metrics_steps)} steps")
    run_raising(data_dir, tmp_path / "raised", "metrics", 6, k)
    assert_usable_and_resumable(tmp_path / "raised", data_dir, reference)
    run_killed(data_dir, tmp_path / "killed", "metrics", 6, k)
    assert_usable_and_resumable(tmp_path / "killed", data_dir, reference)


@pytest.mark.parametrize("action", ["raise", "exit"])
def test_a_metrics_line_cut_in_half(data_dir, tmp_path, reference, action, capsys):
    """The disk fills (or the trainer dies) in the middle of a metrics line: --resume drops the torn line
    with a warning naming the file and ends like the uninterrupted run."""
    run = tmp_path / "run"
    if action == "raise":
        run_raising(data_dir, run, "metrics-torn", 6, 0)
    else:
        run_killed(data_dir, run, "metrics-torn", 6, 0)
    assert not (run / "metrics.jsonl").read_text().endswith("\n")
    capsys.readouterr()
    assert_usable_and_resumable(run, data_dir, reference)
    assert f"{run / 'metrics.jsonl'}: dropping a half-written last line" in capsys.readouterr().err


@pytest.mark.parametrize("k", range(6))
def test_full_disk_while_resume_rewrites_the_metrics(data_dir, tmp_path, save_steps, reference, k):
    """The rewrite of metrics.jsonl at resume fails at step k: the file is as before and a second resume
    works."""
    run = tmp_path / "run"
    with patched(Injector(save_steps.index("torch.save")), "save", 8):
        with pytest.raises(TrainingError):
            train(tiny_args(data_dir, run, **ARGS))
    before = (run / "metrics.jsonl").read_bytes()
    injector = Injector(k)
    with patched(injector, "resume", 0):
        try:
            train(tiny_args(data_dir, run, **ARGS, resume=True))
        except TrainingError:
            pass
        except OSError as e:
            pytest.fail(f"raw OSError escaped the trainer: {e}")
    if not injector.fired:
        pytest.skip(f"the rewrite has {len(injector.calls)} steps")
    if len(checkpoints(run)) and load_state(checkpoints(run)[-1] / STATE_FILE)["step"] < 8:
        assert (run / "metrics.jsonl").read_bytes() == before
    assert_usable_and_resumable(run, data_dir, reference)
