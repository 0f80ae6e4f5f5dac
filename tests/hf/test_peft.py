"""PEFT LoRA on the Mamba projections and on the stacked expert weights: one training step, an adapter that
saves and reloads, and generation through the adapted model."""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from blackmamba.hf import BlackMambaForCausalLM, HFError

from .test_generate import PROMPTS, left_padded

IDS = torch.tensor([[5, 77, 120, 9, 250, 31, 64, 18, 201, 7, 7, 2], [150, 3, 3, 90, 100, 42, 7, 7, 8, 9, 10, 11]])
# in_proj / out_proj are nn.Linear (LoRA wraps the module); the experts are stacked 3-D parameters
# (E, 2F, D) and (E, D, F), which PEFT adapts per expert through target_parameters.
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["in_proj", "out_proj"], task_type="CAUSAL_LM")
EXPERTS = ["mixer.w1", "mixer.w2"]


@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory):
    """A LoRA model after one AdamW step, its adapter folder, and the base weights before the step."""
    base = AutoModelForCausalLM.from_pretrained(dirs["hf"])
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, LoraConfig(**LORA, target_parameters=EXPERTS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".mixer.lora_A." in n for n in trainable)  # the expert adapters (MoE blocks)
    assert any("in_proj.lora_A" in n for n in trainable) and any("out_proj.lora_B" in n for n in trainable)
    with torch.no_grad():
        logits_before = model(IDS).logits
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    optimizer.step()
    model.eval()
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(folder)
    return model, folder, before, logits_before


def test_one_step_trains_only_the_adapters(trained):
    model, _, before, logits_before = trained
    base = model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            clean = name.replace(".base_layer", "").replace(".parametrizations", "").replace(".original", "")
            assert torch.equal(p, before[clean]), name
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, logits_before)


def test_adapter_reloads_to_the_same_logits(trained, dirs):
    model, folder, _, _ = trained
    assert (folder / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        expected = model(IDS).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dirs["hf"]), folder)
        assert torch.equal(reloaded(IDS).logits, expected)
        auto = AutoPeftModelForCausalLM.from_pretrained(folder)  # finds the base folder in adapter_config.json
        assert torch.equal(auto(IDS).logits, expected)


def test_generation_with_expert_adapters_and_after_merging(trained):
    model, _, _, _ = trained
    ids, mask = left_padded(PROMPTS)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**kw)  # expert adapters wrap the MoE mixers: decoding runs the forward
        recomputed = model.generate(**kw, use_cache=False)
        assert torch.equal(cached, recomputed)
        merged = model.merge_and_unload()
        assert isinstance(merged, BlackMambaForCausalLM) and merged._plain_mixers()  # native steps again
        assert torch.equal(merged.generate(**kw), cached)


def test_adapters_the_kernels_would_ignore_are_refused(dirs):
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(dirs["hf"]), LoraConfig(**{**LORA, "target_modules": ["router"]})
    )
    with pytest.raises(HFError, match="router"):
        model(IDS)
