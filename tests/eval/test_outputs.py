"""Output paths of eval and demo: refused before any work, with nothing written; reports written whole."""

from __future__ import annotations

import os

import pytest

from blackmamba.eval import outputs
from blackmamba.eval.outputs import OutputPathError, check_output_dir, check_output_file, write_text_atomic

ROOT = os.geteuid() == 0


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_file_outputs(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    before = listing(tmp_path)
    assert check_output_file(tmp_path / "new" / "deeper" / "r.json", "--out") == tmp_path / "new" / "deeper" / "r.json"
    assert check_output_file(tmp_path / "a_file", "--out") == tmp_path / "a_file"  # an existing report: replaced
    with pytest.raises(OutputPathError, match="--out .*a_dir is a folder"):
        check_output_file(tmp_path / "a_dir", "--out")
    with pytest.raises(OutputPathError, match="--plot .*a_file is a file, so nothing can be written under it"):
        check_output_file(tmp_path / "a_file" / "sub" / "x.png", "--plot")
    with pytest.raises(OutputPathError, match="must be a path"):
        check_output_file("", "--out")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="symlink to nothing"):
        check_output_file(tmp_path / "dangling", "--out")
    assert listing(tmp_path) == sorted([*before, "dangling"])  # nothing created by the checks


def test_dir_outputs(tmp_path):
    (tmp_path / "a_file").write_text("x")
    demo = tmp_path / "demo"
    (demo / "run").mkdir(parents=True)
    (demo / ".data.tmp-123").mkdir()  # an interrupted writer's temporary
    allowed = frozenset({"data", "run"})
    assert check_output_dir(demo, "--out", allowed) == demo
    assert check_output_dir(tmp_path / "new" / "demo", "--out", allowed) == tmp_path / "new" / "demo"
    with pytest.raises(OutputPathError, match="--out .*a_file is a file, not a folder"):
        check_output_dir(tmp_path / "a_file", "--out")
    with pytest.raises(OutputPathError, match="a_file is a file, so nothing can be written under it"):
        check_output_dir(tmp_path / "a_file" / "demo", "--out")
    with pytest.raises(OutputPathError, match=r"already holds files this command did not write \(a_file, demo\)"):
        check_output_dir(tmp_path, "--out", allowed)
    assert not (tmp_path / "new").exists()


def test_read_only_places_are_refused(tmp_path, monkeypatch):
    (tmp_path / "report.json").write_text("{}")
    read_only = {str(tmp_path), str(tmp_path / "report.json")}
    real_access = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: str(p) not in read_only and real_access(p, mode))
    with pytest.raises(OutputPathError, match="is read-only"):
        check_output_file(tmp_path / "new.json", "--out")
    with pytest.raises(OutputPathError, match="is read-only"):
        check_output_file(tmp_path / "sub" / "new.json", "--out")
    with pytest.raises(OutputPathError, match="is read-only"):
        check_output_dir(tmp_path, "--out")


@pytest.mark.skipif(ROOT, reason="root may write anywhere")
def test_read_only_folder_for_real(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="read-only"):
            check_output_file(locked / "r.json", "--out")
        with pytest.raises(OutputPathError, match="read-only"):
            check_output_dir(locked / "demo", "--out")
    finally:
        locked.chmod(0o700)


def test_write_text_atomic_replaces_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "r.json"
    write_text_atomic(target, "old\n")
    assert target.read_text() == "old\n"
    monkeypatch.setattr(outputs.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(target, "new\n")
    assert target.read_text() == "old\n"  # the failed write left the previous report intact
    assert listing(tmp_path) == ["deep", "deep/r.json"]
    monkeypatch.undo()
    old = os.umask(0o027)
    try:
        write_text_atomic(target, "new\n")
    finally:
        os.umask(old)
    assert target.read_text() == "new\n" and (target.stat().st_mode & 0o777) == 0o640
