"""Hostile values for every option of ``blackmamba generate`` and every argument of ``generate()``.

Each bad command line must end with exactly one ``error:`` line, exit code 1 (or argparse's 2), nothing on
stdout and no traceback; each bad Python call must raise GenerationError (a BlackMambaError and a
ValueError), never a TypeError or a raw torch error. A fast subset lives in tests/cli/test_cli.py and
tests/generation/test_generation.py.
"""

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from blackmamba import save_pretrained, stream_generate
from blackmamba.cli import main
from blackmamba.errors import BlackMambaError
from blackmamba.generation import GenerationError, TextStreamer
from blackmamba.tokenizer import train_bpe

from ..helpers import tiny_model

pytestmark = pytest.mark.hostile

REPO = Path(__file__).resolve().parents[2]

BAD_FLOATS = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "", "abc", "1,5", "0x1p3"]
BAD_INTS = ["", "abc", "1.5", "nan", "inf", "1e3", "0x10"]

BAD_VALUES = {
    "--temperature": [*BAD_FLOATS, "-1", "-1e-300"],
    "--top-p": [*BAD_FLOATS, "0", "-0.0", "1.0000001", "2"],
    "--repetition-penalty": [*BAD_FLOATS, "0", "-0.0", "-1"],
    "--top-k": [*BAD_INTS, "0", "-1", str(-(10**30))],
    "--max-new-tokens": [*BAD_INTS, "-1", "1000001", str(10**40)],
    "--seed": [*BAD_INTS, "-1", str(2**64), str(10**50)],
    "--prefill-chunk-size": [*BAD_INTS, "0", "-1"],
    "--threads": [*BAD_INTS, "0", "-1", str(10**9)],
    "--stop": ["", "\\", "a\\", "\\q", "\\x", "\\x4g", "\\uD800", "\\U00110000", "\\u12", "\udcff", "ok\ud800"],
    "--prompt": ["", "\udcff", "\ud800", "abc\udc80def"],
    "--device": ["tpu", "", "cpu:0:1", "cuda:x", "meta"],
    "--dtype": ["int8", "", "float64x"],
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_bpe([f"hostile input number {i} with some words" for i in range(30)], 300)
    model = tiny_model(0, vocab_size=512, tokenizer_vocab_size=tokenizer.get_vocab_size())
    return save_pretrained(model, tmp_path_factory.mktemp("hostile") / "tiny", tokenizer=tokenizer)


def run_main(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, out, err, expected_codes=(1, 2)):
    assert code in expected_codes, (code, err)
    assert out == ""
    assert "Traceback" not in err
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    if code == 1:
        assert err.startswith("error:") and err.count("\n") == 1


CASES = [(option, value) for option, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("option,value", CASES, ids=[f"{o}={v!r}" for o, v in CASES])
def test_each_bad_option_is_one_clean_error(capsys, model_dir, option, value):
    argv = ["generate", "--model", str(model_dir), "--prompt", "hostile", f"{option}={value}"]
    if option == "--prompt":
        argv = ["generate", "--model", str(model_dir), f"--prompt={value}"]
    code, out, err = run_main(capsys, argv)
    assert_clean_error(code, out, err)
    if code == 1 and option != "--device":
        assert option in err  # the message names the option


def test_random_combinations_of_bad_options(capsys, model_dir):
    rng = random.Random(0)
    for _ in range(150):
        options = rng.sample(sorted(BAD_VALUES), rng.randint(2, 5))
        argv = ["generate", "--model", str(model_dir)]
        if "--prompt" not in options:
            argv += ["--prompt", "hostile"]
        argv += [f"{option}={rng.choice(BAD_VALUES[option])}" for option in options]
        assert_clean_error(*run_main(capsys, argv))


@pytest.mark.parametrize("model", ["nowhere", "", "/dev/null", "."])
def test_bad_model_paths(capsys, tmp_path, model):
    path = tmp_path / model if model == "nowhere" else model
    assert_clean_error(*run_main(capsys, ["generate", "--model", str(path), "--prompt", "x"]), expected_codes=(1,))


def test_global_threads_before_the_command(capsys, model_dir):
    for value in ("0", "-3", "x", str(10**12)):
        argv = [f"--threads={value}", "generate", "--model", str(model_dir), "--prompt", "x"]
        assert_clean_error(*run_main(capsys, argv), expected_codes=(2,))


@pytest.mark.parametrize("option", ["--prompt", "--stop"])
@pytest.mark.parametrize("raw", [b"caf\xe9", b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"])
def test_non_utf8_bytes_in_argv(model_dir, option, raw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "blackmamba", "generate", "--model", str(model_dir), "--prompt", "x", option, raw]
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert result.returncode == 1
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.startswith(f"error: {option} is not valid UTF-8") and err.count("\n") == 1


BAD_API = {
    "max_new_tokens": [-1, 10**7, 2.5, "8", None, float("nan"), True],
    "temperature": [float("nan"), float("inf"), -1.0, -1e-300, "0.5", None, 10**400, [1.0]],
    "top_k": [0, -1, 2.5, "3", float("nan"), True],
    "top_p": [0.0, -0.1, 1.5, float("nan"), float("inf"), "0.9", True],
    "repetition_penalty": [0.0, -1.0, float("nan"), float("-inf"), "1.2"],
    "prompts": [[], [[]], "text", [1, 2], [[1, -1]], [[1, 10**6]], [[1, 1.0]], [[1, None]], [b"ab"], None],
}


def generate(model, prompts, max_new_tokens, **options):
    """stream_generate run to the end (``generate`` itself iterates ``prompts`` before checking them)."""
    return list(stream_generate(model, prompts, max_new_tokens, **options))


def test_generate_api_rejects_every_bad_argument_with_generation_error():
    model = tiny_model()
    good = dict(prompts=[[1, 2]], max_new_tokens=2)
    for name, values in BAD_API.items():
        for value in values:
            with pytest.raises(GenerationError) as info:
                generate(model, **(good | {name: value}))
            assert isinstance(info.value, BlackMambaError) and isinstance(info.value, ValueError)
            assert info.value.option == name


def test_generate_api_random_combinations():
    model = tiny_model()
    rng = random.Random(1)
    names = sorted(BAD_API)
    for combo in itertools.islice(itertools.combinations(names, 2), 30):
        kwargs = dict(prompts=[[1, 2]], max_new_tokens=2) | {n: rng.choice(BAD_API[n]) for n in combo}
        with pytest.raises(GenerationError):
            generate(model, **kwargs)


@pytest.mark.parametrize("stop", ["", None, 3, b"\n", "\n", [""], ["ok", 5]])
def test_text_streamer_rejects_bad_stop_strings(stop):
    tokenizer = train_bpe(["a b c"], 260)
    with pytest.raises(GenerationError):
        TextStreamer(tokenizer, stop)
