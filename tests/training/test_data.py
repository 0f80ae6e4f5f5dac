"""Data preparation: atomic re-prepare, refusing folders we did not write, output-path errors, manifest
validation, max token id, and documents reached twice. The exhaustive fault and hostile-manifest suites are in
test_data_faults.py (marked hostile); these are their fast representatives."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from blackmamba import atomic_dir
from blackmamba.cli import main
from blackmamba.training import data as data_mod
from blackmamba.training.data import MANIFEST, DataError, TokenData, load_manifest, prepare

WORDS = "the king queen castle sword crown horse river night day love war peace bread wine".split()


def write_corpus(root: Path, n_docs: int = 6, seed: int = 0, words: int = 120) -> Path:
    """Distinct small documents (random word sequences), one file each."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        (root / f"doc{d:02d}.txt").write_text(" ".join(rng.choice(WORDS, size=words)) + "\n")
    return root


def make_dataset(tmp_path: Path, name: str = "tok", seed: int = 0, tokenizer: str = "bpe:300") -> Path:
    out = tmp_path / name
    prepare([str(write_corpus(tmp_path / f"text-{name}-{seed}", seed=seed))], out, tokenizer, val_fraction=0.34)
    return out


def snapshot(data_dir: Path) -> dict[str, np.ndarray]:
    """The tokens of every split, as read through TokenData."""
    manifest = load_manifest(data_dir)
    return {split: np.array(TokenData(data_dir, split).tokens) for split in manifest["splits"]}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for split in a:
        np.testing.assert_array_equal(a[split], b[split])


def leftovers(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n)


def test_reprepare_replaces_the_dataset_in_one_swap(tmp_path):
    out = make_dataset(tmp_path, seed=0)
    first = snapshot(out)
    inode = os.stat(out).st_ino
    prepare([str(write_corpus(tmp_path / "other", seed=1))], out, "bpe:320", val_fraction=0.34)
    second = snapshot(out)
    assert not np.array_equal(first["train"], second["train"])
    assert load_manifest(out)["tokenizer"] == "bpe:320"
    assert os.stat(out).st_ino != inode  # a new folder was swapped in, not the old one rewritten
    assert leftovers(tmp_path) == []
    assert sorted(os.listdir(out)) == ["manifest.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_prepare_honours_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = make_dataset(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~mask
    for name in os.listdir(out):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~mask, name


def test_prepare_into_an_empty_folder_and_new_parents(tmp_path):
    (tmp_path / "empty").mkdir()
    prepare([str(write_corpus(tmp_path / "text"))], tmp_path / "empty", "bpe:300", val_fraction=0.34)
    prepare([str(tmp_path / "text")], tmp_path / "a" / "b" / "c", "bpe:300", val_fraction=0.34)
    assert snapshot(tmp_path / "empty")["train"].size > 0
    assert_same(snapshot(tmp_path / "empty"), snapshot(tmp_path / "a" / "b" / "c"))


def test_prepare_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    text = write_corpus(tmp_path / "text")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "weights.bin").write_bytes(b"\1\2\3")
    with pytest.raises(DataError, match="not empty and holds no dataset manifest"):
        prepare([str(text)], mine, "bpe:300")
    assert sorted(os.listdir(mine)) == ["notes.txt", "weights.bin"]
    assert (mine / "weights.bin").read_bytes() == b"\1\2\3"

    out = make_dataset(tmp_path)
    before = snapshot(out)
    (out / "extra.txt").write_text("the user's")
    with pytest.raises(DataError, match="'extra.txt', which `data prepare` did not write"):
        prepare([str(text)], out, "bpe:300")
    assert (out / "extra.txt").read_text() == "the user's"
    assert_same(before, snapshot(out))

    (out / "extra.txt").unlink()
    (out / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="no dataset manifest"):
        prepare([str(text)], out, "bpe:300")
    assert leftovers(tmp_path) == []


