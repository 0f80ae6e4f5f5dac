"""``lm_eval --model hf --model_args pretrained=DIR`` runs a task on an exported folder (offline task data) and
gives the log-likelihoods of this package's own lm-eval model."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

import blackmamba  # noqa: E402
import blackmamba.hf  # noqa: E402
from blackmamba.eval import harness  # noqa: E402
from blackmamba.eval.lm_eval_adapter import BlackMambaLM  # noqa: E402
from blackmamba.tokenizer import neox_tokenizer  # noqa: E402

from ..helpers import tiny_model  # noqa: E402


def test_lm_eval_hf_model_on_an_exported_folder(tmp_path, monkeypatch):
    import lm_eval.models  # noqa: F401  (lm-eval's own models, "hf" among them, into its registry)

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    model = tiny_model(vocab_size=50304)
    blackmamba.save_pretrained(model, tmp_path / "ours")  # no tokenizer.json: GPT-NeoX-20B
    folder = blackmamba.hf.export(tmp_path / "ours", tmp_path / "hf")
    args = ["run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32", "--tasks", "piqa"]
    args += ["--limit", "6", "--device", "cpu", "--batch_size", "4", "--log_samples"]
    harness.main([*args, "--output_path", str(tmp_path / "out")])
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "hf" and results["n-samples"]["piqa"]["effective"] == 6
    assert 0 <= results["results"]["piqa"]["acc,none"] <= 1
    [samples_file] = (tmp_path / "out").rglob("samples_piqa_*.jsonl")
    requests, scores = [], []
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            requests.append(SimpleNamespace(args=(args["arg_0"], args["arg_1"])))
            scores.append(float(resp[0][0]))
    ours = BlackMambaLM(model=model, tokenizer=neox_tokenizer(), batch_size=4).loglikelihood(requests)
    assert len(scores) == 12 and len(set(scores)) == 12
    assert [value for value, _ in ours] == pytest.approx(scores, rel=1e-5)
