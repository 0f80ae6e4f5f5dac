"""The command line, run in-process through ``blackmamba.cli.main`` (plus one real ``python -m`` run)."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blackmamba.generation as generation
from blackmamba import BlackMamba, BlackMambaConfig, cast_model, cli, generate, load_pretrained, save_pretrained
from blackmamba.checkpoint import checkpoint_size, save_released
from blackmamba.cli import main, unescape
from blackmamba.tokenizer import load_tokenizer, train_bpe

from ..helpers import randomize

REPO = Path(__file__).resolve().parents[2]
PROMPT = "the old river"

WORDS = (
    "the old river runs past a quiet town where seven bakers sell warm bread every morning and the "
    "children walk to school along the bank singing songs about boats birds rain and summer while "
    "a grey heron waits in the reeds for fish the miller counts his sacks of flour the ferryman "
    "rows across with baskets of apples pears and plums and in the evening lamps glow in small "
    "windows as the wind turns cold and the stars come out over the hills beyond the bridge"
).split()


def training_texts(n_lines=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(n_lines)]


def build_model(vocab_size, tokenizer_vocab_size=None, d_model=32, seed=0):
    config = BlackMambaConfig.from_preset(
        "tiny", vocab_size=vocab_size, d_model=d_model, tokenizer_vocab_size=tokenizer_vocab_size
    )
    torch.manual_seed(seed)
    return randomize(BlackMamba(config), seed).eval()


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments):
    assert code == 1
    assert err.startswith("error:")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(training_texts(), 512)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    size = tokenizer.get_vocab_size()
    assert 257 < size <= 512
    model = build_model(512, tokenizer_vocab_size=size)
    return save_pretrained(model, tmp_path_factory.mktemp("cli") / "tiny", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def greedy_text(model_dir, tokenizer):
    """The greedy continuation of PROMPT (24 tokens) computed through the Python API."""
    model = load_pretrained(model_dir)
    new = generate(model, [tokenizer.encode(PROMPT).ids], 24, eos_token_id=0)[0]
    return new, tokenizer.decode(new)


# ------------------------------------------------------------------------------------------ generate


def test_generate_greedy_matches_the_api(capsys, model_dir, greedy_text):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 24)
    assert code == 0
    assert out.startswith(PROMPT)
    assert out == PROMPT + greedy_text[1] + "\n"
    assert len(out) > len(PROMPT) + 1
    assert f"[{len(greedy_text[0])} tokens in" in err


def test_stream_prints_the_same_text(capsys, model_dir):
    args = ("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 24)
    code, plain, _ = run(capsys, *args)
    code_s, streamed, _ = run(capsys, *args, "--stream")
    assert code == code_s == 0
    assert streamed == plain


def test_sampling_with_a_seed_is_reproducible(capsys, model_dir):
    args = ("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 24, "--temperature", 0.8)
    first = run(capsys, *args, "--seed", 1)
    second = run(capsys, *args, "--seed", 1)
    other = run(capsys, *args, "--seed", 2)
    assert first[0] == second[0] == other[0] == 0
    assert first[1] == second[1]
    assert first[1].startswith(PROMPT)
    assert other[1] != first[1]


def boundary_stop(tokenizer, new, text):
    """A two-character stop string made of the last character of token k and the first of token k+1."""
    for k in range(2, len(new) - 1):
        head = tokenizer.decode(new[:k])
        nxt = tokenizer.decode(new[: k + 1])
        if not text.startswith(nxt) or len(nxt) <= len(head) or "\ufffd" in (head[-1], nxt[len(head)]):
            continue
        stop = head[-1] + nxt[len(head)]
        if text.find(stop) == len(head) - 1:
            return stop
    pytest.skip("no token boundary usable as a stop string in this output")


def test_stop_cuts_the_output(capsys, model_dir, tokenizer, greedy_text):
    new, text = greedy_text
    stop = boundary_stop(tokenizer, new, text)
    code, out, err = run(
        capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 24, "--stop", stop
    )
    assert code == 0
    assert out == PROMPT + text[: text.find(stop)] + "\n"
    assert stop not in out
    n_tokens = int(err.split("[")[1].split()[0])
    assert n_tokens < len(new)  # generation stopped early


def test_stream_with_stop_prints_the_same_text(capsys, model_dir, tokenizer, greedy_text):
    new, text = greedy_text
    stop = boundary_stop(tokenizer, new, text)
    args = ("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 24, "--stop", stop)
    _, plain, _ = run(capsys, *args)
    _, streamed, _ = run(capsys, *args, "--stream")
    assert streamed == plain


def test_max_new_tokens_zero_prints_the_prompt(capsys, model_dir):
    code, out, _ = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 0)
    assert code == 0
    assert out == PROMPT + "\n"


# ------------------------------------------------------------------ generate: options, stops, signals


def escaped(text):
    """``text`` written with \\uXXXX escapes only, as a user would type it for --stop."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def test_stop_reads_backslash_escapes(capsys, model_dir, tokenizer, greedy_text):
    new, text = greedy_text
    stop = boundary_stop(tokenizer, new, text)
    args = ("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 24)
    _, plain, _ = run(capsys, *args, "--stop", stop)
    code, out, _ = run(capsys, *args, "--stop", escaped(stop))
    assert code == 0 and out == plain == PROMPT + text[: text.find(stop)] + "\n"


@pytest.mark.parametrize(
    "raw,value",
    [
        (r"\n\n", "\n\n"),
        (r"a\tb", "a\tb"),
        (r"\\n", "\\n"),
        (r"\u00e9t\u00C9", "étÉ"),
        (r"\x41\U0001F642", "A🙂"),
        (r"\"q\'", "\"q'"),
        ("plain ü", "plain ü"),
    ],
)
def test_unescape(raw, value):
    assert unescape(raw, "--stop") == value


@pytest.mark.parametrize("raw", ["\\", "ab\\", r"\q", r"\x4", r"\uZZZZ", r"\ud800", r"\U00110000"])
def test_bad_escapes_are_one_line_errors(capsys, model_dir, raw):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--stop", raw)
    assert_one_line_error(code, out, err, "--stop")
    assert out == ""


@pytest.fixture
def scripted(monkeypatch, tokenizer):
    """Replace the model's output by the tokens of a given text (then an optional KeyboardInterrupt)."""

    def script(text, interrupt_after=None):
        ids = tokenizer.encode(text).ids

        def fake_stream_generate(model, prompts, max_new_tokens, **options):
            for n, token in enumerate(ids[:max_new_tokens]):
                if n == interrupt_after:
                    raise KeyboardInterrupt
                yield [token]

        monkeypatch.setattr(generation, "stream_generate", fake_stream_generate)
        return ids

    return script


def test_blank_line_stop_as_a_shell_passes_it(capsys, model_dir, scripted):
    scripted("the river\n\nthe town")
    for stream in ([], ["--stream"]):
        argv = ("generate", "--model", model_dir, "--prompt", "A", "--stop", r"\n\n", *stream)
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert out == "Athe river\n"


def test_ctrl_c_prints_the_partial_output_and_exits_130(capsys, model_dir, tokenizer, scripted):
    ids = scripted("the old river runs past a quiet town", interrupt_after=4)
    for stream in ([], ["--stream"]):
        code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "A", *stream)
        assert code == 130
        assert err == "interrupted\n"
        assert out == "A" + tokenizer.decode(ids[:4]) + "\n"


