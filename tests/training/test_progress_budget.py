"""What a user sees: progress lines off a terminal, a warning for a warmup the run never leaves, and a time
budget that covers the whole run (evaluation, checkpoint and plots included)."""

from __future__ import annotations

import io
import re
import time

from blackmamba.training.trainer import _Progress, train

from .helpers import losses, tiny_args

LINE = re.compile(r"^step (\d+)/(\d+) \(\d+%\)  loss \d+\.\d{4}  lr \S+  [\d,]+ tok/s  elapsed \S+  eta \S+$")


def test_progress_lines_off_a_terminal(data_dir, tmp_path, capsys):
    train(tiny_args(data_dir, tmp_path / "every", max_steps=4, progress=True, progress_every=0.0))
    lines = [line for line in capsys.readouterr().err.splitlines() if LINE.match(line)]
    assert [LINE.match(line).group(1, 2) for line in lines] == [("1", "4"), ("2", "4"), ("3", "4"), ("4", "4")]
    train(tiny_args(data_dir, tmp_path / "sparse", max_steps=6, progress=True, progress_every=3600.0))
    err = capsys.readouterr().err
    steps = [LINE.match(line).group(1) for line in err.splitlines() if LINE.match(line)]
    assert steps == ["1", "6"]  # the first and the last; the interval is never reached in between
    assert "step 6: validation loss" in err and "saved" in err
    train(tiny_args(data_dir, tmp_path / "quiet", max_steps=2, warmup=1, progress=False))
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_not_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    progress = _Progress(True, total=3, initial=0, every=0.0, stream=out)
    assert progress.mode == "bar"
    for step in (1, 2, 3):
        progress.update(step, 2.0, 1e-3, 1000.0)
    progress.close()
    assert "3/3" in out.getvalue() and not LINE.search(out.getvalue())


def test_a_warmup_longer_than_the_run_warns(data_dir, tmp_path, capsys):
    train(tiny_args(data_dir, tmp_path / "long", max_steps=4, warmup=10))
    err = capsys.readouterr().err
    assert "warning: the run (4 steps) ends before its warmup (--warmup 10) is over" in err
    assert "at most 0.0012 (--lr 0.003)" in err
    train(tiny_args(data_dir, tmp_path / "short", max_steps=4, warmup=2))
    assert "warmup" not in capsys.readouterr().err


def test_the_time_budget_covers_the_whole_run(data_dir, tmp_path, capsys):
    """The whole call, evaluations and final checkpoint included, ends within the budget plus a little
    (scheduling noise on a busy machine), and the run equals a --max-steps run of the fitted length."""
    run, minutes = tmp_path / "run", 0.15
    args = dict(eval_every=5, eval_tokens=512)
    t0 = time.monotonic()
    summary = train(tiny_args(data_dir, run, max_steps=None, max_minutes=minutes, save_every=5, **args))
    elapsed = time.monotonic() - t0
    assert elapsed < 60 * minutes + 4.0
    assert 2 <= summary["step"] <= summary["max_steps"]
    assert summary["checkpoint"].endswith(f"step-{summary['step']:08d}")
    fixed = tmp_path / "fixed"
    train(tiny_args(data_dir, fixed, max_steps=summary["max_steps"], save_every=10**6, **args))
    assert losses(run) == losses(fixed)[: summary["step"]]


def test_a_budget_too_small_to_mean_anything_warns(data_dir, tmp_path, capsys):
    summary = train(tiny_args(data_dir, tmp_path / "run", max_steps=None, max_minutes=0.001, eval_tokens=512))
    assert summary["max_steps"] < 20 and summary["step"] >= 1
    assert "too few for a meaningful result" in capsys.readouterr().err
