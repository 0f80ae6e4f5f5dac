"""Hostile suites for data preparation (marked ``hostile``; run by .ci/run, not by ``make test``).

Faults: every file-system call ``prepare`` makes goes through :mod:`blackmamba.atomic_dir`; a clean run lists
them, then each call in turn fails (ENOSPC once, ENOSPC from there on, or a SIGKILL of a forked writer). Before
the swap the previous dataset must read back the same tokens; after it the new one must. A later prepare must
then succeed and leave no temporary folders behind.

Manifests: every field of a valid manifest is deleted or replaced by values of the wrong type, hostile paths
and out-of-range numbers; the file is truncated at every byte and has bytes flipped. Each must either load the
very same tokens or raise one DataError, never another exception, never a hang.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from blackmamba import atomic_dir
from blackmamba.training.data import MANIFEST, DataError, TokenData, prepare

from .test_data import assert_same, leftovers, snapshot, write_corpus

pytestmark = pytest.mark.hostile

SCENARIOS = ("replace", "fallback", "fresh", "empty")


class Recorder:
    """Wraps every atomic_dir step: logs (step, first argument) and fails at the chosen call numbers."""

    def __init__(self, monkeypatch, fail_at: int | None = None, persistent: bool = False, kill: bool = False):
        self.log: list[tuple[str, str]] = []
        self.fail_at, self.persistent, self.kill = fail_at, persistent, kill
        for name in atomic_dir.STEPS:
            monkeypatch.setattr(atomic_dir, name, self._wrap(name, getattr(atomic_dir, name)))

    def _wrap(self, name, real):
        def step(*args):
            self.log.append((name, str(args[0])))
            n = len(self.log) - 1
            if self.fail_at is not None and (n == self.fail_at or (self.persistent and n > self.fail_at)):
                if self.kill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
            return real(*args)

        return step


def swap_index(log: list[tuple[str, str]]) -> int:
    """The call that puts the new dataset in place (the fallback's exchange, which declines, comes before it)."""
    return max(i for i, (step, arg) in enumerate(log) if step in ("exchange", "rename") and ".tmp-" in Path(arg).name)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return write_corpus(root / "old", seed=0), write_corpus(root / "new", seed=1)


def setup(tmp_path: Path, scenario: str, old_text: Path) -> Path:
    out = tmp_path / "parent" / "ds" if scenario == "fresh" else tmp_path / "ds"
    if scenario in ("replace", "fallback"):
        prepare([str(old_text)], out, "bpe:300", val_fraction=0.34)
    elif scenario == "empty":
        out.mkdir(parents=True)
    return out


def run_new(out: Path, new_text: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare([str(new_text)], out, "bpe:320", val_fraction=0.34)


def state(out: Path):
    return snapshot(out) if (out / MANIFEST).exists() else None


def check_after_fault(out: Path, old, new, swapped: bool) -> None:
    if swapped:
        assert_same(new, snapshot(out))
    elif old is None:
        assert not (out / MANIFEST).exists()
    else:
        assert_same(old, snapshot(out))


def clean_run(tmp_path, monkeypatch, scenario, corpora):
    out = setup(tmp_path / "clean", scenario, corpora[0])
    with monkeypatch.context() as m:
        if scenario == "fallback":
            m.setattr(atomic_dir, "exchange", lambda a, b: False)
        rec = Recorder(m)
        run_new(out, corpora[1])
    return rec.log, snapshot(out)


@pytest.mark.parametrize("persistent", [False, True], ids=["once", "from-then-on"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_enospc_at_every_step(tmp_path, monkeypatch, corpora, scenario, persistent):
    log, new = clean_run(tmp_path, monkeypatch, scenario, corpora)
    swap = swap_index(log)
    assert len(log) > 15 and {s for s, _ in log} >= {"make_dir", "open_file", "write_chunk", "sync_file", "sync_dir"}
    for k in range(len(log)):
        case = tmp_path / f"case{k}"
        out = setup(case, scenario, corpora[0])
        old = state(out)
        with monkeypatch.context() as m:
            if scenario == "fallback":
                m.setattr(atomic_dir, "exchange", lambda a, b: False)
            Recorder(m, fail_at=k, persistent=persistent)
            if k <= swap:
                with pytest.raises(DataError, match="No space left on device"):
                    run_new(out, corpora[1])
            else:
                run_new(out, corpora[1])
        moved_aside = [p for p in case.rglob(".ds.old-*")]
        if persistent and scenario == "fallback" and k == swap and not out.exists():
            # both the second rename and its undo failed: the old dataset waits, whole, under its aside name
            assert_same(old, snapshot(moved_aside[0]))
        else:
            check_after_fault(out, old, new, swapped=k > swap)
        run_new(out, corpora[1])  # a later prepare works and tidies up
        assert_same(new, snapshot(out))
        assert leftovers(out.parent) == [], (scenario, k, log[k])


@pytest.mark.parametrize("scenario", ["replace", "fallback", "fresh"])
def test_kill_at_every_step(tmp_path, monkeypatch, corpora, scenario):
    log, new = clean_run(tmp_path, monkeypatch, scenario, corpora)
    swap = swap_index(log)
    for k in range(len(log) + 1):
        case = tmp_path / f"case{k}"
        out = setup(case, scenario, corpora[0])
        old = state(out)
        pid = os.fork()
        if pid == 0:  # the writer: killed before its k-th file-system call
            code = 3
            try:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
                if scenario == "fallback":
                    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
                Recorder(monkeypatch, fail_at=k, kill=True)
                run_new(out, corpora[1])
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if k < len(log):
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        else:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if scenario == "fallback" and k == swap:
            aside = list(out.parent.glob(".ds.old-*"))
            assert not out.exists() and len(aside) == 1
            assert_same(old, snapshot(aside[0]))  # the next prepare puts it back (test_data.py checks that)
        else:
            check_after_fault(out, old, new, swapped=k > swap)
        run_new(out, corpora[1])
        assert_same(new, snapshot(out))
        assert leftovers(out.parent) == [], (scenario, k, log[k] if k < len(log) else "end")


BAD_VALUES = [None, True, False, -1, 0, 2**70, 1.5, float("nan"), "", "x", "../train-00000.bin", "/etc/passwd"]
BAD_VALUES += ["train-00000.bin/..", ".", "manifest.json", [], {}, [1], ["a"], {"a": 1}]


def nodes(value, path=()):
    """Every (path, value) in a JSON document, the root excluded."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        yield (*path, key), child
        yield from nodes(child, (*path, key))


def mutations(manifest: dict):
    """(description, mutated manifest) for every node: deleted, and replaced by each bad value."""
    for path, value in nodes(manifest):
        for replacement in ["<deleted>", *BAD_VALUES]:
            if replacement == value and type(replacement) is type(value):
                continue
            m = json.loads(json.dumps(manifest))
            parent = m
            for key in path[:-1]:
                parent = parent[key]
            if replacement == "<deleted>":
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
            yield f"{'.'.join(map(str, path))} = {replacement!r}", m


def load_or_data_error(out: Path, splits, reference, exact_max: bool = True) -> bool:
    """Loads each split: either the same tokens, or a DataError. True when it loaded. The recorded maximum id
    is trusted (only checked against the vocabulary and the shards' records), so a mutation of it to another
    valid id is only held to ``< vocab_size``."""
    try:
        for split in splits:
            data = TokenData(out, split)
            np.testing.assert_array_equal(np.asarray(data.tokens), reference[split])
            assert data.max_token_id() < data.vocab_size
            assert data.max_token_id() == data.scan_max_token_id() or not exact_max
    except DataError as e:
        assert "\n" not in str(e) and (MANIFEST in str(e) or str(out) in str(e)), str(e)
        return False
    return True


def test_every_field_of_the_manifest_mutated(tmp_path, corpora):
    out = tmp_path / "ds"
    manifest = prepare([str(corpora[0])], out, "bpe:300", val_fraction=0.34)
    reference = snapshot(out)
    refused = loaded = 0
    for what, mutated in mutations(manifest):
        (out / MANIFEST).write_text(json.dumps(mutated))
        try:
            ok = load_or_data_error(out, list(manifest["splits"]), reference, "max_token_id =" not in what)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
        except Exception as e:
            raise AssertionError(f"{what}: {type(e).__name__}: {e}") from None
        loaded += ok
        refused += not ok
        if what.endswith("<deleted>'") and not what.split(" = ")[0].split(".")[-1].isdigit():
            optional = ("max_token_id", "duplicates")
            assert ok == what.split(" = ")[0].endswith(optional), what
    assert refused > 300 and loaded > 0


def test_truncated_and_bit_flipped_manifests(tmp_path, corpora):
    out = tmp_path / "ds"
    manifest = prepare([str(corpora[0])], out, "bpe:300", val_fraction=0.34)
    reference = snapshot(out)
    raw = (out / MANIFEST).read_bytes()
    for n in range(len(raw) - 1):  # the last byte is the newline
        (out / MANIFEST).write_bytes(raw[:n])
        with pytest.raises(DataError):
            TokenData(out)
    rng = np.random.default_rng(0)
    for _ in range(300):
        flipped = bytearray(raw)
        for i in rng.integers(0, len(raw), size=rng.integers(1, 4)):
            flipped[i] ^= 1 << int(rng.integers(8))
        (out / MANIFEST).write_bytes(bytes(flipped))
        load_or_data_error(out, list(manifest["splits"]), reference, exact_max=False)


def test_shards_and_manifests_that_are_not_regular_files(tmp_path, corpora):
    out = tmp_path / "ds"
    prepare([str(corpora[0])], out, "bpe:300", val_fraction=0.34)
    shard = out / "train-00000.bin"
    saved = shard.read_bytes()
    shard.unlink()
    os.mkfifo(shard)  # opening it would block forever
    with pytest.raises(DataError, match="not a regular file"):
        TokenData(out)
    shard.unlink()
    shard.mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        TokenData(out)
    shard.rmdir()
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(saved)
    os.symlink(os.path.relpath(outside, out), shard)
    with pytest.raises(DataError, match="resolves outside"):
        TokenData(out)
    shard.unlink()
    shard.write_bytes(saved)
    manifest = (out / MANIFEST).read_bytes()
    (out / MANIFEST).unlink()
    os.mkfifo(out / MANIFEST)
    with pytest.raises(DataError, match="not a regular file"):
        TokenData(out)
    (out / MANIFEST).unlink()
    (out / MANIFEST).write_bytes(manifest)
    assert len(TokenData(out)) == len(saved) // 2


def test_hostile_out_paths(tmp_path, corpora):
    data = tmp_path / "real"
    prepare([str(corpora[0])], data, "bpe:300", val_fraction=0.34)
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    run_new(link, corpora[1])  # replaces the folder the link points at; the link stays
    assert link.is_symlink() and (data / MANIFEST).exists()
    assert leftovers(tmp_path) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    with pytest.raises(DataError, match="symlink to nothing"):
        run_new(tmp_path / "dangling", corpora[1])
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="is a file, not a folder"):
        run_new(tmp_path / "fifo", corpora[1])
    with pytest.raises(DataError, match="is a file, not a folder"):
        run_new(tmp_path / "fifo" / "x", corpora[1])
    for bad in ("", "a\0b"):
        with pytest.raises(DataError, match="must be a folder name"):
            run_new(Path(bad) if bad else bad, corpora[1])
    nested = data / "inner"
    with pytest.raises(DataError, match="did not write"):  # a folder inside the dataset is not ours
        nested.mkdir()
        run_new(data, corpora[1])
    shutil.rmtree(nested)
    assert not list(tmp_path.glob("nothing*"))
