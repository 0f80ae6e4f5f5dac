"""A saved folder loads with trust_remote_code=True in a process where blackmamba.hf was never imported (the
folder's own configuration and modeling files run), and is refused there without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from .test_modeling import IDS

SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, trust = sys.argv[1], sys.argv[2] == "1"
try:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust)
except ValueError as e:
    print(json.dumps({"error": str(e)}))
    raise SystemExit(0)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(ids).logits
out = model.generate(ids[:1], max_new_tokens=5, do_sample=False, eos_token_id=None)
print(json.dumps({
    "hf_imported": "blackmamba.hf" in sys.modules,
    "class_module": type(model).__module__,
    "logits": logits.tolist(),
    "generated": out[0, ids.shape[1]:].tolist(),
    "tokens": tok("the cat")["input_ids"],
}))
"""


def run(folder, trust: bool, tmp_path) -> dict:
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder), "1" if trust else "0", json.dumps(IDS.tolist())],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_trust_remote_code_loads_without_blackmamba_hf(dirs, model, tokenizer, tmp_path):
    result = run(dirs["hf"], True, tmp_path)
    assert result["hf_imported"] is False
    assert result["class_module"].startswith("transformers_modules.")  # the folder's own modeling file
    with torch.no_grad():
        assert torch.equal(torch.tensor(result["logits"]), model(IDS).logits)
    import blackmamba

    assert result["generated"] == blackmamba.generate(model, [IDS[0].tolist()], 5)[0]
    assert result["tokens"] == tokenizer.encode("the cat").ids


def test_without_trust_remote_code_it_is_refused(dirs, tmp_path):
    result = run(dirs["hf"], False, tmp_path)
    assert "trust_remote_code" in result["error"] or "blackmamba" in result["error"]
