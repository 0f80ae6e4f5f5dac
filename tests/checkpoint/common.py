"""Helpers of the checkpoint tests: tiny checkpoints of both layouts, the CLI run in-process, and the check
that a refusal is one ``error:`` line, exit code 1, no traceback, nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from blackmamba import BlackMamba, BlackMambaConfig, save_pretrained, save_released
from blackmamba.cli import main

from ..helpers import randomize


def tiny(seed: int = 0, **overrides) -> BlackMamba:
    torch.manual_seed(seed)
    return randomize(BlackMamba(BlackMambaConfig.from_preset("tiny", **overrides)), seed).eval()


def make_ours(path: Path, seed: int = 0, shard_bytes: int | None = None, **overrides) -> Path:
    kwargs = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    return save_pretrained(tiny(seed, **overrides), path, **kwargs)


def make_released(path: Path, seed: int = 0, **overrides) -> Path:
    return save_released(tiny(seed, **overrides), path)


def released_state(path: Path) -> dict:
    return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)


def run_cli(*args) -> tuple[int, str, str]:
    """``blackmamba ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its size, mode and modification time: a snapshot to compare."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return snap


def assert_refused(root: Path, *args, fragments: tuple[str, ...] = ()) -> str:
    """The CLI refuses ``args``: exit code 1, stderr exactly one line starting with ``error:`` (no traceback),
    and nothing under ``root`` created, changed or deleted. Returns the line."""
    before = tree(root)
    code, _, err = run_cli(*args)
    lines = err.splitlines()
    assert code == 1, (args, code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert "Traceback" not in err and "weights_only=False" not in err, err
    assert "/proc/self/fd" not in err, err  # messages name the user's path, not the reader's pinned one
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert tree(root) == before, f"{args} changed files under {root}"
    return lines[0]


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