def run_cli_process(*argv, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "blackmamba", *map(os.fsencode, argv)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_sigint_during_a_long_generation_exits_130_without_traceback(model_dir):
    argv = ("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 1_000_000, "--ignore-eos")
    # A runner that ignores SIGINT (a background job of a non-interactive shell) passes that on to its
    # children, and Python then keeps ignoring it: give the CLI the default disposition a terminal gives it.
    proc = run_cli_process(
        *(str(a) for a in argv),
        "--stream",
        "--threads",
        "1",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    shown = b""
    while len(shown) < len(PROMPT) + 20:  # generation is under way
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, proc.stderr.read().decode()
        shown += chunk
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.decode() == "interrupted\n"
    assert (shown + out).startswith(PROMPT.encode()) and (shown + out).endswith(b"\n")


def test_closed_stdout_ends_quietly_with_141(model_dir):
    argv = ("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 100_000, "--ignore-eos")
    proc = run_cli_process(*(str(a) for a in argv), "--stream", "--threads", "1")
    assert os.read(proc.stdout.fileno(), 5)  # like `| head -c 5`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == b""


@pytest.mark.parametrize("prompt", ["caf\udce9", "\ud800x"])
def test_non_utf8_prompt_in_process(capsys, model_dir, prompt):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", prompt)
    assert_one_line_error(code, out, err, "--prompt", "UTF-8")


@pytest.mark.parametrize(
    "option,value,fragment",
    [
        ("--temperature", "nan", "temperature"),
        ("--temperature", "inf", "temperature"),
        ("--temperature", "-0.5", "temperature"),
        ("--repetition-penalty", "nan", "repetition_penalty"),
        ("--repetition-penalty", "-inf", "repetition_penalty"),
        ("--repetition-penalty", "0", "repetition_penalty"),
        ("--top-p", "nan", "top_p"),
        ("--top-p", "0", "top_p"),
        ("--top-k", "-3", "top_k"),
        ("--top-k", "0", "top_k"),
        ("--max-new-tokens", "1000001", "1,000,000"),
        ("--max-new-tokens", str(10**30), "1,000,000"),
        ("--seed", "-1", "--seed"),
        ("--seed", str(2**64), "--seed"),
        ("--prefill-chunk-size", "0", "--prefill-chunk-size"),
        ("--stop", "", "--stop"),
    ],
)
def test_bad_generate_options_are_one_line_errors(capsys, model_dir, option, value, fragment):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, f"{option}={value}")
    assert_one_line_error(code, out, err, option, fragment, value if value else "empty")


def test_threads_apply_during_the_command_only(monkeypatch, model_dir):
    seen = []
    monkeypatch.setattr(cli, "cmd_info", lambda args: seen.append(torch.get_num_threads()))
    monkeypatch.setattr(cli, "cmd_generate", lambda args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    assert main(["--threads", str(target), "info", str(model_dir)]) == 0
    assert main(["generate", "--model", str(model_dir), "--prompt", PROMPT, "--threads", str(target)]) == 0
    assert seen == [target, target]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "-2", "x", str(10**9)])
def test_bad_threads_is_an_argparse_error(capsys, value):
    with pytest.raises(SystemExit) as info:
        main(["--threads", value, "info", "somewhere"])
    assert info.value.code == 2
    assert "--threads" in capsys.readouterr().err


def test_default_threads_backs_off_on_a_busy_machine(monkeypatch):
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(cli, "_busy_cpus", lambda: 0.2)
    assert cli.default_threads() == 4
    monkeypatch.setattr(cli, "_busy_cpus", lambda: 2.7)
    assert cli.default_threads() == 1
    monkeypatch.setattr(cli, "_busy_cpus", lambda: 9.0)
    assert cli.default_threads() == 1
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 64)
    monkeypatch.setattr(cli, "_busy_cpus", lambda: 0.0)
    assert cli.default_threads() == 4  # never above torch's own default


def test_busy_cpus_reads_proc_stat():
    busy = cli._busy_cpus(0.01)
    assert 0.0 <= busy <= cli._usable_cpus() + 0.01 or not os.path.exists("/proc/stat")


def test_file_system_errors_name_the_path(capsys, monkeypatch):
    def fail(args):
        raise PermissionError(13, "Permission denied", "/x/config.json")

    monkeypatch.setattr(cli, "cmd_info", fail)
    assert_one_line_error(*run(capsys, "info", "somewhere"), "error: /x/config.json: Permission denied")


@pytest.mark.parametrize("error", [ZeroDivisionError("bug"), ValueError("bug"), RuntimeError("bug")])
def test_unexpected_exceptions_keep_their_traceback(monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_info", fail)
    with pytest.raises(type(error)):
        main(["info", "somewhere"])


def test_demo_max_new_tokens_is_checked_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr(cli, "cmd_demo", lambda args: pytest.fail("the demo ran"))
    assert_one_line_error(*run(capsys, "demo", "--max-new-tokens", -5), "--max-new-tokens")


# ------------------------------------------------------------------------------------------ info


def info_rows(out):
    rows = {}
    for line in out.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def expected_counts(path):
    with torch.device("meta"):
        model = BlackMamba(BlackMambaConfig.from_json(Path(path) / "config.json"))
    return f"{model.num_parameters():,}", f"{model.num_parameters(active=True):,}"


def test_info_on_our_layout(capsys, model_dir):
    code, out, err = run(capsys, "info", model_dir)
    assert code == 0 and err == ""
    rows = info_rows(out)
    total, active = expected_counts(model_dir)
    assert rows["layout"] == "ours"
    assert rows["total parameters"] == total
    assert rows["active parameters"].startswith(active + " ")
    assert total != active
    assert rows["layer pattern"] == "[mamba, moe] x 2"
    assert rows["dtype"] in ("float32", "f32")
    assert rows["size on disk"] == f"{checkpoint_size(model_dir) / 2**20:,.1f} MiB"


def test_info_on_released_layout(capsys, tmp_path):
    model = cast_model(build_model(512, d_model=64), torch.bfloat16)
    save_released(model, tmp_path / "rel")
    code, out, _ = run(capsys, "info", tmp_path / "rel")
    assert code == 0
    rows = info_rows(out)
    assert rows["layout"] == "released"
    assert rows["total parameters"] == f"{model.num_parameters():,}"
    assert rows["active parameters"].startswith(f"{model.num_parameters(active=True):,} ")
    assert rows["dtype"] == "bfloat16"
    assert rows["d_model / d_inner / d_state"] == "64 / 128 / 8"
    assert rows["size on disk"] == f"{checkpoint_size(tmp_path / 'rel') / 2**20:,.1f} MiB"


def test_info_counts_every_block_kind(capsys, tmp_path):
    config = BlackMambaConfig.from_preset(
        "tiny", vocab_size=512, layer_pattern=["attention", "mlp", "mamba", "moe", "attention", "moe"], n_heads=2
    )
    save_pretrained(randomize(BlackMamba(config), 0), tmp_path / "mixed")
    code, out, _ = run(capsys, "info", tmp_path / "mixed")
    assert code == 0
    assert info_rows(out)["blocks"] == "6 (1 Mamba + 2 MoE + 2 attention + 1 MLP)"


def test_info_dtype_is_spelled_the_same_for_both_layouts(capsys, tmp_path):
    model = cast_model(build_model(512), torch.bfloat16)
    save_pretrained(model, tmp_path / "ours")
    code, out, _ = run(capsys, "info", tmp_path / "ours")
    assert code == 0
    assert info_rows(out)["dtype"] == "bfloat16"


# ------------------------------------------------------------------------------------------ convert


def test_convert_both_directions(capsys, model_dir, tmp_path):
    code, out, _ = run(capsys, "convert", model_dir, tmp_path / "rel")
    assert code == 0 and "released" in out
    assert sorted(os.listdir(tmp_path / "rel"))[:2] == ["config.json", "pytorch_model.bin"]
    assert "mamba_moe_layers" in json.loads((tmp_path / "rel" / "config.json").read_text())
    code, out, _ = run(capsys, "convert", tmp_path / "rel", tmp_path / "ours", "--to", "ours")
    assert code == 0 and "ours" in out
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    code, info_src, _ = run(capsys, "info", model_dir)
    for path in (tmp_path / "rel", tmp_path / "ours"):
        code, out, _ = run(capsys, "info", path)
        assert code == 0
        assert info_rows(out)["total parameters"] == info_rows(info_src)["total parameters"]
    original, converted = load_pretrained(model_dir), load_pretrained(tmp_path / "ours")
    for key, value in original.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


def test_generate_after_converting_a_neox_vocab_model(capsys, tmp_path):
    """A released-layout checkpoint with the released vocabulary uses the GPT-NeoX tokenizer, before
    and after conversion, and both give the same greedy text."""
    save_released(build_model(50304, d_model=16), tmp_path / "rel")
    args = ("--prompt", "The capital of France is", "--max-new-tokens", 8)
    code, from_released, err = run(capsys, "generate", "--model", tmp_path / "rel", *args)
    assert code == 0, err
    assert from_released.startswith("The capital of France is")
    assert run(capsys, "convert", tmp_path / "rel", tmp_path / "ours")[0] == 0
    code, from_ours, _ = run(capsys, "generate", "--model", tmp_path / "ours", *args)
    assert code == 0
    assert from_ours == from_released


def test_generate_after_converting_to_released_keeps_the_tokenizer(capsys, model_dir, tmp_path):
    assert run(capsys, "convert", model_dir, tmp_path / "rel")[0] == 0
    args = ("--prompt", PROMPT, "--max-new-tokens", 8)
    code, out, err = run(capsys, "generate", "--model", tmp_path / "rel", *args)
    assert code == 0, err
    assert out == run(capsys, "generate", "--model", model_dir, *args)[1]


def test_converting_a_small_vocab_released_model_attaches_no_unusable_tokenizer(capsys, tmp_path):
    save_released(build_model(512), tmp_path / "rel")
    assert run(capsys, "convert", tmp_path / "rel", tmp_path / "ours")[0] == 0
    tokenizer_file = tmp_path / "ours" / "tokenizer.json"
    if tokenizer_file.is_file():
        assert load_tokenizer(tmp_path / "ours", 512).get_vocab_size() <= 512


# ------------------------------------------------------------------------------------------ errors


def test_error_missing_model_dir(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--model", tmp_path / "nope", "--prompt", PROMPT)
    assert_one_line_error(code, out, err, "does not exist")
    assert_one_line_error(*run(capsys, "info", tmp_path / "nope"), "does not exist")


def test_error_empty_prompt(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", "")
    assert_one_line_error(code, out, err, "prompt")
    assert out == ""


def test_error_corrupt_checkpoint(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bad / name).write_bytes((model_dir / name).read_bytes())
    data = (model_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, out, err = run(capsys, "generate", "--model", bad, "--prompt", PROMPT)
    assert_one_line_error(code, out, err, "model.safetensors", "truncated or corrupt")
    code, out, err = run(capsys, "convert", bad, tmp_path / "out")
    assert_one_line_error(code, out, err, "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_error_negative_max_new_tokens(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", -1)
    assert_one_line_error(code, out, err, "--max-new-tokens")


@pytest.mark.parametrize("device", ["tpu9", "cpu:x"])
def test_error_bad_device(capsys, model_dir, device):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--device", device)
    assert_one_line_error(code, out, err, "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_error_cuda_without_gpu(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--device", "cuda")
    assert_one_line_error(code, out, err, "cuda")


def test_error_meta_device(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--device", "meta")
    assert_one_line_error(code, out, err, "--device")


def test_error_bad_sampling_option(capsys, model_dir):
    code, out, err = run(capsys, "generate", "--model", model_dir, "--prompt", PROMPT, "--top-p", 1.5)
    assert_one_line_error(code, out, err, "top_p")


def test_argparse_errors_exit_2(capsys, model_dir):
    for argv in (["generate", "--model", str(model_dir)], ["info"], ["generate", "--dtype", "int8"], ["bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_help_via_python_m():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "blackmamba", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for command in ("generate", "info", "convert"):
        assert command in result.stdout
    assert "Traceback" not in result.stderr
