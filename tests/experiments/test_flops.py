"""FLOPs per token of all four kinds, counted from the layer pattern: the matmul terms equal what torch's
FLOP counter measures on a real forward, attention's context term equals the reference's count, decode
FLOPs grow with the position for attention only, and `blackmamba flops` prints the four models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blackmamba import BlackMamba, BlackMambaConfig
from blackmamba.config import LIMITS
from blackmamba.experiments import matched_configs
from blackmamba.layers.attention import attention_ref
from blackmamba.training.flops import decode_flops, flops_per_token, generation_flops_per_token

from ..checkpoint.common import run_cli

BASE = BlackMambaConfig(vocab_size=256, d_model=32, layer_pattern=["mamba", "moe"] * 2, d_state=8, n_experts=4, d_ff=48)
CONFIGS = matched_configs(BASE, head_dim=16)


def not_matmul(c: BlackMambaConfig, keys: float) -> float:
    """The counted terms that are no matmul: the conv and scan of Mamba, attention's scores and sum."""
    mamba = c.layer_pattern.count("mamba") * (2 * c.d_inner * c.d_conv + 9 * c.d_inner * c.d_state)
    return mamba + c.layer_pattern.count("attention") * 4 * c.n_heads * c.head_dim * keys


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_matmul_flops_equal_torchs_flop_counter(kind):
    config = CONFIGS[kind]
    model = BlackMamba(config).eval()
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(ids)
    measured = counter.get_total_flops() / ids.numel()
    assert measured == flops_per_token(config, 16)["forward"] - not_matmul(config, (16 + 1) / 2)


def test_attention_context_term_is_what_the_reference_computes():
    c = CONFIGS["transformer"]
    q = torch.randn(1, c.n_heads, 1, c.head_dim)
    k = torch.randn(1, c.n_heads, 37, c.head_dim)
    counter = FlopCounterMode(display=False)
    with counter:
        attention_ref(q, k, k, torch.ones(1, 1, 1, 37, dtype=torch.bool))
    per_layer = decode_flops(c, 36) - decode_flops(c, 35)  # one more key
    assert counter.get_total_flops() * c.layer_pattern.count("attention") == 37 * per_layer


def test_decode_and_generation_flops():
    for kind, c in CONFIGS.items():
        grows = decode_flops(c, 1000) - decode_flops(c, 10)
        assert (grows > 0) == ("attention" in c.layer_pattern), kind
        mean = sum(decode_flops(c, p) for p in range(7, 7 + 50)) / 50
        assert generation_flops_per_token(c, 7, 50) == pytest.approx(mean, rel=1e-12)
        assert flops_per_token(c, 64)["train"] == 3 * flops_per_token(c, 64)["forward"]
    with pytest.raises(ValueError):
        generation_flops_per_token(CONFIGS["mamba"], 7, 0)


def test_flops_command_prints_the_four_models(tmp_path):
    code, out, err = run_cli("flops", "--preset", "small", "--seq-len", "1024")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "same active params" in line or "(this config)" in line]
    assert [r.split(",")[0].split(" (")[0] for r in rows] == [
        "BlackMamba",
        "dense Mamba",
        "transformer",
        "transformer-MoE",
    ]
    config_file = tmp_path / "transformer.json"
    CONFIGS["transformer"].to_json(config_file)
    code, out, err = run_cli("flops", "--config", config_file)
    assert code == 0, err
    assert out.splitlines()[2].startswith("transformer (this config)")
    assert "BlackMamba, same active params" in out


def test_a_config_at_its_bounds_still_gets_its_own_row(tmp_path):
    """The dense baseline of a config whose d_ff is at its upper bound would need a wider MLP than the bound
    allows: that row is left out, the others are printed."""
    config = BlackMambaConfig.from_preset("tiny", d_ff=LIMITS["d_ff"])
    config.to_json(tmp_path / "wide.json")
    code, out, err = run_cli("flops", "--config", tmp_path / "wide.json")
    assert code == 0, err
    assert "BlackMamba (this config)" in out and "dense Mamba" not in out
