"""Bad input reachable from the command line raises the project's own errors (BlackMambaError, still a
ValueError for callers that catch that), which ``blackmamba`` prints as one ``error:`` line; anything else
keeps its traceback (tests/cli/test_cli.py)."""

from __future__ import annotations

import pytest
import torch

from blackmamba import cli
from blackmamba.devices import resolve_device, resolve_dtype
from blackmamba.errors import BlackMambaError
from blackmamba.eval.perplexity import document_logprob
from blackmamba.eval.taskdata import expand_tasks
from blackmamba.generation import prefill

from ..helpers import tiny_model


def bad_device():
    resolve_device("tpu")


def bad_device_index():
    resolve_device("cuda:x")


def bad_dtype():
    resolve_dtype("int8", torch.device("cpu"))


def no_tasks():
    expand_tasks([])


def bad_chunk():
    document_logprob(tiny_model(), [1, 2, 3], eos_id=0, chunk=0)


def bad_prefill_chunk():
    model = tiny_model()
    prefill(model, torch.tensor([[1, 2]]), model.allocate_cache(1), chunk_size=0)


CASES = [
    (bad_device, "tpu"),
    (bad_device_index, "cuda:x"),
    (bad_dtype, "int8"),
    (no_tasks, "no tasks"),
    (bad_chunk, "chunk"),
    (bad_prefill_chunk, "chunk size"),
]


@pytest.mark.parametrize("fail,fragment", CASES, ids=[f.__name__ for f, _ in CASES])
def test_is_a_project_error_and_a_value_error(fail, fragment):
    with pytest.raises(BlackMambaError, match=fragment) as info:
        fail()
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fail,fragment", CASES, ids=[f.__name__ for f, _ in CASES])
def test_the_command_line_prints_one_error_line(monkeypatch, capsys, fail, fragment):
    monkeypatch.setattr(cli, "cmd_info", lambda args: fail())
    assert cli.main(["info", "somewhere"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error:") and err.count("\n") == 1 and fragment in err


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--device", "cuda:x"], ["--prefill-chunk-size", "0"]])
def test_generate_names_the_flag(capsys, tmp_path, argv):
    code = cli.main(["generate", "--model", str(tmp_path), "--prompt", "x", *argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.startswith(f"error: {argv[0]}:") and err.count("\n") == 1
