"""CPU default dtype: "auto" keeps the stored dtype on the CPU (the released bf16 weights stay bf16, half
the memory of fp32), bf16 on a GPU; the device fallback of the lm-eval adapter."""

from __future__ import annotations

import pytest
import torch

from blackmamba import generate, load_pretrained, save_pretrained
from blackmamba.devices import resolve_device, resolve_dtype
from blackmamba.model import FP32_PARAMS, cast_model

from ..helpers import tiny_model


def test_auto_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) is None  # as stored
    assert resolve_dtype(None, torch.device("cpu")) is None
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    assert resolve_dtype(torch.float16, torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_cpu_auto_loads_the_stored_dtype(stored, tmp_path):
    model = cast_model(tiny_model(), stored)
    path = save_pretrained(model, tmp_path / "ckpt")
    cpu = torch.device("cpu")
    loaded = load_pretrained(path, device=cpu, dtype=resolve_dtype("auto", cpu))
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(FP32_PARAMS) else stored), name
    forced = load_pretrained(path, device=cpu, dtype=resolve_dtype("float32", cpu))
    assert forced.embedding.weight.dtype == torch.float32
    ids = torch.randint(1, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits.float())
        if stored == torch.bfloat16:  # bf16 arithmetic against fp32 on the same bf16 weights: close
            ref, got = forced(ids).logits, loaded(ids).logits.float()
            assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
            assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # Decoding through the recurrent cache runs in the loaded dtype too.
    (tokens,) = generate(loaded, [ids[0, :8].tolist()], 6)
    assert len(tokens) == 6 and all(0 <= t < model.config.vocab_size for t in tokens)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.warns(UserWarning, match="using the CPU"):
        assert resolve_device("cuda", cpu_fallback=True) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")
