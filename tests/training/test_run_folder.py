"""The run folder: an existing run is never trained over by accident, a folder that is not a run is never
touched, one trainer at a time, bad --out paths, old checkpoints dropped whole, NaN never saved, full disks
leave a resumable run, modes follow the umask."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import time

import pytest
import torch

from blackmamba import load_pretrained
from blackmamba.training import rundir
from blackmamba.training.rundir import LOCK_FILE
from blackmamba.training.trainer import TrainingError, train

from .faults import Injector, patched
from .helpers import checkpoint_names, losses, tiny_args


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The losses of an uninterrupted 12-step run (checkpoints at 6 and 12)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_args(data_dir, run))
    return losses(run)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != LOCK_FILE}


def test_existing_run_needs_resume_or_overwrite(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(data_dir, run, max_steps=6))
    before = snapshot(run)
    with pytest.raises(TrainingError, match="already holds a training run.*--resume.*--overwrite"):
        train(tiny_args(data_dir, run, max_steps=4, seed=1))
    assert snapshot(run) == before
    # --overwrite starts afresh: nothing of the old run is left to mix with the new one.
    train(tiny_args(data_dir, run, max_steps=4, seed=1, save_every=2, overwrite=True))
    assert checkpoint_names(run) == ["step-00000002", "step-00000004"]
    train(tiny_args(data_dir, tmp_path / "fresh", max_steps=4, seed=1, save_every=2))
    assert losses(run) == losses(tmp_path / "fresh")
    assert not [p for p in run.iterdir() if p.name.startswith(".old-")]


def test_an_empty_folder_is_fine_and_a_foreign_one_is_never_touched(data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    train(tiny_args(data_dir, tmp_path / "empty", max_steps=2))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "checkpoints").mkdir()
    for overwrite in (False, True):
        with pytest.raises(TrainingError, match="not a training run .*notes.txt"):
            train(tiny_args(data_dir, mine, overwrite=overwrite))
    assert sorted(os.listdir(mine)) == ["checkpoints", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_out_that_is_a_file_or_lies_under_one(data_dir, tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(TrainingError, match=r"--out .*file is a file, not a folder"):
        train(tiny_args(data_dir, file))
    with pytest.raises(TrainingError, match="is a file, so no folder can be made under it"):
        train(tiny_args(data_dir, file / "run"))
    assert file.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_out(data_dir, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(TrainingError, match="no permission to write"):
            train(tiny_args(data_dir, parent / "run"))
    finally:
        parent.chmod(0o755)


def test_unwritable_out_is_a_clear_error(data_dir, tmp_path, monkeypatch):
    """What a read-only folder or file system gives when the lock file is created (works as root too)."""
    real_open = os.open

    def refuse(path, *args, **kwargs):
        if str(path).endswith(LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(TrainingError, match="cannot write there .*Read-only file system"):
        train(tiny_args(data_dir, tmp_path / "run"))


def test_a_second_trainer_on_the_same_folder_fails_at_once(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        t0 = time.monotonic()
        with pytest.raises(TrainingError, match=r"another trainer \(process 4242\) is using"):
            train(tiny_args(data_dir, run))
        assert time.monotonic() - t0 < 60
        assert sorted(os.listdir(run)) == [LOCK_FILE]
    finally:
        os.close(fd)
    train(tiny_args(data_dir, run, max_steps=2))  # free again once the first one lets go
    assert checkpoint_names(run) == ["step-00000002"]


def test_keep_last_keeps_whole_checkpoints(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(data_dir, run, max_steps=9, save_every=3, keep_last=1))
    assert checkpoint_names(run, hidden=True) == ["step-00000009"]
    load_pretrained(run / "checkpoints" / "step-00000009")


def test_stale_temporaries_are_cleaned_under_the_lock(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(data_dir, run, max_steps=6, save_every=3))
    (run / "checkpoints" / ".step-00000099.tmp-x").mkdir()
    (run / "checkpoints" / ".deleting-step-00000001").mkdir()
    (run / ".old-1-abcd").mkdir()
    train(tiny_args(data_dir, run, max_steps=8, save_every=3, resume=True))
    assert checkpoint_names(run, hidden=True) == ["step-00000006", "step-00000008"]
    assert not [p for p in run.iterdir() if p.name.startswith(".old-")]


def test_checkpoints_and_outputs_follow_the_umask(data_dir, tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    old = os.umask(0o027)
    try:
        train(tiny_args(data_dir, run, max_steps=2, save_every=2, plots=True))
    finally:
        os.umask(old)
    ckpt = run / "checkpoints" / "step-00000002"
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o750
    files = [*ckpt.iterdir(), run / "metrics.jsonl", run / "summary.json", *(run / "plots").iterdir()]
    assert len(files) > 6
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def test_a_nan_update_is_caught_before_it_is_saved(data_dir, tmp_path, monkeypatch, reference):
    run = tmp_path / "run"
    step, calls = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 12:  # the update of step 12, which is then due to be saved
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(TrainingError, match="NaN or inf after step 12.*was not saved") as info:
        train(tiny_args(data_dir, run))
    monkeypatch.undo()
    good = run / "checkpoints" / "step-00000006"
    assert f"the last good checkpoint is {good}" in str(info.value)
    assert checkpoint_names(run) == ["step-00000006"]
    train(tiny_args(data_dir, run, resume=True))
    assert losses(run) == reference


def test_full_disk_while_saving_a_checkpoint(data_dir, tmp_path, reference):
    run = tmp_path / "run"
    with patched(Injector(fail_on="torch.save"), "save", 12):
        with pytest.raises(TrainingError, match="cannot write checkpoint .*step-00000012: .*No space left") as info:
            train(tiny_args(data_dir, run))
    assert "the last good checkpoint is" in str(info.value) and "step-00000006" in str(info.value)
    assert checkpoint_names(run, hidden=True) == ["step-00000006"]
    train(tiny_args(data_dir, run, resume=True))
    assert losses(run) == reference


def test_full_disk_mid_metrics_line_is_tolerated_on_resume(data_dir, tmp_path, monkeypatch, capsys, reference):
    run = tmp_path / "run"
    write = rundir.MetricsLog.write

    def torn(self, row):
        if row["step"] == 9 and "loss" in row:
            line = json.dumps(row)
            with open(self.path, "a") as f:
                f.write(line[: len(line) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, row)

    monkeypatch.setattr(rundir.MetricsLog, "write", torn)
    with pytest.raises(TrainingError, match=r"cannot write .*metrics.jsonl: No space left.*step-00000006"):
        train(tiny_args(data_dir, run))
    monkeypatch.undo()
    assert not (run / "metrics.jsonl").read_text().endswith("\n")
    capsys.readouterr()
    train(tiny_args(data_dir, run, resume=True))
    assert "metrics.jsonl: dropping a half-written last line" in capsys.readouterr().err
    assert losses(run) == reference


def test_a_bad_metrics_line_inside_the_file_names_it(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(data_dir, run, max_steps=6))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = "not json"
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingError, match=r"metrics.jsonl, line 3: not valid JSON"):
        train(tiny_args(data_dir, run, resume=True))


def test_resume_of_a_folder_without_checkpoints(data_dir, tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        train(tiny_args(data_dir, tmp_path / "none", resume=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="no checkpoint found"):
        train(tiny_args(data_dir, tmp_path / "empty", resume=True))
    shutil.rmtree(tmp_path / "empty")
