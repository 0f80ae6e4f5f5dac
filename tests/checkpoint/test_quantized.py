"""fp8 checkpoints: ``convert --quantize fp8`` and ``save_pretrained`` write them, ``load_pretrained`` reads
them back bit for bit as the quantized model, ``info`` says so, and every misuse is refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blackmamba import BlackMambaConfig, cast_model, convert, load_pretrained, save_pretrained
from blackmamba.checkpoint import CheckpointError
from blackmamba.config import ConfigError
from blackmamba.layers.quant import Fp8Linear, Fp8MoE, quantize_fp8, quantized_tensors

from .common import assert_refused, make_ours, make_released, run_cli, tiny

FP8 = torch.float8_e4m3fn


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(bits(a[k]), bits(b[k])) for k in a)


@pytest.mark.parametrize("source", ["ours", "released"])
def test_convert_quantize_then_load_is_bit_exact(tmp_path, source):
    (make_ours if source == "ours" else make_released)(tmp_path / "src", seed=1)
    assert convert(tmp_path / "src", tmp_path / "fp8", quantize="fp8") == "ours"
    want = quantize_fp8(tiny(seed=1))
    loaded = load_pretrained(tmp_path / "fp8")
    assert loaded.config.quantization == "fp8" and loaded.config == want.config
    assert same_state(loaded.state_dict(), want.state_dict())
    assert isinstance(loaded.layers[0].mixer.in_proj, Fp8Linear) and isinstance(loaded.layers[1].mixer, Fp8MoE)
    assert not loaded.layers[1].mixer.w1.requires_grad
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    for name, dtype in quantized_tensors(want).items():
        assert stored[name] == ("F8_E4M3" if dtype == FP8 else "F32"), name
    assert stored["embedding.weight"] == "F32" and stored["layers.1.mixer.router.weight"] == "F32"
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want(ids).logits)
    # The fp8 checkpoint is read again as it is (ours -> ours), bit for bit.
    convert(tmp_path / "fp8", tmp_path / "copy")
    assert same_state(
        load_file(tmp_path / "copy" / "model.safetensors"), load_file(tmp_path / "fp8" / "model.safetensors")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_a_quantized_model(tmp_path, dtype):
    model = quantize_fp8(cast_model(tiny(seed=2), dtype))
    save_pretrained(model, tmp_path / "q", max_shard_bytes=20_000)  # sharded: the index counts fp8 bytes
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    loaded = load_pretrained(tmp_path / "q")
    assert loaded.dtype == dtype and same_state(loaded.state_dict(), model.state_dict())
    as_fp32 = load_pretrained(tmp_path / "q", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32 and as_fp32.layers[1].mixer.w1.dtype == FP8
    with torch.no_grad():
        ids = torch.randint(1, 256, (2, 7))
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cli_convert_info_and_refusals(tmp_path):
    make_ours(tmp_path / "src", seed=3)
    code, out, _ = run_cli("convert", tmp_path / "src", tmp_path / "fp8", "--quantize", "fp8")
    assert code == 0 and "ours layout" in out
    code, out, _ = run_cli("info", tmp_path / "fp8")
    assert code == 0 and "quantization" in out and "fp8 weight-only" in out
    code, out, _ = run_cli("info", tmp_path / "src")
    assert code == 0 and [line.split()[-1] for line in out.splitlines() if line.startswith("quantization")] == ["none"]
    assert_refused(
        tmp_path, "convert", tmp_path / "fp8", tmp_path / "again", "--quantize", "fp8", fragments=("already",)
    )
    assert_refused(tmp_path, "convert", tmp_path / "fp8", tmp_path / "rel", "--to", "released", fragments=("released",))
    assert_refused(
        tmp_path, "convert", tmp_path / "src", tmp_path / "rel", "--to", "released", "--quantize", "fp8",
        fragments=("released layout cannot hold fp8",),
    )  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:  # argparse: an unknown choice is a usage error
        run_cli("convert", tmp_path / "src", tmp_path / "int4", "--quantize", "int4")
    assert exit_info.value.code == 2 and not (tmp_path / "int4").exists()
    with pytest.raises(CheckpointError, match="unknown quantization 'int4'"):
        convert(tmp_path / "src", tmp_path / "int4", quantize="int4")


def write_weights(folder, state: dict, config: dict) -> None:
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


def test_mismatched_fp8_files_are_refused(tmp_path):
    make_ours(tmp_path / "plain", seed=4)
    convert(tmp_path / "plain", tmp_path / "fp8", quantize="fp8")
    plain_state, fp8_state = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "fp8" / "model.safetensors"),
    )
    plain_config = json.loads((tmp_path / "plain" / "config.json").read_text())
    fp8_config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    cases = {
        # an fp8 config with unquantized weights: the scales are missing, the weights have the wrong dtype
        "plain weights": (plain_state, fp8_config, "missing"),
        # fp8 weights under a config that does not say fp8
        "no quantization field": (fp8_state, plain_config, "unexpected"),
        # one fp8 weight stored as bf16, one scale as bf16
        "weight dtype": (
            {**fp8_state, "layers.1.mixer.w1": fp8_state["layers.1.mixer.w1"].to(torch.bfloat16)}, fp8_config,
            "stores it as float8_e4m3fn",
        ),
        "scale dtype": (
            {**fp8_state, "layers.0.mixer.in_proj.scale": fp8_state["layers.0.mixer.in_proj.scale"].bfloat16()},
            fp8_config, "stores it as float32",
        ),
        "fp8 embedding": ({**fp8_state, "embedding.weight": fp8_state["embedding.weight"].to(FP8)}, fp8_config,
                          "weights must be one of"),
    }  # fmt: skip
    for label, (state, config, fragment) in cases.items():
        folder = tmp_path / label.replace(" ", "_")
        folder.mkdir()
        write_weights(folder, state, config)
        with pytest.raises(CheckpointError, match=fragment):
            load_pretrained(folder)
        assert_refused(tmp_path, "info", folder, fragments=(fragment,))


@pytest.mark.parametrize("value", ["int4", "FP8", "", 8, True, ["fp8"], {}])
def test_config_quantization_field_is_checked(value):
    with pytest.raises(ConfigError, match="'quantization' must be null or one of"):
        BlackMambaConfig.from_preset("tiny", quantization=value)


def test_released_layout_and_transformers_bridge_refuse_fp8(tmp_path):
    config = BlackMambaConfig.from_preset("tiny", quantization="fp8")
    with pytest.raises(ConfigError, match="keep it in our layout"):
        config.to_released()
    model = quantize_fp8(copy.deepcopy(tiny(seed=5)))
    save_pretrained(model, tmp_path / "q")
    pytest.importorskip("transformers")
    from blackmamba.hf.modeling_blackmamba import BlackMambaForCausalLM, HFError

    with pytest.raises(HFError, match="does not load quantized models"):
        BlackMambaForCausalLM.from_pretrained(tmp_path / "q")


def test_training_an_fp8_model_is_refused(tmp_path):
    from blackmamba.training.rundir import TrainingError
    from blackmamba.training.trainer import TrainArgs, build_model

    make_ours(tmp_path / "src", seed=6)
    convert(tmp_path / "src", tmp_path / "fp8", quantize="fp8")
    config_file = tmp_path / "fp8.json"
    config_file.write_text((tmp_path / "fp8" / "config.json").read_text())
    for source in (dict(init_from=str(tmp_path / "fp8")), dict(config=str(config_file))):
        args = TrainArgs(data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=1, **source)
        with pytest.raises(TrainingError, match="fp8 weights .* for inference only"):
            build_model(args, 256)
    assert not (tmp_path / "run").exists()
