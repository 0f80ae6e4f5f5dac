"""Fixtures of the server tests: a tiny random model with its own small BPE saved to disk, and servers on
free loopback ports in background threads (each stops by itself at the end of its module)."""

from __future__ import annotations

import random

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, load_pretrained, save_pretrained
from blackmamba.tokenizer import train_bpe

from ..helpers import randomize

WORDS = (
    "the old river runs past a quiet town where seven bakers sell warm bread every morning and the children "
    "walk to school along the bank singing songs about boats birds rain and summer while a grey heron waits"
).split()
INTERVAL = 16  # prompt-cache grid (and prefill chunk) used by the test servers: several chunks per prompt


def texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe(texts(), 400)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    size = tokenizer.get_vocab_size()
    config = BlackMambaConfig.from_preset("tiny", vocab_size=512, d_model=32, tokenizer_vocab_size=size)
    torch.manual_seed(0)
    model = randomize(BlackMamba(config), 3).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("serve") / "tiny", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def model(model_dir):
    """The served model as offline generation sees it (loaded from the same files)."""
    return load_pretrained(model_dir)


def start_server(model_dir, **overrides):
    from blackmamba.serve import ServeOptions, ServerThread

    options = dict(
        model=str(model_dir), port=0, log_level="warning", max_batch=8, prompt_cache_interval=INTERVAL, device="cpu"
    )
    options.update(overrides)
    return ServerThread(ServeOptions(**options)).start(timeout=120)
