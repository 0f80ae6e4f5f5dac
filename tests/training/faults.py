"""Fault injection for the trainer's writers: fail (raise ENOSPC) or die (``os._exit``, like ``kill -9``) at the
k-th filesystem step of one checkpoint save or one metrics write.

A *filesystem step* is a call, while the injector is armed, of one of the primitives the writers are built
from: creating, renaming, syncing, chmod-ing and deleting files and folders, opening a file for writing, and
the library calls that write a whole file (``torch.save``, safetensors' ``save_file``). The injector is armed
only around the chosen writer call, so the rest of the run is untouched. The counts come from the code as
it is, so a changed writer is covered without editing this file.

``python -c "from tests.training.faults import child_main; child_main()" SPEC`` runs a training in a child
process with the injector set to ``exit``: the way to test what a killed trainer leaves behind.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

import blackmamba.checkpoint as checkpoint_module
import blackmamba.training.rundir as rundir
import blackmamba.training.trainer as trainer
from blackmamba.training.trainer import TrainArgs, train

KILLED = 137  # what the shell reports for a process ended by SIGKILL
WRITE_MODES = set("wax+")

# (module, attribute) of every primitive the writers use; missing ones (a refactored writer) are skipped.
PRIMITIVES = [
    (os, "replace"),
    (os, "rename"),
    (os, "fsync"),
    (os, "mkdir"),
    (os, "rmdir"),
    (os, "unlink"),
    (os, "chmod"),
    (os, "ftruncate"),
    (shutil, "rmtree"),
    (tempfile, "mkdtemp"),
    (tempfile, "mkstemp"),
    (torch, "save"),
    (checkpoint_module, "save_file"),
]


class Injector:
    """Counts the filesystem steps made while armed and fails once: at step ``fail_at`` (0-based), or at the
    first step named ``fail_on`` (e.g. "torch.save")."""

    def __init__(self, fail_at: int | None = None, action: str = "raise", fail_on: str | None = None) -> None:
        assert action in ("raise", "exit")
        self.fail_at, self.action, self.fail_on = fail_at, action, fail_on
        self.calls: list[str] = []
        self.armed = False
        self.fired = False

    def hit(self, name: str) -> None:
        if not self.armed or self.fired:
            return
        self.calls.append(name)
        if (self.fail_at is not None and len(self.calls) - 1 == self.fail_at) or name == self.fail_on:
            self.fired = True
            if self.action == "exit":
                os._exit(KILLED)
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {name})")

    @contextmanager
    def armed_window(self) -> Iterator[None]:
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


def _wrap(injector: Injector, name: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        injector.hit(name)
        return fn(*args, **kwargs)

    return wrapper


def _wrap_open(injector: Injector, fn: Any) -> Any:
    def wrapper(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if WRITE_MODES & set(mode):
            injector.hit(f"open({os.path.basename(str(file))}, {mode})")
        return fn(file, mode, *args, **kwargs)

    return wrapper


@contextmanager
def patched(injector: Injector, target: str, step: int) -> Iterator[None]:
    """Install ``injector`` on the filesystem primitives, armed during the ``target`` writer's work for
    ``step``: "save" (the checkpoint of that step), "metrics" (that step's first metrics row), "metrics-torn"
    (that row is cut in half on disk, then the injector fails) or "resume" (the metrics rewrite when a run
    resumes)."""
    saved: list[tuple[Any, str, Any]] = []

    def swap(owner: Any, attr: str, new: Any) -> None:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, new)

    try:
        for owner, attr in PRIMITIVES:
            if hasattr(owner, attr):
                swap(owner, attr, _wrap(injector, f"{getattr(owner, '__name__', owner)}.{attr}", getattr(owner, attr)))
        swap(builtins, "open", _wrap_open(injector, builtins.open))
        swap(io, "open", builtins.open)

        if target == "save":
            original_save = trainer.save_checkpoint

            def save(run, model, state, tokenizer, keep_last):
                if state["step"] != step:
                    return original_save(run, model, state, tokenizer, keep_last)
                with injector.armed_window():
                    return original_save(run, model, state, tokenizer, keep_last)

            swap(trainer, "save_checkpoint", save)
        elif target == "metrics":
            original_write = rundir.MetricsLog.write

            def write(self, row):
                if row["step"] != step or "loss" not in row:
                    return original_write(self, row)
                with injector.armed_window():
                    return original_write(self, row)

            swap(rundir.MetricsLog, "write", write)
        elif target == "metrics-torn":
            original_write = rundir.MetricsLog.write

            def torn(self, row):
                if row["step"] != step or "loss" not in row:
                    return original_write(self, row)
                line = json.dumps(row)
                with open(self.path, "a") as f:  # half a line reaches the disk, then the disk is full
                    f.write(line[: len(line) // 2])
                injector.armed, injector.fail_at = True, len(injector.calls)
                injector.hit("write(metrics.jsonl, half a line)")

            swap(rundir.MetricsLog, "write", torn)
        elif target == "resume":
            original_atomic = rundir.write_text_atomic

            def atomic(path, text):
                with injector.armed_window():
                    return original_atomic(path, text)

            swap(rundir, "write_text_atomic", atomic)
        else:
            raise ValueError(target)
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


def child_main() -> None:
    """Entry point of a child process: ``SPEC`` (argv[1], JSON) = {"args": TrainArgs fields, "target",
    "step", "fail_at" or "fail_on"}; the child dies with exit code 137 at the chosen step."""
    spec = json.loads(sys.argv[1])
    injector = Injector(spec.get("fail_at"), action="exit", fail_on=spec.get("fail_on"))
    with patched(injector, spec["target"], spec["step"]):
        train(TrainArgs(**spec["args"]))
    sys.exit(0)
