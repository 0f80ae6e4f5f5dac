"""Options stated once: ``blackmamba train`` derived from TrainArgs, options from a file (``--args-file``),
help text on every option of every subcommand, and ``eval`` folded into the one parser."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

import blackmamba.training.trainer as trainer
from blackmamba.cli import build_parser, main
from blackmamba.options import OptionsFileError, option, option_specs, read_options_file
from blackmamba.training.trainer import TrainArgs

REQUIRED = ["--data", "d", "--out", "o"]


def subparsers(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every (sub)command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, (*path, name))


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def sub(*path: str) -> argparse.ArgumentParser:
    return dict(subparsers(build_parser()))[path]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 1, err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture
def captured(monkeypatch):
    """Replace train() by a recorder of the TrainArgs the command line made."""
    seen: list[TrainArgs] = []
    monkeypatch.setattr(trainer, "train", lambda args: seen.append(args) or {"step": 0})
    return seen


def test_every_option_of_every_command_has_help():
    for path, parser in subparsers(build_parser()):
        for flag, action in options_of(parser).items():
            assert action.help and action.help != argparse.SUPPRESS, f"blackmamba {' '.join(path)} {flag}"
            assert action.help.strip() == action.help and len(action.help) > 8, (path, flag, action.help)


def test_every_train_arg_has_exactly_one_flag_with_its_help():
    options = options_of(sub("train"))
    by_dest = {}
    for flag, action in options.items():
        by_dest.setdefault(action.dest, []).append(flag)
    for spec in option_specs(TrainArgs):
        assert by_dest.get(spec.name) == [spec.flag], spec.name
        assert options[spec.flag].help.startswith(spec.help)
    assert set(by_dest) == {f.name for f in dataclasses.fields(TrainArgs)} | {"args_file"}


def test_train_flags_keep_their_names_and_kinds():
    options = options_of(sub("train"))
    assert isinstance(options["--no-progress"], argparse._StoreFalseAction)
    assert isinstance(options["--no-plots"], argparse._StoreFalseAction)
    assert isinstance(options["--compile"], argparse._StoreTrueAction)
    assert options["--dtype"].choices == ("auto", "float32", "bfloat16")
    assert options["--data"].required and options["--out"].required
    assert options["--max-steps"].type is int and options["--max-minutes"].type is float
    assert options["--min-lr"].help.endswith("(default: --lr / 10)")  # a default the help already explains
    assert options["--batch-size"].help.endswith("(default 16)")  # the default shown is TrainArgs'
    group = next(g for g in sub("train")._mutually_exclusive_groups)
    assert [a.option_strings for a in group._group_actions] == [["--preset"], ["--config"]]


def test_the_parsed_defaults_are_trainargs_defaults(captured, capsys):
    assert main(["train", *REQUIRED, "--preset", "tiny", "--max-steps", "3"]) == 0
    assert captured == [TrainArgs(data="d", out="o", preset="tiny", max_steps=3)]


def test_flags_reach_trainargs(captured):
    argv = ["train", *REQUIRED, "--config", "c.json", "--max-minutes", "2.5", "--lr", "1e-4", "--compile"]
    assert main([*argv, "--no-progress", "--no-plots", "--dtype", "bfloat16", "--seed", "9"]) == 0
    args = captured[0]
    assert (args.config, args.max_minutes, args.lr, args.compile) == ("c.json", 2.5, 1e-4, True)
    assert (args.progress, args.plots, args.dtype, args.seed, args.preset) == (False, False, "bfloat16", 9, None)


def test_trainargs_checks_fire_for_command_line_input(capsys, captured):
    assert_one_line_error(*run(capsys, "train", *REQUIRED, "--preset", "tiny", "--max-steps", 0)[::2], "--max-steps")
    assert_one_line_error(*run(capsys, "train", *REQUIRED, "--preset", "tiny")[::2], "--max-steps or --max-minutes")
    assert captured == []


def test_missing_required_option_is_still_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "d", "--max-steps", "1"])
    assert info.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ --args-file


def test_args_file_json_with_flags_overriding(tmp_path, captured):
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps({"data": "d", "out": "o", "preset": "tiny", "max_steps": 5, "lr": 1e-3, "compile": True})
    )
    assert main(["train", "--args-file", str(path), "--max-steps", "7", "--out", "elsewhere"]) == 0
    args = captured[0]
    assert (args.data, args.out, args.max_steps, args.lr, args.compile) == ("d", "elsewhere", 7, 1e-3, True)
    assert args.batch_size == TrainArgs(data="d", out="o", max_steps=1).batch_size  # not in the file: the default


def test_args_file_toml_takes_dashed_or_underscored_names(tmp_path, captured):
    path = tmp_path / "run.toml"
    path.write_text('data = "d"\nout = "o"\ninit-from = "ckpt"\nmax_minutes = 2\nprogress = false\nwarmup = 0\n')
    assert main(["train", f"--args-file={path}", "--warmup", "3"]) == 0
    args = captured[0]
    assert (args.init_from, args.max_minutes, args.progress, args.warmup) == ("ckpt", 2, False, 3)


def test_args_file_leaves_the_parser_as_built(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "d", "out": "o", "seq_len": 64}))
    parser = build_parser()
    assert parser.parse_args(["train", "--args-file", str(path)]).seq_len == 64
    assert parser.parse_args(["train", *REQUIRED]).seq_len == 256
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d"])  # --out is required again


@pytest.mark.parametrize(
    "content,suffix,fragments",
    [
        ({"data": "d", "bogus": 1, "max_step": 3}, ".json", ["unknown options 'bogus', 'max_step'", "max_steps"]),
        ({"seq_len": "256"}, ".json", ["seq_len must be a int", "'256'"]),
        ({"batch_size": True}, ".json", ["batch_size must be a int"]),
        ({"lr": "fast"}, ".json", ["lr must be a finite number"]),
        ({"compile": 1}, ".json", ["compile must be true or false"]),
        ({"dtype": "float16"}, ".json", ["dtype must be one of auto, float32, bfloat16"]),
        ({"data": None}, ".json", ["data cannot be null"]),
        ([1, 2], ".json", ["expected an object of options, got list"]),
        ("{not json", ".json", ["not valid JSON"]),
        ("data = ", ".toml", ["not valid TOML"]),
        ({"max_steps": 3, "max-steps": 4}, ".json", ["max_steps is given twice"]),
    ],
)
def test_bad_args_file_is_one_error_naming_the_file(tmp_path, capsys, captured, content, suffix, fragments):
    path = tmp_path / f"run{suffix}"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert_one_line_error(*run(capsys, "train", "--args-file", path, *REQUIRED)[::2], str(path), *fragments)
    assert captured == []


def test_missing_args_file_is_one_error(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "train", "--args-file", tmp_path / "no.json")[::2], "no.json", "cannot read")


def test_trainargs_checks_fire_for_file_input(tmp_path, capsys, captured):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"data": "d", "out": "o", "preset": "tiny", "max_steps": 0}))
    assert_one_line_error(*run(capsys, "train", "--args-file", path)[::2], "--max-steps must be at least 1")


def test_read_options_file_checks_types_against_the_fields(tmp_path):
    @dataclasses.dataclass
    class Opts:
        n: int | None = option(None, "a count")
        x: float = option(1.0, "a number")

    path = tmp_path / "o.json"
    path.write_text('{"n": null, "x": 3}')
    assert read_options_file(path, Opts) == {"n": None, "x": 3}
    path.write_text('{"x": NaN}')
    with pytest.raises(OptionsFileError, match="x must be a finite number"):
        read_options_file(path, Opts)


# ------------------------------------------------------------------------------------------ eval


EVAL_OPTIONS_BEFORE = {
    "--model": (None, True),
    "--tasks": (None, False),
    "--perplexity": (None, False),
    "--limit": (None, False),
    "--max-tokens": (None, False),
    "--batch-size": (8, False),
    "--device": ("auto", False),
    "--dtype": ("auto", False),
    "--out": (None, False),
    "--plot": (None, False),
}


def test_eval_keeps_its_options():
    options = options_of(sub("eval"))
    assert {flag: (a.default, a.required) for flag, a in options.items()} == EVAL_OPTIONS_BEFORE
    assert options["--dtype"].choices == ["auto", "float32", "bfloat16", "float16"]
    assert options["--limit"].type is float and options["--max-tokens"].type is int


def test_eval_maps_its_options_to_run_evaluation(monkeypatch, capsys):
    import blackmamba.eval.cli as eval_cli

    calls = []
    monkeypatch.setattr(eval_cli, "run_evaluation", lambda *a, **k: calls.append((a, k)))
    argv = ["eval", "--model", "m", "--tasks", "paper", "--limit", "0.5", "--batch-size", "4", "--out", "r.json"]
    assert main(argv) == 0
    assert calls == [
        (
            ("m", "paper", None),
            dict(limit=0.5, max_tokens=None, batch_size=4, device="auto", dtype="auto", out="r.json", plot=None),
        )
    ]


def test_eval_option_errors_are_one_line(capsys):
    assert_one_line_error(*run(capsys, "eval", "--model", "m")[::2], "--tasks", "--perplexity")
    assert_one_line_error(
        *run(capsys, "eval", "--model", "m", "--tasks", "paper", "--max-tokens", 5)[::2], "--max-tokens"
    )
