"""Generation latency against length, through :func:`blackmamba.generate` (the same path a user takes).

For each length n the model generates n tokens greedily after the same prompt, one sequence, and the wall
time of the whole call (prefill + n steps) is taken after a warm-up call (which compiles and, on a GPU,
captures the decode step's CUDA graphs). An attention model's KV cache is sized to the run
(``max_seq_len`` = prompt + n, as gpt-fast sizes its static cache), so its steps cost what that length
needs and no more; Mamba's state is the same size at any length.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch

from ..config import BlackMambaConfig
from ..generation import generate
from ..model import BlackMamba


def with_capacity(model: BlackMamba, positions: int) -> BlackMamba:
    """``model`` itself, or for a model with attention blocks the same weights (shared, not copied) in a
    model whose KV caches hold ``positions`` positions."""
    if "attention" not in model.config.layer_pattern or model.config.max_seq_len == positions:
        return model
    config = BlackMambaConfig.from_dict({**model.config.to_dict(), "max_seq_len": positions})
    with torch.device("meta"):
        sized = BlackMamba(config)
    sized.load_state_dict(model.state_dict(), assign=True)
    return sized.train(model.training)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model: BlackMamba, prompt: Sequence[int], new_tokens: int, repeats: int = 1) -> float:
    """Median wall seconds of generating ``new_tokens`` tokens after ``prompt`` (after one warm-up call)."""
    sized = with_capacity(model, len(prompt) + new_tokens)
    generate(sized, [list(prompt)], min(new_tokens, 4))
    times = []
    for _ in range(repeats):
        _sync(model.device)
        start = time.perf_counter()
        out = generate(sized, [list(prompt)], new_tokens)
        _sync(model.device)
        times.append(time.perf_counter() - start)
        if len(out[0]) != new_tokens:
            raise RuntimeError(f"generated {len(out[0])} tokens, asked for {new_tokens}")
    return statistics.median(times)


def latency_curve(
    model: BlackMamba, prompt: Sequence[int], lengths: Sequence[int], repeats: int = 1
) -> dict[int, float]:
    """{n: seconds to generate n tokens} for each length."""
    return {n: time_generation(model, prompt, n, repeats) for n in lengths}
