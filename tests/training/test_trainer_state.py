"""trainer_state.pt is untrusted input: plain data read with weights_only=True; a planted pickle payload is refused
without running; missing entries, wrong types and damaged files are errors naming the file; the first
version's files still resume."""

from __future__ import annotations

import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from blackmamba.training.rundir import STATE_FILE, STATE_FORMAT, load_state
from blackmamba.training.trainer import TrainingError, train

from .helpers import losses, tiny_args


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints at steps 6 and 12)."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(tiny_args(data_dir, run))
    return run


@pytest.fixture
def cut_run(full_run, tmp_path):
    """A copy of the run as if it had been interrupted after its step-6 checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    return run


def state_path(run):
    return run / "checkpoints" / "step-00000006" / STATE_FILE


class Payload:
    """Unpickling this creates ``marker``: the stand-in for any code a planted file would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_state_is_plain_data(full_run):
    state = torch.load(state_path(full_run), weights_only=True)
    assert state["format"] == STATE_FORMAT
    assert state["step"] == 6 and state["max_steps"] == 12 and state["data_position"] == 6
    assert len(state["data"]["manifest_sha256"]) == 64 and len(state["data"]["tokenizer_sha256"]) == 64
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


def test_a_planted_payload_never_runs(cut_run, data_dir, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = state_path(cut_run)
    state = torch.load(path, weights_only=True)
    state["rng"]["extra"] = Payload(marker)
    torch.save(state, path)
    with pytest.raises(TrainingError, match=f"{path} holds pickled Python objects .*refused and nothing in it was run"):
        train(tiny_args(data_dir, cut_run, resume=True))
    assert not marker.exists()
    # The same payload as a bare pickle (the old torch format) is refused as well.
    path.write_bytes(pickle.dumps({"step": 6, "x": Payload(marker)}))
    with pytest.raises(TrainingError, match=f"cannot read {path}: not an archive"):
        load_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["step", "max_steps", "data_position", "optimizer", "rng", "args", "data"])
def test_a_missing_entry_names_the_file_and_the_key(full_run, tmp_path, key):
    state = torch.load(state_path(full_run), weights_only=True)
    del state[key]
    path = tmp_path / STATE_FILE
    torch.save(state, path)
    with pytest.raises(TrainingError, match=f"{path} has no '{key}' entry"):
        load_state(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"step": "6"}, "'step' is a str, expected int"),
        ({"step": True}, "'step' is a bool"),
        ({"optimizer": []}, "'optimizer' is a list, expected dict"),
        ({"step": -1}, "out of range"),
        ({"format": "something-else"}, "not a trainer state written by blackmamba"),
        ({"rng": {"torch": 3}}, "random-number state is malformed"),
    ],
)
def test_wrong_types_name_the_file(full_run, tmp_path, change, message):
    state = torch.load(state_path(full_run), weights_only=True)
    state.update(change)
    path = tmp_path / STATE_FILE
    torch.save(state, path)
    with pytest.raises(TrainingError, match=message) as info:
        load_state(path)
    assert str(path) in str(info.value)


def test_damaged_files(full_run, tmp_path):
    data = state_path(full_run).read_bytes()
    path = tmp_path / STATE_FILE
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError, match=f"cannot read {path}: .*truncated or corrupt"):
        load_state(path)
    path.write_bytes(b"")
    with pytest.raises(TrainingError, match="truncated or corrupt"):
        load_state(path)
    state = torch.load(state_path(full_run), weights_only=True)
    torch.save([state], path)
    with pytest.raises(TrainingError, match="holds a list, not a trainer state"):
        load_state(path)


def test_a_malformed_optimizer_state_is_refused_on_resume(cut_run, data_dir):
    path = state_path(cut_run)
    state = torch.load(path, weights_only=True)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.ones(3)
    torch.save(state, path)
    with pytest.raises(TrainingError, match=f"{path}: the optimizer's 'exp_avg' does not have"):
        train(tiny_args(data_dir, cut_run, resume=True))


def test_a_first_version_state_still_resumes(cut_run, full_run, data_dir, capsys):
    """The first trainer pickled Python's and numpy's RNG states as tuples and arrays; such files load with a
    narrow allowance for numpy arrays and resume to the same losses."""
    path = state_path(cut_run)
    state = torch.load(path, weights_only=True)
    rng = state["rng"]
    python = (rng["python"]["version"], tuple(rng["python"]["internal"].tolist()), rng["python_gauss_next"])
    numpy_rng = rng["numpy"]
    np_state = (
        numpy_rng["kind"],
        numpy_rng["keys"].numpy().astype(np.uint32),
        numpy_rng["pos"],
        numpy_rng["has_gauss"],
        numpy_rng["cached_gaussian"],
    )
    random.setstate(python)  # the tuple is a valid state
    legacy = {
        "step": state["step"],
        "optimizer": state["optimizer"],
        "rng": {"python": python, "numpy": np_state, "torch": rng["torch"]},
        "args": {**state["args"], "extra": {}},
        "max_steps": state["max_steps"],
    }
    torch.save(legacy, path)
    train(tiny_args(data_dir, cut_run, resume=True))
    assert "written by an older version" in capsys.readouterr().err
    assert losses(cut_run) == losses(full_run)
