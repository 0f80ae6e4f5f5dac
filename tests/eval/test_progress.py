"""Progress of long scoring loops: plain lines every few seconds off a terminal, a bar on one."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest

from blackmamba.eval.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_one_line_every_interval():
    out, clock = io.StringIO(), Clock()
    progress = Progress(40, "loglikelihood", every=10.0, stream=out, clock=clock)
    for _ in range(40):
        clock.now += 1.0  # one request per second, 100 tokens each
        progress.update(1, tokens=100)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # at 10, 20, 30 and 40 s, and the closing line
    assert lines[0] == "loglikelihood: 10/40 requests (25.0%), 100 tokens/s, 00:10 elapsed, ~00:30 left"
    assert lines[-1].startswith("loglikelihood: 40/40 requests (100.0%), 100 tokens/s, 00:40 elapsed")
    assert "left" not in lines[-1]


def test_a_short_job_prints_nothing_off_a_terminal():
    out, clock = io.StringIO(), Clock()
    with Progress(3, "loglikelihood", every=10.0, stream=out, clock=clock) as progress:
        for _ in range(3):
            clock.now += 1.0
            progress.update(1)
    assert out.getvalue() == ""


def test_unknown_total_and_disabled():
    out, clock = io.StringIO(), Clock()
    progress = Progress(None, "perplexity", unit="documents", every=5.0, stream=out, clock=clock)
    clock.now += 6
    progress.update(2, tokens=600)
    assert out.getvalue().startswith("perplexity: 2 documents, 100 tokens/s, 00:06 elapsed")
    quiet = io.StringIO()
    off = Progress(10, "x", every=0.0, stream=quiet, enabled=False, clock=clock)
    off.update(5)
    off.close()
    assert quiet.getvalue() == ""


def test_a_bar_on_a_terminal():
    term = Terminal()
    with Progress(8, "loglikelihood", stream=term) as progress:
        for _ in range(8):
            progress.update(1, tokens=10)
    text = term.getvalue()
    assert "loglikelihood" in text and "8/8" in text and "\r" in text  # tqdm redraws in place


def test_adapter_reports_progress_while_scoring(capsys):
    pytest.importorskip("lm_eval")
    from blackmamba.eval import lm_eval_adapter
    from blackmamba.tokenizer import neox_tokenizer

    from ..helpers import tiny_model

    lm = lm_eval_adapter.BlackMambaLM(model=tiny_model(vocab_size=50304), tokenizer=neox_tokenizer(), batch_size=2)
    lm.progress_every = 0.0  # a line after every batch
    reqs = [SimpleNamespace(args=("The sky is", f" blue {i}")) for i in range(5)]
    lm.loglikelihood(reqs)
    lm.loglikelihood_rolling([SimpleNamespace(args=("Once upon a time there was a fox.",))])
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal: plain lines
    assert re.search(r"^loglikelihood: 2/5 requests \(40\.0%\), [\d,]+ tokens/s", err, re.M)
    assert re.search(r"^loglikelihood: 5/5 requests \(100\.0%\)", err, re.M)
    assert re.search(r"^loglikelihood_rolling: 1/1 requests", err, re.M)
