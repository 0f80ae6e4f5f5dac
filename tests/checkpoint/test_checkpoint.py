"""Checkpoints: save/load round trips (ours, sharded, released layout), conversion, bad files, atomic
writes, config JSON, and the released models' parameter counts."""

import json
import math
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import blackmamba.checkpoint as ckpt
from blackmamba import (
    BlackMamba,
    BlackMambaConfig,
    CheckpointError,
    ConfigError,
    cast_model,
    convert,
    load_pretrained,
    save_pretrained,
    save_released,
)
from blackmamba.config import PRESETS

from ..helpers import randomize

FP32_NAMES = ("mixer.A_log", "mixer.D", "mixer.dt_proj.bias")

# The released 12-field config.json of a small synthetic model (spec section 2.1 field set).
SMALL_RELEASED = {
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


def released_config(num_layers, hidden, ffn):
    return {
        "num_layers": num_layers,
        "hidden_size": hidden,
        "state_size": 16,
        "conv_dimension": 4,
        "vocab_size": 50304,
        "expansion_factor": 2,
        "mamba_moe_layers": ["r", "8"] * (num_layers // 2),
        "ffn_hidden_size": ffn,
        "bias": False,
        "add_bias_linear": False,
        "swiglu": True,
        "max_sequence_length": 2048,
    }


RELEASED_1_5B = released_config(30, 1152, 3072)
RELEASED_2_8B = released_config(36, 1472, 3872)


# ------------------------------------------------------------------------------------------ helpers


def random_model(config=None, seed=0, dtype=None):
    torch.manual_seed(seed)
    model = randomize(BlackMamba(config or BlackMambaConfig.from_preset("tiny")), seed).eval()
    if dtype is not None:
        cast_model(model, dtype)
    return model


def logits_of(model, seed=1, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, length), generator=g)
    with torch.inference_mode():
        return model(ids).logits.float()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_same_model(a, b):
    assert a.config == b.config
    assert_same_weights(a, b)
    assert (logits_of(a) - logits_of(b)).abs().max().item() == 0


def hand_released_state(cfg, seed=0):
    """A released-layout state dict written out from the key table of spec section 3.3 (bf16)."""
    d = cfg["hidden_size"]
    di = cfg["expansion_factor"] * d
    n = cfg["state_size"]
    k = cfg["conv_dimension"]
    r = math.ceil(d / 16)
    f = cfg["ffn_hidden_size"]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, offset=0.0):
        return (offset + scale * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    sd = OrderedDict()
    sd["embedding.word_embeddings.weight"] = rnd(cfg["vocab_size"], d, scale=1.0)
    for i, code in enumerate(cfg["mamba_moe_layers"]):
        p = f"decoder.layers.{i}."
        sd[p + "norm.weight"] = rnd(d, scale=0.1, offset=1.0)
        if code == "r":
            sd[p + "mixer.in_proj.weight"] = rnd(2 * di, d)
            sd[p + "mixer.conv1d.weight"] = rnd(di, 1, k, scale=0.4)
            sd[p + "mixer.conv1d.bias"] = rnd(di)
            sd[p + "mixer.x_proj.weight"] = rnd(r + 2 * n, di)
            sd[p + "mixer.dt_proj.weight"] = rnd(di, r, scale=0.4)
            sd[p + "mixer.dt_proj.bias"] = rnd(di, scale=0.5, offset=-3.0)
            sd[p + "mixer.A_log"] = (torch.rand(di, n, generator=g) * 2.5).to(torch.bfloat16)
            sd[p + "mixer.D"] = rnd(di, scale=0.1, offset=1.0)
            sd[p + "mixer.out_proj.weight"] = rnd(d, di)
        else:
            experts = int(code)
            sd[p + "mixer.router.weight"] = rnd(experts, d, scale=0.5)
            sd[p + "mixer.router.bias"] = rnd(experts)
            for e in range(experts):
                sd[p + f"mixer.local_experts.{e}.linear_fc1.weight"] = rnd(2 * f, d)
                sd[p + f"mixer.local_experts.{e}.linear_fc2.weight"] = rnd(d, f)
    sd["decoder.final_layernorm.weight"] = rnd(d, scale=0.1, offset=1.0)
    sd["decoder.final_layernorm.bias"] = rnd(d)
    return sd


def write_released(path, cfg, state):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save({"model": state}, path / "pytorch_model.bin")
    return path


def raw_released(path):
    return torch.load(Path(path) / "pytorch_model.bin", map_location="cpu", weights_only=True)["model"]


def assert_load_fails(path, *fragments, error=CheckpointError):
    model = None
    with pytest.raises(error) as info:
        model = load_pretrained(path)
    assert model is None
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def hand_released(tmp_path):
    state = hand_released_state(SMALL_RELEASED)
    return write_released(tmp_path / "released", SMALL_RELEASED, state), state


# ------------------------------------------------------------------------------------------ round trips


def test_round_trip_fp32_is_bitwise_exact(tmp_path):
    model = random_model()
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert_same_model(model, loaded)


def test_round_trip_bf16_keeps_fp32_params_and_is_bitwise_exact(tmp_path):
    model = random_model(dtype=torch.bfloat16)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    for name, p in loaded.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(FP32_NAMES) else torch.bfloat16), name
    assert_same_model(model, loaded)


