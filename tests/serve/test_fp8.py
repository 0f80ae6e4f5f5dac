"""An fp8 checkpoint (``convert --quantize fp8``) through every stage that loads one: the server, the
``generate`` command and ``eval``'s perplexity, each against offline computation on the same loaded model."""

from __future__ import annotations

import contextlib
import io

import openai
import pytest
import torch

from blackmamba import convert, generate, load_pretrained
from blackmamba.cli import main
from blackmamba.eval.cli import run_perplexity
from blackmamba.eval.perplexity import run_model_perplexity
from blackmamba.layers.quant import Fp8MoE
from blackmamba.tokenizer import eos_token_id

from .conftest import INTERVAL, start_server, texts

PROMPT = "the old river runs past a quiet town"


@pytest.fixture(scope="module")
def fp8_dir(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "tiny-fp8"
    convert(model_dir, path, quantize="fp8")
    return path


@pytest.fixture(scope="module")
def fp8_model(fp8_dir):
    model = load_pretrained(fp8_dir)
    assert isinstance(model.layers[1].mixer, Fp8MoE)
    return model


def test_server_on_an_fp8_checkpoint_equals_offline_generation(fp8_dir, fp8_model, tokenizer):
    server = start_server(fp8_dir, max_model_len=256)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        ids = tokenizer.encode(PROMPT).ids
        want = tokenizer.decode(generate(fp8_model, [ids], 10, prefill_chunk_size=INTERVAL, eos_token_id=0)[0])
        r = client.completions.create(model="tiny-fp8", prompt=PROMPT, max_tokens=10, temperature=0)
        assert r.choices[0].text == want and r.usage.completion_tokens == 10
    finally:
        server.stop()


def test_generate_command_on_an_fp8_checkpoint(fp8_dir, fp8_model, tokenizer):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["generate", "--model", str(fp8_dir), "--prompt", PROMPT, "--max-new-tokens", "8", "--ignore-eos"])
    assert code == 0
    ids = tokenizer.encode(PROMPT).ids
    assert out.getvalue() == PROMPT + tokenizer.decode(generate(fp8_model, [ids], 8)[0]) + "\n"


def test_perplexity_of_an_fp8_checkpoint(fp8_dir, fp8_model, model, tokenizer, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(texts(8, seed=5)))
    result = run_perplexity(fp8_dir, str(text), print_table=False)

    def encode(t: str) -> list[int]:
        return tokenizer.encode(t, add_special_tokens=False).ids

    eos = eos_token_id(tokenizer) or 0
    with torch.no_grad():
        want = run_model_perplexity(fp8_model, [text.read_text()], encode, eos)
        plain = run_model_perplexity(model, [text.read_text()], encode, eos)
    assert result.n_tokens == want.n_tokens > 100
    assert result.loss == pytest.approx(want.loss, rel=1e-6)
    assert result.loss != plain.loss and result.loss == pytest.approx(plain.loss, rel=0.05)
