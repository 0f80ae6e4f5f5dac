"""The transformers wrapper computes exactly the native model, loads every layout and saves what it loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import blackmamba
from blackmamba.config import ConfigError
from blackmamba.hf import BlackMambaForCausalLM, BlackMambaHFConfig, HFError

from ..helpers import tiny_model

IDS = torch.tensor([[5, 77, 120, 9, 250, 31, 64], [299, 1, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("layout", ["ours", "released", "hf"])
def test_auto_model_logits_equal_the_native_model(layout, dirs, model):
    config = AutoConfig.from_pretrained(dirs[layout])
    assert isinstance(config, BlackMambaHFConfig)
    hf = AutoModelForCausalLM.from_pretrained(dirs[layout])
    assert isinstance(hf, BlackMambaForCausalLM) and not hf.training
    with torch.no_grad():
        expected = model(IDS).logits
        assert torch.equal(hf(IDS).logits, expected)
        assert torch.equal(hf(IDS, use_cache=False).logits, expected)


def test_wrapper_shares_the_native_parameters(model):
    hf = BlackMambaForCausalLM.from_native(model)
    assert {n: p.data_ptr() for n, p in hf.named_parameters()} == {n: p.data_ptr() for n, p in model.named_parameters()}
    assert hf.num_parameters() == model.num_parameters()
    with torch.no_grad():
        assert torch.equal(hf(IDS).logits, model(IDS).logits)


def test_saved_folder_holds_our_layout_and_auto_map(dirs, model):
    folder = dirs["hf"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(dirs["ours"] / "model.safetensors", "pt") as f:
        assert keys == set(f.keys())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "blackmamba"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_blackmamba.BlackMambaHFConfig",
        "AutoModelForCausalLM": "modeling_blackmamba.BlackMambaForCausalLM",
    }
    assert config["layer_pattern"] == model.config.layer_pattern  # every field written, defaults included
    for name in ("configuration_blackmamba.py", "modeling_blackmamba.py", "cache_blackmamba.py", "README.md"):
        assert (folder / name).is_file(), name
    card = (folder / "README.md").read_text()
    assert "$" not in card.split("```bibtex")[0] and f"{model.num_parameters():,}" in card


def test_bfloat16_keeps_a_log_d_and_dt_bias_in_float32(dirs):
    native = blackmamba.load_pretrained(dirs["ours"], dtype=torch.bfloat16)
    for layout in ("ours", "hf"):
        hf = AutoModelForCausalLM.from_pretrained(dirs[layout], dtype=torch.bfloat16)
        dtypes = {n: p.dtype for n, p in hf.named_parameters()}
        assert dtypes == {n: p.dtype for n, p in native.named_parameters()}
        assert dtypes["layers.0.mixer.A_log"] == torch.float32 and dtypes["embedding.weight"] == torch.bfloat16
        with torch.no_grad():
            assert torch.equal(hf(IDS).logits, native(IDS).logits), layout


def test_config_reads_each_layout_and_checks_fields(dirs, model):
    for layout in ("ours", "released", "hf"):
        native = BlackMambaHFConfig.from_pretrained(dirs[layout]).to_native()
        assert native.layer_pattern == model.config.layer_pattern and native.d_model == model.config.d_model
    config = BlackMambaHFConfig.from_native(model.config)
    assert config.to_native() == model.config
    assert (config.hidden_size, config.num_hidden_layers) == (model.config.d_model, model.config.n_layers)
    with pytest.raises(ConfigError, match="d_model"):
        BlackMambaHFConfig(d_model=0)
    with pytest.raises(ConfigError, match="unknown config fields"):
        BlackMambaHFConfig.from_dict({"layer_pattern": ["mamba"], "d_modell": 3})


def test_auto_tokenizer_for_each_layout(dirs, tokenizer):
    text = "the cat sat on the log"
    for layout in ("ours", "released", "hf"):
        tok = AutoTokenizer.from_pretrained(dirs[layout])
        assert tok(text)["input_ids"] == tokenizer.encode(text).ids, layout
        assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (0, 0, "left")


def test_released_folder_without_tokenizer_gets_gpt_neox(tmp_path):
    model = tiny_model(vocab_size=50304)
    blackmamba.save_released(model, tmp_path / "rel")
    tok = AutoTokenizer.from_pretrained(tmp_path / "rel")
    assert len(tok) == 50277 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"


def test_unusable_ids_are_suppressed_in_generation(dirs):
    hf = AutoModelForCausalLM.from_pretrained(dirs["hf"])
    assert hf.generation_config.suppress_tokens == list(range(300, 320))


def test_loss_is_the_shifted_cross_entropy(model):
    hf = BlackMambaForCausalLM.from_native(model)
    labels = IDS.clone()
    labels[0, :3] = -100
    out = hf(IDS, labels=labels, use_cache=False)
    logits = model(IDS).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 320), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_unsupported_inputs_are_named(model, dirs):
    hf = BlackMambaForCausalLM.from_native(model)
    with pytest.raises(HFError, match="inputs_embeds"):
        hf(inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(HFError, match="output_hidden_states"):
        hf(IDS, output_hidden_states=True)
    right_padded = torch.ones_like(IDS)
    right_padded[0, -2:] = 0
    with pytest.raises(HFError, match="right padding"):
        hf(IDS, attention_mask=right_padded)
    with torch.no_grad():  # without a cache a right-padded row is exact at its real positions
        assert torch.equal(hf(IDS, attention_mask=right_padded, use_cache=False).logits, model(IDS).logits)
    with pytest.raises(HFError, match="quantization_config"):
        AutoModelForCausalLM.from_pretrained(dirs["ours"], quantization_config={"load_in_8bit": True})
    with pytest.raises(HFError, match="unknown argument 'bogus'"):
        AutoModelForCausalLM.from_pretrained(dirs["ours"], bogus=1)


def test_corrupt_native_checkpoint_is_a_checkpoint_error(dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((dirs["ours"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(blackmamba.CheckpointError):
        AutoModelForCausalLM.from_pretrained(bad)


def test_export_refuses_a_folder_it_did_not_write(dirs, tmp_path):
    from blackmamba.hf.export import ExportError

    target = tmp_path / "notes"
    target.mkdir()
    (target / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="does not write"):
        blackmamba.hf.export(dirs["ours"], target)
    assert (target / "todo.txt").read_text() == "keep me"
    blackmamba.hf.export(dirs["hf"], dirs["hf"].parent / "again")  # an export folder is a source too
    assert (dirs["hf"].parent / "again" / "model.safetensors").read_bytes() == (
        dirs["hf"] / "model.safetensors"
    ).read_bytes()


def test_new_model_gets_the_native_initialisation(model):
    fresh = BlackMambaForCausalLM(BlackMambaHFConfig.from_native(model.config))
    native = blackmamba.BlackMamba(model.config)
    for (name, p), q in zip(fresh.named_parameters(), native.parameters(), strict=True):
        if name.endswith(("A_log", "D", "norm.weight", "norm.bias", "router.bias")):
            assert torch.equal(p, q), name  # deterministic parts of the init
        else:
            assert p.std() > 0 and not torch.equal(p, q), name  # random parts: drawn, not left empty or copied


def test_training_mode_and_activation_checkpointing_reach_the_native_model(model):
    hf = BlackMambaForCausalLM.from_native(tiny_model(3, vocab_size=320))
    hf.activation_checkpointing_enable()
    assert hf.native.gradient_checkpointing and hf.is_activation_checkpointing
    hf.train()
    assert hf.native.training and hf(IDS, labels=IDS).cache is None  # no state kept in training
    loss = hf(IDS, labels=IDS).loss
    loss.backward()
    assert hf.embedding.weight.grad is not None and hf.embedding.weight.grad.abs().sum() > 0
    hf.activation_checkpointing_disable()
    hf.eval()
    assert not hf.native.gradient_checkpointing and not hf.native.training
