"""What a run may start or continue with: --resume refuses another seed, batch shape, dataset or model; token ids
beyond the model's vocabulary are refused up front; --init-from refuses data from another tokenizer unless
forced."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, save_pretrained
from blackmamba.tokenizer import train_bpe
from blackmamba.training.rundir import LOCK_FILE
from blackmamba.training.trainer import TrainingError, train

from .helpers import losses, prepare_tiny_data, tiny_args


@pytest.fixture(scope="module")
def six_steps(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("six") / "run"
    train(tiny_args(data_dir, run, max_steps=6))
    return run


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.name != LOCK_FILE}


@pytest.mark.parametrize("name,value,flag", [("seed", 1, "--seed"), ("batch_size", 2, "--batch-size")])
def test_resume_refuses_another_batch_recipe(six_steps, data_dir, name, value, flag):
    before = snapshot(six_steps)
    recorded = getattr(tiny_args(data_dir, six_steps), name)
    with pytest.raises(TrainingError, match=f"--resume: {flag} {value} differs from the run's {recorded}"):
        train(tiny_args(data_dir, six_steps, resume=True, **{name: value}))
    assert snapshot(six_steps) == before


@pytest.mark.parametrize("name,value,flag", [("seq_len", 16, "--seq-len"), ("grad_accum", 2, "--grad-accum")])
def test_resume_refuses_another_batch_shape(six_steps, data_dir, name, value, flag):
    with pytest.raises(TrainingError, match=f"{flag} {value} differs from the run's"):
        train(tiny_args(data_dir, six_steps, resume=True, **{name: value}))


def test_resume_refuses_other_data(six_steps, tmp_path):
    other = prepare_tiny_data(tmp_path, seed=1)
    with pytest.raises(TrainingError, match="is not the data this run was trained on"):
        train(tiny_args(other, six_steps, resume=True))


def test_resume_refuses_another_model(six_steps, data_dir, tmp_path):
    with pytest.raises(TrainingError, match="--preset small gives model config field 'vocab_size'"):
        train(tiny_args(data_dir, six_steps, resume=True, preset="small"))
    config = BlackMambaConfig.from_preset("tiny", d_model=48).to_dict()
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(TrainingError, match="model config field 'd_model' = 48"):
        train(tiny_args(data_dir, six_steps, resume=True, preset=None, config=str(tmp_path / "model.json")))
    # Naming the run's own model (or none) is fine: checked in the tests that resume.


def test_resume_with_a_new_learning_rate_warns_and_continues(six_steps, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(six_steps, run)
    summary = train(tiny_args(data_dir, run, resume=True, max_steps=8, lr=1e-3, min_lr=None))
    err = capsys.readouterr().err
    assert "--resume with --lr 0.001 (the run had 0.003)" in err
    assert "--min-lr 0.0001 (the run had 0.0003)" in err
    assert summary["step"] == 8 and [s for s, _ in losses(run)] == list(range(1, 9))


def test_resume_below_the_checkpoint_step_is_refused(six_steps, data_dir):
    with pytest.raises(TrainingError, match="--max-steps 4 is below the step of the checkpoint"):
        train(tiny_args(data_dir, six_steps, resume=True, max_steps=4))


def test_token_ids_beyond_the_vocabulary_are_refused_up_front(data_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"]["train"]["shards"][0]["file"]
    tokens = np.fromfile(shard, dtype=manifest["dtype"])
    tokens[len(tokens) // 2] = 4000  # a stray id no 300-token vocabulary has
    tokens.tofile(shard)
    with pytest.raises(TrainingError, match="holds token id 4000, but the model has a vocabulary of 300"):
        train(tiny_args(data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.fixture
def other_tokenizer_checkpoint(tmp_path):
    texts = [f"entirely different text about numbers {i} and letters {chr(97 + i % 26)}" for i in range(200)]
    tokenizer = train_bpe(texts, 300)
    torch.manual_seed(0)
    return save_pretrained(
        BlackMamba(BlackMambaConfig.from_preset("tiny", vocab_size=320)), tmp_path / "other", tokenizer=tokenizer
    )


def test_init_from_with_another_tokenizer_is_refused_unless_forced(other_tokenizer_checkpoint, data_dir, tmp_path):
    args = dict(preset=None, init_from=str(other_tokenizer_checkpoint), max_steps=2)
    with pytest.raises(TrainingError, match="uses another tokenizer than --data .*--force-tokenizer"):
        train(tiny_args(data_dir, tmp_path / "run", **args))
    assert not (tmp_path / "run").exists()
    summary = train(tiny_args(data_dir, tmp_path / "run", **args, force_tokenizer=True))
    assert summary["step"] == 2


def test_init_from_a_checkpoint_without_tokenizer(data_dir, tmp_path):
    torch.manual_seed(0)
    save_pretrained(BlackMamba(BlackMambaConfig.from_preset("tiny", vocab_size=320)), tmp_path / "bare")
    with pytest.raises(TrainingError, match="has no tokenizer.json and is not a GPT-NeoX-20B model"):
        train(tiny_args(data_dir, tmp_path / "run", preset=None, init_from=str(tmp_path / "bare"), max_steps=2))