def test_out_that_is_a_file_or_under_a_file(tmp_path):
    text = write_corpus(tmp_path / "text")
    plain = tmp_path / "plain"
    plain.write_text("x")
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match="is a file, not a folder"):
        prepare([str(text)], plain, "bpe:300")
    with pytest.raises(DataError, match=f"{plain} is a file, not a folder"):
        prepare([str(text)], plain / "sub" / "out", "bpe:300")
    assert sorted(os.listdir(tmp_path)) == listing
    assert plain.read_text() == "x"


def test_out_that_cannot_be_written(tmp_path, monkeypatch):
    text = write_corpus(tmp_path / "text")
    listing = sorted(os.listdir(tmp_path))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(DataError, match="cannot be written: .* is read-only"):
        prepare([str(text)], tmp_path / "out", "bpe:300")
    monkeypatch.setattr(os, "access", real_access)

    def read_only(path):  # a read-only file system, as root sees it
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(atomic_dir, "make_dir", read_only)
    with pytest.raises(DataError, match="Read-only file system .*; nothing was written"):
        prepare([str(text)], tmp_path / "out" / "deeper", "bpe:300")
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder(tmp_path):
    text = write_corpus(tmp_path / "text")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(DataError, match="read-only"):
            prepare([str(text)], locked / "out", "bpe:300")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_cli_reports_a_bad_out_in_one_line(tmp_path, capsys):
    text = write_corpus(tmp_path / "text")
    plain = tmp_path / "plain"
    plain.write_text("x")
    code = main(["data", "prepare", "--source", str(text), "--out", str(plain), "--tokenizer", "bpe:300"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and str(plain) in err
    assert "Traceback" not in err


def test_a_full_disk_keeps_the_previous_dataset(tmp_path, monkeypatch):
    out = make_dataset(tmp_path)
    before = snapshot(out)
    calls = {"n": 0}
    real = atomic_dir.write_chunk

    def full(fd, chunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, chunk)

    monkeypatch.setattr(atomic_dir, "write_chunk", full)
    with pytest.raises(DataError, match="No space left on device.*is unchanged"):
        prepare([str(write_corpus(tmp_path / "new", seed=3))], out, "bpe:300", val_fraction=0.34)
    assert_same(before, snapshot(out))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange_works", [True, False])
def test_a_failed_swap_keeps_the_previous_dataset(tmp_path, monkeypatch, exchange_works):
    out = make_dataset(tmp_path)
    before = snapshot(out)

    def broken(a, b):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(a))

    if exchange_works:
        monkeypatch.setattr(atomic_dir, "exchange", broken)
    else:  # the fallback (no renameat2): the second rename fails, the first is undone
        monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
        real = atomic_dir.rename
        monkeypatch.setattr(atomic_dir, "rename", lambda a, b: broken(a, b) if ".tmp-" in Path(a).name else real(a, b))
    with pytest.raises(DataError, match="Input/output error"):
        prepare([str(write_corpus(tmp_path / "new", seed=3))], out, "bpe:300", val_fraction=0.34)
    assert_same(before, snapshot(out))
    assert leftovers(tmp_path) == []


def test_fallback_swap_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
    out = make_dataset(tmp_path, seed=0)
    first = snapshot(out)
    prepare([str(write_corpus(tmp_path / "new", seed=3))], out, "bpe:300", val_fraction=0.34)
    assert not np.array_equal(first["train"], snapshot(out)["train"])
    assert leftovers(tmp_path) == []


def test_a_failed_cleanup_after_the_swap_warns_and_is_tidied_later(tmp_path, monkeypatch):
    out = make_dataset(tmp_path)
    real = atomic_dir.remove_dir

    def stuck(path):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))

    monkeypatch.setattr(atomic_dir, "remove_dir", stuck)
    with pytest.warns(UserWarning, match="the new dataset is in"):
        prepare([str(write_corpus(tmp_path / "new", seed=3))], out, "bpe:300", val_fraction=0.34)
    new = snapshot(out)
    assert len(leftovers(tmp_path)) == 1
    monkeypatch.setattr(atomic_dir, "remove_dir", real)
    prepare([str(tmp_path / "new")], out, "bpe:300", val_fraction=0.34)
    assert_same(new, snapshot(out))
    assert leftovers(tmp_path) == []


