"""config.json is untrusted: wrong types, out-of-bound sizes, deep nesting and non-objects are each a
ConfigError naming the field (a CheckpointError naming the file inside a checkpoint), raised before anything
is allocated, in our layout, in the released 12-field layout, and through `blackmamba flops --config`."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, CheckpointError, ConfigError, load_pretrained
from blackmamba.config import LIMITS, MAX_CONFIG_BYTES, MAX_PARAMETERS, PRESETS, parameter_count

from .common import assert_refused, make_ours, make_released, run_cli, write_json

TINY = BlackMambaConfig.from_preset("tiny").to_dict()
RELEASED = {
    "num_layers": 4,
    "hidden_size": 64,
    "state_size": 16,
    "conv_dimension": 4,
    "vocab_size": 512,
    "expansion_factor": 2,
    "mamba_moe_layers": ["r", "8", "r", "8"],
    "ffn_hidden_size": 96,
    "bias": False,
    "add_bias_linear": False,
    "swiglu": True,
    "max_sequence_length": 2048,
}

# One representative bad value per kind of mistake; the hostile suite tries every field with every kind.
BAD_OURS = [
    ("d_model", "x"),
    ("d_model", True),
    ("d_model", 32.0),
    ("d_model", 0),
    ("d_model", -8),
    ("d_model", LIMITS["d_model"] + 1),
    ("vocab_size", 10**30),
    ("expand", None),
    ("d_state", [16]),
    ("n_experts", 0),
    ("d_ff", {"a": 1}),
    ("max_seq_len", LIMITS["max_seq_len"] + 1),
    ("sinkhorn_max_iters", 10**9),
    ("initializer_range", "x"),
    ("initializer_range", -0.1),
    ("dt_min", "a"),
    ("dt_min", 0),
    ("dt_max", float("nan")),
    ("norm_eps", float("inf")),
    ("norm_eps", False),
    ("sinkhorn_tol", -1),
    ("z_loss_weight", "0.1"),
    ("conv_bias", "yes"),
    ("conv_bias", 1),
    ("moe_activation", ["gelu"]),
    ("moe_activation", "relu"),
    ("train_routing", 3),
    ("tokenizer_vocab_size", "256"),
    ("tokenizer_vocab_size", 257),
    ("layer_pattern", "mamba"),
    ("layer_pattern", []),
    ("layer_pattern", ["mamba", 1]),
    ("layer_pattern", None),
    ("layer_pattern", ["mamba", "moe"] * 513),
    ("dt_rank", "4"),
]


@pytest.mark.parametrize("field, value", BAD_OURS, ids=[f"{f}={v!r:.20}" for f, v in BAD_OURS])
def test_bad_value_in_our_config_names_the_field(tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        BlackMambaConfig.from_dict({**TINY, field: value})
    file = write_json(tmp_path / "config.json", {**TINY, field: value})
    with pytest.raises(ConfigError, match=f"{file}: .*'{field}'"):
        BlackMambaConfig.from_json(file)
    assert_refused(tmp_path, "flops", "--config", file, fragments=(field,))


@pytest.mark.parametrize("field", ["d_model", "initializer_range", "layer_pattern"])
def test_bad_value_in_a_checkpoint_config(tmp_path, field):
    path = make_ours(tmp_path / "ckpt")
    write_json(path / "config.json", {**TINY, field: "x"})
    with pytest.raises(CheckpointError, match=f"config.json: .*'{field}'"):
        load_pretrained(path)
    assert_refused(tmp_path, "info", path, fragments=("config.json", field))
    assert_refused(tmp_path, "convert", path, tmp_path / "out", fragments=("config.json", field))


BAD_RELEASED = [
    ("num_layers", 10**6, "num_layers"),
    ("num_layers", "4", "num_layers"),
    ("num_layers", 0, "num_layers"),
    ("hidden_size", 64.5, "hidden_size"),
    ("hidden_size", True, "hidden_size"),
    ("vocab_size", -1, "vocab_size"),
    ("ffn_hidden_size", None, "ffn_hidden_size"),
    ("state_size", "16", "state_size"),
    ("conv_dimension", 10**9, "conv_dimension"),
    ("expansion_factor", [2], "expansion_factor"),
    ("max_sequence_length", 0, "max_sequence_length"),
    ("mamba_moe_layers", "r8r8", "mamba_moe_layers"),
    ("mamba_moe_layers", ["r", True, "r", "8"], "mamba_moe_layers[1]"),
    ("mamba_moe_layers", ["r", None, "r", "8"], "mamba_moe_layers[1]"),
    ("mamba_moe_layers", ["r"] * 10**6, "mamba_moe_layers"),
    ("add_bias_linear", "no", "add_bias_linear"),
    ("swiglu", 0, "swiglu"),
]


@pytest.mark.parametrize("field, value, fragment", BAD_RELEASED, ids=[f"{f}={v!r:.20}" for f, v, _ in BAD_RELEASED])
def test_bad_value_in_a_released_config_names_the_field(tmp_path, field, value, fragment):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        BlackMambaConfig.from_released({**RELEASED, field: value})
    assert time.perf_counter() - start < 1.0  # refused before anything is built
    path = make_released(tmp_path / "rel", d_model=64, vocab_size=512)
    write_json(path / "config.json", {**RELEASED, field: value})
    assert_refused(tmp_path, "info", path, fragments=("config.json", fragment))


def test_million_layer_config_fails_at_once(tmp_path):
    file = write_json(tmp_path / "big.json", {**TINY, "layer_pattern": ["mamba"] * 10**6})
    start = time.perf_counter()
    assert_refused(tmp_path, "flops", "--config", file, fragments=("layer_pattern", "1024"))
    assert time.perf_counter() - start < 2.0


def test_sizes_within_their_bounds_that_multiply_past_the_total_are_refused(tmp_path):
    huge = {**TINY, "d_model": 65536, "n_experts": 1024, "d_ff": 2**20, "layer_pattern": ["moe"] * 8}
    with pytest.raises(ConfigError, match="parameters, above the supported"):
        BlackMambaConfig.from_dict(huge)
    assert_refused(tmp_path, "flops", "--config", write_json(tmp_path / "c.json", huge), fragments=("parameters",))


@pytest.mark.parametrize("field", sorted(set(LIMITS) - {"n_layers"}))
def test_every_upper_bound_itself_is_accepted(field):
    config = BlackMambaConfig.from_dict({**TINY, field: LIMITS[field]})
    assert getattr(config, field) == LIMITS[field]
    assert parameter_count(config) <= MAX_PARAMETERS


def test_longest_layer_pattern_is_accepted():
    assert BlackMambaConfig.from_dict({**TINY, "layer_pattern": ["mamba"] * LIMITS["n_layers"]}).n_layers == 1024


@pytest.mark.parametrize(
    "config",
    [BlackMambaConfig.from_preset(name) for name in sorted(PRESETS)]
    + [
        BlackMambaConfig(
            vocab_size=300, d_model=48, layer_pattern=["moe", "mamba", "mamba"], dt_rank=5, n_experts=3, d_ff=40
        ),
        BlackMambaConfig(vocab_size=100, d_model=24, layer_pattern=["mamba"], conv_bias=False, d_conv=3, expand=3),
    ],
)
def test_parameter_count_equals_the_built_model(config):
    with torch.device("meta"):
        assert parameter_count(config) == BlackMamba(config).num_parameters()


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
        ("[1, 2, 3]", "must be a JSON object, got list"),
        ("3", "must be a JSON object, got int"),
        ('"text"', "must be a JSON object, got str"),
        ("null", "must be a JSON object, got NoneType"),
        ("", "not valid JSON"),
        ('{"vocab_size": 1' + "0" * 5000 + "}", "not valid JSON"),
    ],
)
def test_config_file_that_is_not_a_config_object(tmp_path, text, fragment):
    file = tmp_path / "config.json"
    file.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        BlackMambaConfig.from_json(file)
    assert_refused(tmp_path, "flops", "--config", file, fragments=(str(file), fragment))
    path = make_ours(tmp_path / "ckpt")
    (path / "config.json").write_text(text)
    assert_refused(tmp_path, "info", path, fragments=("config.json", fragment))


def test_deep_nesting_given_as_text():
    with pytest.raises(ConfigError, match="nested too deeply"):
        BlackMambaConfig.from_json('{"a":' + "[" * 100_000 + "]" * 100_000 + "}")


def test_config_file_not_utf8_or_too_large(tmp_path):
    bad = tmp_path / "latin.json"
    bad.write_bytes(b'{"d_model": "\xff"}')
    assert_refused(tmp_path, "flops", "--config", bad, fragments=("not UTF-8",))
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)
    assert_refused(tmp_path, "flops", "--config", big, fragments=("not a config file",))


# ------------------------------------------------------------------------------------------ flops


@pytest.mark.parametrize("seq_len", ["0", "-3", str(2**24 + 1)])
def test_flops_refuses_a_sequence_length_out_of_range(tmp_path, seq_len):
    assert_refused(tmp_path, "flops", "--preset", "tiny", "--seq-len", seq_len, fragments=("--seq-len",))


def test_flops_reads_a_checkpoint_folder_and_labels_its_active_count(tmp_path):
    path = make_ours(tmp_path / "ckpt")
    code, out, err = run_cli("flops", "--config", path)
    assert code == 0, err
    assert "embedding excluded" in out
    code, info, _ = run_cli("info", path)
    rows = {line[:28].strip(): line[28:].strip() for line in info.splitlines()}
    assert "embedding included" in rows["active parameters"]
    no_embedding = rows["active, no embedding"].split()[0]
    config = BlackMambaConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = BlackMamba(config)
    assert no_embedding == f"{model.num_parameters(active=True, embedding=False):,}"
    ours_row = next(line for line in out.splitlines() if line.startswith("BlackMamba"))
    assert no_embedding in ours_row  # the same number, labelled the same way, in both commands
    active = int(rows["active parameters"].split()[0].replace(",", ""))
    assert active - int(no_embedding.replace(",", "")) == math.prod(model.embedding.weight.shape)


def test_released_config_round_trip_still_exact():
    config = BlackMambaConfig.from_released(RELEASED)
    assert BlackMambaConfig.from_released(config.to_released()) == config
    assert json.loads(json.dumps(config.to_released())) == RELEASED