def test_bf16_checkpoint_loaded_as_fp32_upcasts_exactly(tmp_path):
    model = random_model(dtype=torch.bfloat16)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    source = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, source[key].float()), key


def test_saved_tokenizer_is_written(tmp_path):
    from blackmamba.tokenizer import train_bpe

    tok = train_bpe(["a small text about cats and dogs and birds"] * 4, 300)
    save_pretrained(random_model(), tmp_path / "ckpt", tokenizer=tok)
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()


# ------------------------------------------------------------------------------------------ shards


def test_sharded_save_loads_back_exactly(tmp_path):
    model = random_model()
    save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(tmp_path / "ckpt"))
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 3
    assert "model.safetensors" not in files
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    expected_total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert index["metadata"]["total_size"] == expected_total
    assert_same_model(model, load_pretrained(tmp_path / "ckpt"))


def test_missing_shard_names_the_file(tmp_path):
    save_pretrained(random_model(), tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_load_fails(tmp_path / "ckpt", shard.name, "missing")


def test_corrupt_shard_index(tmp_path):
    save_pretrained(random_model(), tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text("{not json")
    assert_load_fails(tmp_path / "ckpt", "model.safetensors.index.json")


# ------------------------------------------------------------------------------------------ released layout


def test_hand_built_released_checkpoint_loads_with_the_right_names(hand_released):
    path, state = hand_released
    n_mamba = SMALL_RELEASED["mamba_moe_layers"].count("r")
    n_moe = SMALL_RELEASED["num_layers"] - n_mamba
    assert len(state) == 1 + 10 * n_mamba + (3 + 2 * 8) * n_moe + 2
    model = load_pretrained(path)
    assert model.config.d_model == 64 and model.config.d_ff == 96 and model.config.n_experts == 8
    assert model.config.layer_pattern == ["mamba", "moe", "mamba", "moe"]
    assert model.config.dt_rank == 4 and model.config.d_inner == 128
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.embedding.weight, state["embedding.word_embeddings.weight"])
    assert torch.equal(model.final_norm.bias, state["decoder.final_layernorm.bias"])
    mamba, moe = model.layers[2].mixer, model.layers[3].mixer
    assert torch.equal(mamba.x_proj.weight, state["decoder.layers.2.mixer.x_proj.weight"])
    assert mamba.A_log.dtype == torch.float32
    assert torch.equal(mamba.A_log, state["decoder.layers.2.mixer.A_log"].float())
    assert torch.equal(mamba.dt_proj.bias, state["decoder.layers.2.mixer.dt_proj.bias"].float())
    assert torch.equal(moe.router.bias, state["decoder.layers.3.mixer.router.bias"])
    for e in range(8):
        assert torch.equal(moe.w1[e], state[f"decoder.layers.3.mixer.local_experts.{e}.linear_fc1.weight"])
        assert torch.equal(moe.w2[e], state[f"decoder.layers.3.mixer.local_experts.{e}.linear_fc2.weight"])
    assert torch.isfinite(logits_of(model)).all()


def test_released_to_ours_to_released_is_bitwise_exact(hand_released, tmp_path):
    path, state = hand_released
    assert convert(path, tmp_path / "ours") == "ours"
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    assert convert(tmp_path / "ours", tmp_path / "back") == "released"
    assert sorted(os.listdir(tmp_path / "back")) == ["config.json", "pytorch_model.bin"]
    back = raw_released(tmp_path / "back")
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == SMALL_RELEASED
    # Both layouts give the same model.
    assert_same_model(load_pretrained(path), load_pretrained(tmp_path / "ours"))


def test_save_released_round_trip_through_ours(tmp_path):
    model = random_model(dtype=torch.bfloat16)
    save_released(model, tmp_path / "rel")
    raw = raw_released(tmp_path / "rel")
    assert set(raw) == set(ckpt.released_shapes(model.config))
    assert_same_model(model, load_pretrained(tmp_path / "rel"))
    convert(tmp_path / "rel", tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "rel2")
    raw2 = raw_released(tmp_path / "rel2")
    assert list(raw2) == list(raw)
    assert all(torch.equal(raw[k], raw2[k]) and raw[k].dtype == raw2[k].dtype for k in raw)
    cfg1 = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert json.loads((tmp_path / "rel2" / "config.json").read_text()) == cfg1
    assert set(cfg1) == set(SMALL_RELEASED)


def test_convert_explicit_target_and_errors(hand_released, tmp_path):
    path, _ = hand_released
    assert convert(path, tmp_path / "copy", to="released") == "released"
    assert torch.equal(
        raw_released(tmp_path / "copy")["decoder.layers.1.mixer.router.weight"],
        raw_released(path)["decoder.layers.1.mixer.router.weight"],
    )
    with pytest.raises(CheckpointError, match="same directory"):
        convert(path, path)
    with pytest.raises(CheckpointError, match="unknown target layout"):
        convert(path, tmp_path / "x", to="onnx")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ bad checkpoints


def ours_checkpoint(tmp_path, state_edit=None):
    model = random_model()
    path = save_pretrained(model, tmp_path / "ours")
    if state_edit is not None:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state_edit(state)
        ckpt.save_file(state, path / "model.safetensors")
    return path


def test_missing_key_is_named(hand_released):
    path, state = hand_released
    del state["decoder.layers.3.mixer.local_experts.5.linear_fc2.weight"]
    write_released(path, SMALL_RELEASED, state)
    assert_load_fails(path, "missing", "decoder.layers.3.mixer.local_experts.5.linear_fc2.weight")


def test_missing_key_is_named_ours(tmp_path):
    path = ours_checkpoint(tmp_path, lambda s: s.pop("layers.1.mixer.router.bias"))
    assert_load_fails(path, "missing", "layers.1.mixer.router.bias")


def test_unexpected_key_is_named(hand_released, tmp_path):
    path, state = hand_released
    state["decoder.layers.0.mixer.in_proj.bias"] = torch.zeros(256, dtype=torch.bfloat16)
    write_released(path, SMALL_RELEASED, state)
    assert_load_fails(path, "unexpected", "decoder.layers.0.mixer.in_proj.bias")
    ours = ours_checkpoint(tmp_path, lambda s: s.update({"output_layer.weight": s["embedding.weight"].clone()}))
    assert_load_fails(ours, "unexpected", "output_layer.weight")


def test_wrong_shape_names_key_and_both_shapes(hand_released, tmp_path):
    path, state = hand_released
    state["decoder.layers.2.mixer.conv1d.weight"] = torch.ones(128, 1, 3, dtype=torch.bfloat16)
    write_released(path, SMALL_RELEASED, state)
    assert_load_fails(path, "decoder.layers.2.mixer.conv1d.weight", "[128, 1, 4]", "[128, 1, 3]")
    ours = ours_checkpoint(tmp_path, lambda s: s.update({"layers.1.mixer.w2": s["layers.1.mixer.w2"][:3]}))
    assert_load_fails(ours, "layers.1.mixer.w2", "[4, 32, 48]", "[3, 32, 48]")


def test_non_tensor_value(hand_released):
    path, state = hand_released
    state["decoder.layers.0.mixer.D"] = 5
    write_released(path, SMALL_RELEASED, state)
    assert_load_fails(path, "decoder.layers.0.mixer.D", "not a tensor")


def test_released_file_without_model_key(hand_released):
    path, state = hand_released
    torch.save(state, path / "pytorch_model.bin")  # what the reference save_pretrained writes
    assert_load_fails(path, "pytorch_model.bin", "'model'")


def test_truncated_pytorch_model_bin(hand_released):
    path, _ = hand_released
    file = path / "pytorch_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert_load_fails(path, "pytorch_model.bin", "truncated or corrupt")


def test_garbage_pytorch_model_bin(hand_released):
    path, _ = hand_released
    file = path / "pytorch_model.bin"
    file.write_bytes(os.urandom(file.stat().st_size))
    assert_load_fails(path, "pytorch_model.bin", "truncated or corrupt")


def test_truncated_safetensors(tmp_path):
    path = ours_checkpoint(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert_load_fails(path, "model.safetensors", "truncated or corrupt")


def test_garbage_safetensors(tmp_path):
    path = ours_checkpoint(tmp_path)
    file = path / "model.safetensors"
    file.write_bytes(os.urandom(file.stat().st_size))
    assert_load_fails(path, "model.safetensors", "truncated or corrupt")


def test_config_hidden_size_does_not_match_weights(hand_released):
    path, _ = hand_released
    (path / "config.json").write_text(json.dumps({**SMALL_RELEASED, "hidden_size": 48}))
    assert_load_fails(path, "embedding.word_embeddings.weight", "[512, 48]", "[512, 64]")


def test_our_config_d_model_does_not_match_weights(tmp_path):
    path = ours_checkpoint(tmp_path)
    data = json.loads((path / "config.json").read_text())
    data.update(d_model=48, dt_rank=3)
    (path / "config.json").write_text(json.dumps(data))
    assert_load_fails(path, "embedding.weight", "[256, 48]", "[256, 32]")


def test_missing_config_json(tmp_path):
    path = ours_checkpoint(tmp_path)
    (path / "config.json").unlink()
    assert_load_fails(path, "config.json")


def test_nonexistent_directory(tmp_path):
    assert_load_fails(tmp_path / "nowhere", "nowhere", "does not exist")


def test_path_is_a_file(tmp_path):
    file = tmp_path / "model.bin"
    file.write_bytes(b"\0" * 16)
    assert_load_fails(file, "not a directory")


def test_directory_without_weights(tmp_path):
    (tmp_path / "cfg").mkdir()
    BlackMambaConfig.from_preset("tiny").to_json(tmp_path / "cfg" / "config.json")
    assert_load_fails(tmp_path / "cfg", "no weights")


def test_invalid_json_config(tmp_path):
    path = ours_checkpoint(tmp_path)
    (path / "config.json").write_text('{"d_model": 32,')
    assert_load_fails(path, "config.json", "not valid JSON")


def test_unknown_config_field(tmp_path):
    path = ours_checkpoint(tmp_path)
    data = json.loads((path / "config.json").read_text())
    data["num_attention_heads"] = 4
    (path / "config.json").write_text(json.dumps(data))
    assert_load_fails(path, "config.json", "num_attention_heads")


def test_invalid_config_value_in_checkpoint(hand_released):
    path, _ = hand_released
    (path / "config.json").write_text(json.dumps({**SMALL_RELEASED, "mamba_moe_layers": ["r", "r8", "r", "8"]}))
    assert_load_fails(path, "mamba_moe_layers")


# ------------------------------------------------------------------------------------------ atomic writes


def failing_save_file(monkeypatch, fail_on_call):
    real = ckpt.save_file
    calls = []

    def save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == fail_on_call:
            raise OSError("No space left on device (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    return calls


def test_failed_save_leaves_no_target_and_no_temporaries(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    parent.mkdir()
    calls = failing_save_file(monkeypatch, fail_on_call=2)
    with pytest.raises(CheckpointError, match="simulated"):
        save_pretrained(random_model(), parent / "ckpt", max_shard_bytes=64 * 1024)
    assert len(calls) == 2  # the first shard was written before the failure
    assert os.listdir(parent) == []


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    parent = tmp_path / "parent"
    old = random_model(seed=0)
    save_pretrained(old, parent / "ckpt")
    before = sorted(os.listdir(parent / "ckpt"))
    failing_save_file(monkeypatch, fail_on_call=1)
    with pytest.raises(CheckpointError, match="simulated"):
        save_pretrained(random_model(seed=1), parent / "ckpt")
    assert os.listdir(parent) == ["ckpt"]
    assert sorted(os.listdir(parent / "ckpt")) == before
    assert_same_model(old, load_pretrained(parent / "ckpt"))


def test_interrupted_save_released_keeps_previous_checkpoint(tmp_path, monkeypatch):
    old = random_model(seed=0)
    save_released(old, tmp_path / "rel")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_released(random_model(seed=1), tmp_path / "rel")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["rel"]
    assert_same_model(old, load_pretrained(tmp_path / "rel"))


def test_save_over_existing_checkpoint_replaces_it_completely(tmp_path):
    from blackmamba.tokenizer import train_bpe

    tok = train_bpe(["some words to train on, and some more words"] * 4, 300)
    old = random_model(seed=0)
    save_pretrained(old, tmp_path / "ckpt", tokenizer=tok, max_shard_bytes=64 * 1024)
    (tmp_path / "ckpt" / "notes.txt").write_text("stale")
    new = random_model(BlackMambaConfig.from_preset("tiny", d_model=16), seed=1)
    with pytest.raises(CheckpointError, match=r"not a checkpoint \(it holds notes.txt\).*overwrite"):
        save_pretrained(new, tmp_path / "ckpt")  # notes.txt is not the tool's to delete
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "stale"
    save_pretrained(new, tmp_path / "ckpt", overwrite=True)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt"]
    assert_same_model(new, load_pretrained(tmp_path / "ckpt"))


def test_save_released_over_ours_replaces_it(tmp_path):
    save_pretrained(random_model(seed=0), tmp_path / "ckpt")
    new = random_model(seed=1)
    save_released(new, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "pytorch_model.bin"]
    assert_same_model(new, load_pretrained(tmp_path / "ckpt"))


# ------------------------------------------------------------------------------------------ config JSON


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name, tmp_path):
    cfg = BlackMambaConfig.from_preset(name)
    assert BlackMambaConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "config.json")
    assert BlackMambaConfig.from_json(tmp_path / "config.json") == cfg
    assert BlackMambaConfig.from_json(str(tmp_path / "config.json")) == cfg


def test_custom_config_json_round_trip():
    cfg = BlackMambaConfig(
        vocab_size=300,
        d_model=48,
        layer_pattern=["moe", "mamba", "mamba"],
        dt_rank=5,
        n_experts=3,
        d_ff=40,
        moe_activation="silu",
        norm_eps=1e-6,
        conv_bias=False,
        tokenizer_vocab_size=290,
    )
    assert BlackMambaConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "released, preset, dt_rank",
    [(RELEASED_1_5B, "blackmamba-1.5b", 72), (RELEASED_2_8B, "blackmamba-2.8b", 92)],
)
def test_from_released_gives_preset_shapes(released, preset, dt_rank, tmp_path):
    cfg = BlackMambaConfig.from_released(released)
    expected = BlackMambaConfig.from_preset(preset)
    assert cfg.d_model == expected.d_model
    assert cfg.layer_pattern == expected.layer_pattern
    assert cfg.d_ff == expected.d_ff and cfg.n_experts == 8
    assert cfg.dt_rank == dt_rank
    assert cfg.d_inner == 2 * released["hidden_size"]
    assert cfg.d_state == 16 and cfg.d_conv == 4 and cfg.vocab_size == 50304
    assert cfg.tokenizer_vocab_size == 50277
    assert cfg == expected
    assert cfg.to_released() == released
    (tmp_path / "config.json").write_text(json.dumps(released))
    assert BlackMambaConfig.from_json(tmp_path / "config.json") == cfg


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: BlackMambaConfig.from_preset("tiny", d_model=-8), "d_model"),
        (lambda: BlackMambaConfig.from_preset("tiny", layer_pattern=["mamba", "lstm"]), "layer_pattern"),
        (lambda: BlackMambaConfig.from_preset("tiny", moe_activation="relu"), "moe_activation"),
        (lambda: BlackMambaConfig.from_preset("tiny", tokenizer_vocab_size=257), "tokenizer_vocab_size"),
        (lambda: BlackMambaConfig.from_dict({"d_model": 32, "n_layer": 4}), "n_layer"),
        (
            lambda: BlackMambaConfig.from_released({**SMALL_RELEASED, "mamba_moe_layers": ["r", "r8"] * 2}),
            "mamba_moe_layers",
        ),
        (lambda: BlackMambaConfig.from_released({**SMALL_RELEASED, "num_layers": 6}), "mamba_moe_layers"),
    ],
)
def test_invalid_config_names_the_field(build, field):
    with pytest.raises(ConfigError, match=field):
        build()


def test_to_released_rejects_what_the_reference_cannot_run():
    with pytest.raises(ConfigError, match="silu"):
        BlackMambaConfig.from_preset("tiny", moe_activation="silu").to_released()
    with pytest.raises(ConfigError, match="dt_rank"):
        BlackMambaConfig.from_preset("tiny", dt_rank=7).to_released()


# ------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "preset, total, active",
    [("blackmamba-1.5b", 1_458_462_072, 343_694_712), ("blackmamba-2.8b", 2_783_213_584, 628_770_832)],
)
def test_released_parameter_counts(preset, total, active):
    with torch.device("meta"):
        model = BlackMamba(BlackMambaConfig.from_preset(preset))
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == active
    released = ckpt.released_shapes(model.config)
    assert sum(math.prod(s) for s in released.values()) == total
    assert len(released) == {"blackmamba-1.5b": 438, "blackmamba-2.8b": 525}[preset]
