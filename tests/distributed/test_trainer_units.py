"""Fast, single-process checks of the trainer's distributed options and files: TrainArgs and command-line
flags, what one process does with them, distributed checkpoints in a run folder (listing, JSON trainer
state, an asynchronous write that fails) and ``blackmamba convert`` of a distributed checkpoint. The runs
on 2 ranks are in tests/training/test_distributed_train.py."""

from __future__ import annotations

import json
import math
from concurrent.futures import Future

import pytest
import torch

from blackmamba import cli, load_pretrained
from blackmamba.checkpoint import CheckpointError
from blackmamba.tokenizer import train_bpe
from blackmamba.training import dcp
from blackmamba.training.distributed import describe_failure
from blackmamba.training.rundir import (
    TrainingError,
    checkpoints,
    load_distributed_state,
    rng_from_json,
    rng_state,
    rng_to_json,
)
from blackmamba.training.trainer import train
from tests.training.helpers import prepare_tiny_data, tiny_args

from . import harness as h

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


@pytest.fixture
def one_process(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"expert_parallel": 0}, "--expert-parallel must be at least 1"),
        ({"expert_parallel": True}, "--expert-parallel must be a whole number"),
        ({"expert_parallel": 1.5}, "--expert-parallel must be a whole number"),
        ({"expert_parallel": 3}, "--expert-parallel 3 does not divide the 4 experts of --preset tiny"),
        ({"dist_timeout": 0.0}, "--dist-timeout must be above 0"),
        ({"dist_timeout": math.nan}, "--dist-timeout must be a finite number"),
        ({"fsdp": "yes"}, "fsdp must be True or False"),
        ({"fsdp_unit_blocks": -1}, "--fsdp-unit-blocks must be"),
    ],
)
def test_bad_distributed_options_are_refused_naming_them(tmp_path, change, message):
    with pytest.raises(TrainingError, match=message):
        tiny_args(tmp_path / "data", tmp_path / "run", **change)


def test_flags_come_from_train_args(tmp_path):
    argv = ["train", "--preset", "tiny", "--data", "d", "--out", "o", "--max-steps", "1", "--fsdp",
            "--expert-parallel", "2", "--dist-timeout", "30", "--fsdp-unit-blocks", "2"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    assert (args.fsdp, args.expert_parallel, args.dist_timeout, args.fsdp_unit_blocks) == (True, 2, 30.0, 2)
    defaults = cli.build_parser().parse_args(argv[:9])
    assert (defaults.fsdp, defaults.expert_parallel, defaults.dist_timeout, defaults.fsdp_unit_blocks) == (
        False,
        1,
        600.0,
        0,
    )


def test_expert_parallel_without_torchrun_is_refused(tmp_path, one_process):
    with pytest.raises(
        TrainingError, match="--expert-parallel 2 needs at least that many processes: launch with torchrun"
    ):
        train(tiny_args(tmp_path / "data", tmp_path / "run", expert_parallel=2))
    assert not (tmp_path / "run").exists()


def test_fsdp_without_torchrun_trains_one_process_as_usual(tmp_path, one_process, capsys):
    data = prepare_tiny_data(tmp_path)
    summary = train(tiny_args(data, tmp_path / "run", fsdp=True, max_steps=2, save_every=2, eval_every=2))
    assert "warning: --fsdp: one process without torchrun has nothing to shard" in capsys.readouterr().err
    final = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert summary["checkpoint"] == summary["model"] == str(final)
    assert sorted(p.name for p in final.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"
    ]  # fmt: skip
    assert not (tmp_path / "run" / "model").exists()


def test_rng_state_survives_json_and_bad_json_is_refused(tmp_path):
    state = rng_state()
    back = rng_from_json(json.loads(json.dumps(rng_to_json(state))), tmp_path / "x.json")
    assert torch.equal(back["torch"], state["torch"])
    assert torch.equal(back["numpy"]["keys"], state["numpy"]["keys"]) and back["numpy"]["pos"] == state["numpy"]["pos"]
    encoded = rng_to_json(state)
    encoded["torch"]["base64"] = encoded["torch"]["base64"][:-8]
    with pytest.raises(TrainingError, match="x.json: the stored random-number state is malformed"):
        rng_from_json(encoded, tmp_path / "x.json")
    encoded["torch"]["__tensor__"] = "float64"
    with pytest.raises(TrainingError, match="a tensor of dtype 'float64'"):
        rng_from_json(encoded, tmp_path / "x.json")


def _trainer_record(step: int) -> dict:
    return {
        "step": step,
        "max_steps": 4,
        "data_position": step,
        "args": {},
        "data": {},
        "rng": rng_to_json(rng_state()),
    }


def test_run_folder_lists_distributed_checkpoints_and_reads_their_state(tmp_path):
    model = h.build_model()
    root = tmp_path / "run" / "checkpoints"
    dcp.save(root / "step-00000002", model, state=_trainer_record(2))
    dcp.save(root / "step-00000004", model, state={k: v for k, v in _trainer_record(4).items() if k != "max_steps"})
    (root / "step-00000003").mkdir()  # neither kind: an interrupted write
    assert [p.name for p in checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000004"]
    state, config = load_distributed_state(root / "step-00000002")
    assert state["step"] == 2 and torch.equal(state["rng"]["torch"], torch.get_rng_state())
    assert config == model.config.to_dict()
    with pytest.raises(TrainingError, match="dcp_state.json has no 'max_steps' entry"):
        load_distributed_state(root / "step-00000004")


def test_failed_asynchronous_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = h.build_model()
    target = tmp_path / "ck"
    dcp.save(target, model, state={"step": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(state, checkpoint_id, **kw):
        (checkpoint_id / "__0_0.distcp").write_bytes(b"partial")
        future: Future = Future()
        future.set_exception(OSError(28, "No space left on device"))
        return future

    monkeypatch.setattr(dcp.dcp, "async_save", broken)
    pending = dcp.save(target, model, state={"step": 2}, async_save=True)
    with pytest.raises(CheckpointError, match=f"cannot write checkpoint {target}: .*No space left on device"):
        pending.wait()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the temporary folder is gone


def test_convert_reads_a_distributed_checkpoint(tmp_path, capsys):
    model = h.build_model()
    tokenizer = train_bpe(["the king and the queen " * 20], 280)
    src = tmp_path / "ck"
    dcp.save(src, model, state={"step": 1}, tokenizer=tokenizer)
    assert cli.main(["convert", str(src), str(tmp_path / "plain")]) == 0
    assert "wrote" in capsys.readouterr().out
    plain = load_pretrained(tmp_path / "plain", dtype=torch.float32)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert json.loads((tmp_path / "plain" / "tokenizer.json").read_text()) == json.loads(tokenizer.to_str())
    assert cli.main(["convert", str(src), str(tmp_path / "released"), "--to", "released"]) == 0
    assert (tmp_path / "released" / "pytorch_model.bin").is_file()
    assert cli.main(["convert", str(src), str(src / "inside")]) == 1
    assert "lies inside the source checkpoint" in capsys.readouterr().err


def test_failure_before_the_group_names_torchruns_rank(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert describe_failure(ValueError("boom")) == "error: rank 3 of 4 failed with ValueError: boom"
