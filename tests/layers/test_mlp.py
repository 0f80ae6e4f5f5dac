"""The dense MLP of the dense baselines is one MoE expert without the router: same weights, same activation,
the MoE's output is the MLP's times the gate; its step is its forward on one token; all of it is active."""

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.layers import MLP, MoE

from ..conftest import randomize


def dense_and_moe(activation: str) -> tuple[MLP, MoE]:
    base = dict(vocab_size=64, d_model=24, d_ff=20, moe_activation=activation)
    torch.manual_seed(0)
    mlp = randomize(BlackMamba(BlackMambaConfig(**base, layer_pattern=["mlp"]))).layers[0].mixer
    moe = randomize(BlackMamba(BlackMambaConfig(**base, layer_pattern=["moe"], n_experts=1)), 1).layers[0].mixer
    with torch.no_grad():
        moe.w1.copy_(mlp.fc1.weight[None])
        moe.w2.copy_(mlp.fc2.weight[None])
    return mlp.eval(), moe.eval()


@pytest.mark.parametrize("activation", ["gelu", "silu", "gelu_tanh"])
def test_mlp_is_one_expert_without_the_gate(activation):
    mlp, moe = dense_and_moe(activation)
    x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, stats = mlp(x)
        routed, _ = moe(x)
        gate = torch.sigmoid(moe.router_logits(x.reshape(-1, 24))).reshape(2, 7, 1)
    assert stats is None
    torch.testing.assert_close(routed, gate * dense, rtol=1e-5, atol=1e-5)


def test_step_is_the_forward_on_one_token():
    mlp, _ = dense_and_moe("gelu")
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(mlp.step(x, mlp.allocate_cache(5)), mlp(x[:, None])[0][:, 0], rtol=0, atol=0)
    assert mlp.allocate_cache(5) is None  # no decode state


def test_every_mlp_parameter_is_active():
    config = BlackMambaConfig(vocab_size=64, d_model=24, d_ff=20, layer_pattern=["mamba", "mlp"])
    with torch.device("meta"):
        model = BlackMamba(config)
    assert model.num_parameters(active=True) == model.num_parameters()
    assert model.num_parameters(active=True, embedding=False) == model.num_parameters() - 64 * 24
