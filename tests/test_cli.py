"""The command line, run in-process through ``blackmamba.cli.main`` (plus one real ``python -m`` run)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, cast_model, generate, load_pretrained, save_pretrained
from blackmamba.checkpoint import checkpoint_size, save_released
from blackmamba.cli import main
from blackmamba.tokenizer import load_tokenizer, train_bpe

from .conftest import randomize

REPO = Path(__file__).resolve().parents[1]
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