def test_leftovers_of_a_dead_writer_are_removed_but_foreign_files_kept(tmp_path):
    out = make_dataset(tmp_path)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".tok.tmp-{dead}-0123abcd"
    shutil.copytree(out, stale)
    foreign = tmp_path / f".tok.old-{dead}-89abcdef"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not the tool's")
    prepare([str(write_corpus(tmp_path / "new", seed=3))], out, "bpe:300", val_fraction=0.34)
    assert not stale.exists()
    assert (foreign / "mine.txt").read_text() == "not the tool's"


def test_fallback_kill_between_renames_is_recovered(tmp_path):
    out = make_dataset(tmp_path)
    before = snapshot(out)
    aside = tmp_path / f".tok.old-{2**22 + 777}-0badcafe"
    os.rename(out, aside)  # what a kill between the fallback's two renames leaves
    prepare([str(write_corpus(tmp_path / "new", seed=3))], out, "bpe:300", val_fraction=0.34)
    assert not aside.exists()
    assert not np.array_equal(before["train"], snapshot(out)["train"])
    assert leftovers(tmp_path) == []


def test_file_reached_twice_is_one_document(tmp_path):
    text = write_corpus(tmp_path / "text", n_docs=8)
    (tmp_path / "text" / "nested").mkdir()
    os.link(text / "doc00.txt", text / "nested" / "hard.txt")
    shutil.copyfile(text / "doc01.txt", text / "nested" / "copy.txt")
    (tmp_path / "link").symlink_to(text, target_is_directory=True)
    manifest = prepare([str(text), str(tmp_path / "link")], tmp_path / "out", "bpe:300", val_fraction=0.5)
    splits = manifest["splits"]
    docs = [d for s in splits.values() for d in s["documents"]]
    real = [os.path.realpath(d) for d in docs]
    assert len(real) == len(set(real)) == 8
    duplicates = [d for s in splits.values() for d in s.get("duplicates", [])]
    assert duplicates == [str(text / "nested" / "copy.txt")] or duplicates == [str(text / "doc01.txt")]
    assert not any(d.startswith(str(tmp_path / "link")) for d in docs)
    train_texts = {Path(d).read_text() for d in splits["train"]["documents"]}
    assert train_texts.isdisjoint(Path(d).read_text() for d in splits["val"]["documents"])


def test_max_token_id_recorded_and_computed_for_old_manifests(tmp_path):
    out = make_dataset(tmp_path)
    data = TokenData(out, "train")
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["max_token_id"] == data.max_token_id() == data.scan_max_token_id()
    assert data.max_token_id() == int(np.max(np.fromfile(out / "train-00000.bin", dtype=np.uint16)))
    for info in manifest["splits"].values():  # a manifest from before the field existed
        del info["max_token_id"]
        for shard in info["shards"]:
            del shard["max_token_id"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert TokenData(out, "train").max_token_id() == data.scan_max_token_id()


def write_manifest(out: Path, manifest: dict) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m, d: m.pop("vocab_size"), "field 'vocab_size' is missing"),
        (lambda m, d: m.update(dtype=7), "field 'dtype' must be a string, got 7"),
        (lambda m, d: m["splits"]["train"].update(shards={"file": "x"}), "'splits.train.shards' must be a non-empty"),
        (lambda m, d: m["splits"]["train"]["shards"][0].update(tokens="12"), r"shards\[0\].tokens' must be an integer"),
        (lambda m, d: m["splits"]["train"]["shards"][0].update(file="../x.bin"), "resolves outside"),
        (lambda m, d: m["splits"]["train"]["shards"][0].update(file="/etc/passwd"), "is an absolute path"),
        (lambda m, d: m["splits"]["train"].update(max_token_id=10**6), "'splits.train.max_token_id' must be in"),
        (lambda m, d: (d / "train-00000.bin").unlink(), "cannot be read"),
        (lambda m, d: (d / "train-00000.bin").write_bytes(b"\0" * 6), "which is 6 bytes"),
    ],
)
def test_bad_manifests_are_one_data_error(tmp_path, mutate, message):
    out = make_dataset(tmp_path)
    manifest = json.loads((out / MANIFEST).read_text())
    mutate(manifest, out)
    write_manifest(out, manifest)
    with pytest.raises(DataError, match=message) as e:
        TokenData(out, "train")
    assert str(out / MANIFEST) in str(e.value) or "train-00000.bin" in str(e.value)


