"""``blackmamba-lm-eval``: lm-eval's own models stay available next to ours (``--model hf`` once failed with
"Unknown model" because registering ours left lm-eval's registry non-empty, so it never loaded its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[2]

# A fresh interpreter, so nothing imported by other tests has filled lm-eval's registry already; lm-eval's own
# command line is replaced by a look-up of both models.
SCRIPT = """
import lm_eval.__main__
from lm_eval.api.registry import get_model

def cli_evaluate():
    print(get_model("hf").__name__, get_model("blackmamba").__name__)

lm_eval.__main__.cli_evaluate = cli_evaluate
from blackmamba.eval import harness
harness.main(["--tasks", "piqa"])
"""


def test_hf_and_blackmamba_models_are_both_registered():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["HFLM", "BlackMambaLM"]
