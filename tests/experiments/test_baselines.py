"""The four models of the paper's comparison are one config with four layer patterns, matched in active
parameters per token to within half a step of the one width solved for (d_ff)."""

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.config import PRESETS as MODEL_PRESETS
from blackmamba.experiments import KINDS, active_parameters, kind_of, matched_config, matched_configs
from blackmamba.experiments.paper import model_configs
from blackmamba.experiments.presets import PRESETS

BASES = {
    "small": BlackMambaConfig.from_preset("small"),
    "blackmamba-1.5b": BlackMambaConfig.from_preset("blackmamba-1.5b"),
    **{f"experiment {name}": model_configs(p, 4096, ("blackmamba",))["blackmamba"] for name, p in PRESETS.items()},
}


@pytest.mark.parametrize("name", list(BASES))
def test_active_parameters_match_across_the_four(name):
    base = BASES[name]
    target = active_parameters(base)
    configs = matched_configs(base)
    for kind, config in configs.items():
        mixer, channel = KINDS[kind]
        assert config.layer_pattern == [mixer if k == "mamba" else channel for k in base.layer_pattern]
        assert kind_of(config) == kind
        # One more unit of d_ff adds 3 D parameters per channel-mixer block: the rounding leaves at most half.
        step = 3 * config.d_model * config.layer_pattern.count(channel)
        assert abs(active_parameters(config) - target) <= step / 2, kind
        assert abs(active_parameters(config) - target) / target < 0.002
        assert config.d_model == base.d_model and config.n_layers == base.n_layers
        assert config.vocab_size == base.vocab_size
    assert configs["blackmamba"] == base
    with torch.device("meta"):
        for config in configs.values():
            assert active_parameters(config) == BlackMamba(config).num_parameters(active=True, embedding=False)


def test_attention_width_is_the_nearest_whole_number_of_heads():
    base = BASES["small"]
    config = matched_config(base, "transformer", head_dim=32)
    with torch.device("meta"):
        mamba_mixer = sum(p.numel() for p in BlackMamba(base).layers[0].mixer.parameters())
    per_head = 4 * base.d_model * 32
    assert config.head_dim == 32
    assert abs(config.n_heads * per_head - mamba_mixer) <= per_head / 2
    assert matched_config(config, "transformer") == config  # a base with attention keeps its heads
    assert matched_config(config, "transformer-moe").n_heads == config.n_heads


def test_a_dense_base_gets_experts_and_back():
    dense = BlackMambaConfig(vocab_size=512, d_model=64, layer_pattern=["mamba", "mlp"] * 2, n_experts=0, d_ff=200)
    moe = matched_config(dense, "blackmamba")
    assert moe.n_experts == 8 and moe.layer_pattern == ["mamba", "moe"] * 2
    assert abs(active_parameters(moe) - active_parameters(dense)) <= 3 * 64
    assert matched_config(moe, "mamba").d_ff == dense.d_ff


def test_unknown_kind_and_patterns_without_a_kind():
    base = BASES["small"]
    with pytest.raises(ValueError, match="unknown model kind"):
        matched_config(base, "rnn")
    assert kind_of(BlackMambaConfig.from_dict({**base.to_dict(), "layer_pattern": ["mamba", "moe", "mamba"]})) == (
        "blackmamba"
    )
    assert kind_of(BlackMambaConfig.from_dict({**base.to_dict(), "layer_pattern": ["mamba"]})) is None
    assert all(kind_of(BlackMambaConfig.from_preset(name)) == "blackmamba" for name in MODEL_PRESETS)
