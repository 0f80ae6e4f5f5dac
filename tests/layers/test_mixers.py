"""Both mixer kinds share one interface (allocate_cache, forward, step, norm_step), and a mixer's decode
step continues its forward exactly: prefill part of a sequence, step through the rest, equal the forward."""

import pytest
import torch

from blackmamba.layers import MambaMixer, Mixer, MoE
from blackmamba.model import Block

from ..helpers import assert_close, tiny_model


@pytest.mark.parametrize("index,kind", [(0, MambaMixer), (1, MoE)])
def test_step_continues_the_forward(index, kind):
    mixer = tiny_model().layers[index].mixer
    assert isinstance(mixer, kind) and isinstance(mixer, Mixer)
    x = torch.randn(2, 9, mixer.config.d_model if kind is MoE else mixer.in_proj.in_features)
    with torch.no_grad():
        full, _ = mixer(x)
        cache = mixer.allocate_cache(2)
        part, _ = mixer(x[:, :4], cache)
        steps = [mixer.step(x[:, t], cache) for t in range(4, 9)]
    assert_close("prefill then steps", full, torch.cat([part, torch.stack(steps, 1)], 1), torch.float32)
    assert (cache is None) == (kind is MoE)  # the MoE keeps no decode state


@pytest.mark.parametrize("index", [0, 1])
def test_block_step_is_the_mixers_norm_step(index):
    """Block.step delegates to its mixer's norm_step (the MoE fuses routing into the norm there): the
    residual stream and the output equal the block's forward on one position."""
    block = tiny_model().layers[index]
    assert isinstance(block, Block)
    residual, delta = torch.randn(3, 1, block.norm.weight.shape[0]), torch.randn(3, 1, block.norm.weight.shape[0])
    with torch.no_grad():
        r_full, out_full, _ = block(residual, delta, block.mixer.allocate_cache(3))
        r_step, out_step = block.step(residual[:, 0], delta[:, 0], block.mixer.allocate_cache(3))
    assert_close("residual", r_full[:, 0], r_step, "exact")
    assert_close("output", out_full[:, 0], out_step, torch.float32)