def test_shard_symlinked_out_of_the_dataset_is_refused(tmp_path):
    out = make_dataset(tmp_path)
    outside = tmp_path / "outside.bin"
    shutil.copyfile(out / "train-00000.bin", outside)
    (out / "train-00000.bin").unlink()
    (out / "train-00000.bin").symlink_to(outside)
    with pytest.raises(DataError, match=r"'splits.train.shards\[0\].file' \('train-00000.bin'\) resolves outside"):
        TokenData(out, "train")


def test_manifest_that_is_not_json_names_the_file(tmp_path):
    out = make_dataset(tmp_path)
    (out / MANIFEST).write_bytes(b'{"format": "blackmamba-tokens-v1", ')
    with pytest.raises(DataError, match=f"{out / MANIFEST} is not valid JSON"):
        TokenData(out)
    (out / MANIFEST).write_bytes(b"[" * 100000 + b"]" * 100000)
    with pytest.raises(DataError, match="manifest.json"):
        TokenData(out)


def test_prepare_rejects_bad_options_before_writing(tmp_path):
    text = write_corpus(tmp_path / "text")
    for kwargs, message in [
        (dict(tokenizer="bpe:x"), "bad tokenizer"),
        (dict(tokenizer="bpe:10"), "at least 300"),
        (dict(val_fraction=float("nan")), "--val-fraction"),
        (dict(dtype="int8"), "token dtype"),
        (dict(shard_tokens=0), "shard_tokens"),
    ]:
        with pytest.raises(DataError, match=message):
            prepare([str(text)], tmp_path / "out", **kwargs)
    with pytest.raises(DataError, match="non-empty list"):
        prepare(str(text), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_shards_roll_over_and_read_back_in_order(tmp_path):
    text = write_corpus(tmp_path / "text")
    one = prepare([str(text)], tmp_path / "one", "bpe:300", val_fraction=0.34)
    many = prepare([str(text)], tmp_path / "many", "bpe:300", val_fraction=0.34, shard_tokens=50)
    assert len(many["splits"]["train"]["shards"]) > 3
    assert all(s["tokens"] <= 50 for s in many["splits"]["train"]["shards"])
    assert many["splits"]["train"]["tokens"] == one["splits"]["train"]["tokens"]
    assert_same(snapshot(tmp_path / "one"), snapshot(tmp_path / "many"))
    assert data_mod.owned_file("train-00012.bin") and not data_mod.owned_file("train-1.bin")


def test_a_reader_during_a_reprepare_sees_one_version(tmp_path, monkeypatch):
    out = make_dataset(tmp_path, seed=0)
    new_text = write_corpus(tmp_path / "new", seed=3)
    real_map = data_mod._map
    swapped = []

    def map_then_swap(path, dtype, tokens):
        array = real_map(path, dtype, tokens)
        if not swapped:  # another process re-prepares the folder between the manifest and the shards
            swapped.append(prepare([str(new_text)], out, "bpe:320", val_fraction=0.34))
        return array

    monkeypatch.setattr(data_mod, "_map", map_then_swap)
    data = TokenData(out, "train")
    monkeypatch.setattr(data_mod, "_map", real_map)
    assert data.manifest == swapped[0] and data.manifest["tokenizer"] == "bpe:320"
    np.testing.assert_array_equal(np.asarray(data.tokens), TokenData(out, "train").tokens)
