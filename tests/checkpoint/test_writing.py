"""Writing checkpoints without losing data: `convert` and `save_pretrained` refuse destinations that are not
theirs (a file, a folder holding other things, the source or a folder holding it, the current folder),
replace a checkpoint in one atomic step (RENAME_EXCHANGE, or two renames where that is missing), clean up
after killed saves, honour the umask, and shard through huggingface_hub with our names and index."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

import blackmamba.checkpoint as ckpt
from blackmamba import CheckpointError, convert, load_pretrained, save_pretrained, save_released

from .common import assert_refused, make_ours, make_released, run_cli, state_equal, tiny, tree


def loads_as(path: Path, model) -> bool:
    loaded = load_pretrained(path)
    return loaded.config == model.config and state_equal(loaded.state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------------ destinations


def test_convert_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    src = make_released(tmp_path / "rel")
    dst = tmp_path / "photos"
    dst.mkdir()
    (dst / "holiday.jpg").write_bytes(b"\xff\xd8 not really")
    assert_refused(tmp_path, "convert", src, dst, fragments=(str(dst), "holiday.jpg", "--overwrite"))
    code, out, err = run_cli("convert", src, dst, "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(dst)) == ["config.json", "model.safetensors"]
    assert loads_as(dst, load_pretrained(src))


def test_convert_replaces_a_checkpoint_without_asking(tmp_path):
    src = make_released(tmp_path / "rel", seed=3)
    dst = make_ours(tmp_path / "ours", seed=4)
    code, _, err = run_cli("convert", src, dst)
    assert code == 0, err
    assert loads_as(dst, load_pretrained(src))


def test_a_file_as_destination_is_refused_even_with_overwrite(tmp_path):
    src = make_ours(tmp_path / "ours")
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    assert_refused(tmp_path, "convert", src, file, fragments=("is a file",))
    assert_refused(tmp_path, "convert", src, file, "--overwrite", fragments=("is a file",))
    assert_refused(tmp_path, "convert", src, file / "sub", fragments=("is a file",))
    with pytest.raises(CheckpointError, match="is a file"):
        save_pretrained(tiny(), file, overwrite=True)
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_convert_never_deletes_the_source_or_a_folder_holding_it(tmp_path, monkeypatch, overwrite):
    src = make_released(tmp_path / "models" / "rel")
    monkeypatch.chdir(tmp_path)
    assert_refused(tmp_path, "convert", src, src, *overwrite, fragments=("same directory",))
    assert_refused(tmp_path, "convert", "models/rel", "models/./rel/", *overwrite, fragments=("same directory",))
    assert_refused(tmp_path, "convert", src, tmp_path / "models", *overwrite, fragments=("holds the source",))
    assert_refused(tmp_path, "convert", "models/rel", "models", *overwrite, fragments=("holds the source",))
    assert_refused(tmp_path, "convert", src, tmp_path, *overwrite, fragments=("holds the source",))
    assert_refused(tmp_path, "convert", src, src / "inner", *overwrite, fragments=("inside the source",))
    link = tmp_path / "link"
    os.symlink(tmp_path / "models", link)
    assert_refused(tmp_path, "convert", src, link, *overwrite, fragments=("holds the source",))


def test_the_current_folder_is_never_replaced(tmp_path, monkeypatch):
    src = make_ours(tmp_path / "ours")
    work = tmp_path / "work"
    (work / "deep").mkdir(parents=True)
    monkeypatch.chdir(work / "deep")
    for dst in (work / "deep", work):
        assert_refused(tmp_path, "convert", src, dst, "--overwrite", fragments=("current directory",))


def test_symlinked_destination_is_refused(tmp_path):
    real = make_ours(tmp_path / "real", seed=0)
    os.symlink(real, tmp_path / "latest")
    with pytest.raises(CheckpointError, match="symbolic link"):
        save_pretrained(tiny(seed=1), tmp_path / "latest")
    assert loads_as(real, tiny(seed=0))


def test_save_into_an_empty_folder_and_over_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    save_pretrained(tiny(seed=0), tmp_path / "empty")
    assert loads_as(tmp_path / "empty", tiny(seed=0))
    save_released(tiny(seed=1), tmp_path / "empty")
    assert loads_as(tmp_path / "empty", tiny(seed=1))


def test_a_checkpoint_with_a_subfolder_is_not_replaced_without_overwrite(tmp_path):
    path = make_ours(tmp_path / "ckpt")
    (path / "src").mkdir()
    (path / "src" / "train.py").write_text("print('mine')\n")
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(it holds src\)"):
        save_pretrained(tiny(seed=1), path)
    assert (path / "src" / "train.py").is_file()


def test_a_trainer_step_folder_counts_as_a_checkpoint(tmp_path):
    path = make_ours(tmp_path / "step-00000010")
    torch.save({"step": 10}, path / "trainer_state.pt")
    (path / "tokenizer.json").write_text("{}")
    assert ckpt.is_checkpoint_folder(path)
    save_pretrained(tiny(seed=2), path)
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]


def test_a_destination_made_non_empty_during_the_save_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    real = ckpt._write_safetensors

    def write_and_meddle(state, folder, max_bytes):
        real(state, folder, max_bytes)
        (target / "diary.txt").write_text("written meanwhile")

    monkeypatch.setattr(ckpt, "_write_safetensors", write_and_meddle)
    with pytest.raises(CheckpointError, match="diary.txt"):
        save_pretrained(tiny(), target)
    assert os.listdir(target) == ["diary.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ------------------------------------------------------------------------------------------ atomic replacement


def test_replacement_swaps_the_folder_in_one_step(tmp_path, monkeypatch):
    path = make_ours(tmp_path / "ckpt", seed=0)
    inode = os.stat(path).st_ino
    calls = []
    real = ckpt.exchange
    monkeypatch.setattr(ckpt, "exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    save_pretrained(tiny(seed=1), path)
    assert len(calls) == 1 and calls[0][1] == path
    if os.stat(path).st_ino == inode:
        pytest.skip("this file system cannot exchange two folders (the fallback ran)")
    assert loads_as(path, tiny(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_fallback_without_exchange_replaces_and_cleans_up(tmp_path, monkeypatch):
    path = make_ours(tmp_path / "ckpt", seed=0)
    monkeypatch.setattr(ckpt, "exchange", lambda a, b: False)
    save_released(tiny(seed=1), path)
    assert loads_as(path, tiny(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_after_a_kill_between_the_fallback_renames_restores_then_replaces(tmp_path, monkeypatch):
    dead = 2**22 + 12345  # above the kernel's pid_max default: no live process has it
    assert not ckpt._alive(dead)
    host = ckpt._owner_tag().rsplit("-", 1)[0]
    old = make_ours(tmp_path / f".ckpt.old-{host}-{dead}-abcd", seed=0)
    stale_tmp = tmp_path / f".ckpt.tmp-{host}-{dead}-efgh"
    stale_tmp.mkdir()
    with pytest.raises(CheckpointError, match="interrupted save"):
        load_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(ckpt, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full (simulated)")))
    with pytest.raises(CheckpointError, match="disk full"):
        save_pretrained(tiny(seed=1), tmp_path / "ckpt")
    assert not old.exists() and not stale_tmp.exists()
    assert loads_as(tmp_path / "ckpt", tiny(seed=0))  # the failed save put the previous version back
    monkeypatch.undo()
    save_pretrained(tiny(seed=1), tmp_path / "ckpt")
    assert loads_as(tmp_path / "ckpt", tiny(seed=1))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_temporaries_of_live_saves_are_left_alone(tmp_path):
    host = ckpt._owner_tag().rsplit("-", 1)[0]
    live = tmp_path / f".ckpt.tmp-{host}-{os.getpid()}-live"
    live.mkdir()
    other_host = tmp_path / ".ckpt.tmp-elsewhere-1-x"
    other_host.mkdir()
    save_pretrained(tiny(), tmp_path / "ckpt")
    assert live.is_dir() and other_host.is_dir()


def test_write_errors_become_one_checkpoint_error_naming_the_target(tmp_path, monkeypatch):
    old = make_ours(tmp_path / "ckpt", seed=0)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {old}: .*PytorchStreamWriter"):
        save_released(tiny(seed=1), old)
    monkeypatch.undo()
    assert loads_as(old, tiny(seed=0))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_a_clear_error(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot write checkpoint"):
            save_pretrained(tiny(), parent / "ckpt")
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------------------------------ modes, sharding


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoints_honour_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_pretrained(tiny(), tmp_path / "ours", max_shard_bytes=40_000)
        save_released(tiny(), tmp_path / "rel")
        convert(tmp_path / "rel", tmp_path / "conv")
    finally:
        os.umask(previous)
    for folder in ("ours", "rel", "conv"):
        assert os.stat(tmp_path / folder).st_mode & 0o777 == 0o777 & ~umask, folder
        for f in (tmp_path / folder).iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_shards_keep_our_names_and_index_format(tmp_path):
    model = tiny()
    path = save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=30_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", "model.safetensors.index.json", *shards])
    sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    assert index["metadata"] == {"total_size": sum(sizes.values())}
    # The embedding (32 KiB) is larger than a shard may be: it gets a shard of its own.
    assert sizes["embedding.weight"] > 30_000
    alone = index["weight_map"]["embedding.weight"]
    assert [k for k, v in index["weight_map"].items() if v == alone] == ["embedding.weight"]
    assert loads_as(path, model)


def test_shard_size_must_be_positive(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(CheckpointError, match="max_shard_bytes"):
            save_pretrained(tiny(), tmp_path / "x", max_shard_bytes=bad)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ readers during writes


@pytest.mark.hostile
def test_readers_never_mix_two_versions(tmp_path):
    """A thread saves two different models over one folder in turn while this thread loads it: every load
    gives one model whole (config and weights of the same version)."""
    a, b = tiny(seed=0), tiny(seed=1, d_model=16)
    path = save_pretrained(a, tmp_path / "ckpt")
    stop = threading.Event()
    saves = []

    def writer():
        while not stop.is_set():
            for model in (b, a):
                save_pretrained(model, path)
                saves.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        for _ in range(60):
            loaded = load_pretrained(path)
            version = a if loaded.config == a.config else b
            assert state_equal(loaded.state_dict(), version.state_dict())
            seen.add(loaded.config.d_model)
    finally:
        stop.set()
        thread.join()
    assert len(saves) > 10
    assert tree(tmp_path).keys() == {"ckpt", "ckpt/config.json", "ckpt/model.safetensors"}
