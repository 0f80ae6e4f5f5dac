"""SamplingOptions: one validated, frozen object for the sampling settings, shared by generate, the CLI and the
server; and generation's bad-input errors are the project's own (one ``error:`` line on the command line)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import blackmamba
from blackmamba.errors import BlackMambaError
from blackmamba.generation import GenerationError, SamplingOptions, decoder_for, generate, prefill

from ..helpers import tiny_model

BAD = [
    ("temperature", float("nan")),
    ("temperature", -0.1),
    ("temperature", "1"),
    ("top_k", 0),
    ("top_k", 2.0),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", float("inf")),
    ("eos_token_id", -1),
    ("eos_token_id", True),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.5),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_option_is_a_generation_error_naming_it(name, value):
    with pytest.raises(GenerationError) as info:
        SamplingOptions(**{name: value})
    assert info.value.option == name and isinstance(info.value, ValueError)


def test_good_options_and_their_derived_views():
    options = SamplingOptions(
        temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2, eos_token_id=0, seed=2**64 - 1
    )
    assert not options.greedy and SamplingOptions().greedy
    assert options.logits_only() == SamplingOptions(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 0.0  # type: ignore[misc]
    assert hash(options) == hash(dataclasses.replace(options))


def test_exported_from_the_package():
    assert blackmamba.SamplingOptions is SamplingOptions


def test_generate_checks_its_keywords_through_sampling_options():
    model = tiny_model()
    with pytest.raises(GenerationError, match="seed") as info:
        generate(model, [[1, 2]], 2, temperature=1.0, seed=-5)
    assert info.value.option == "seed"
    with pytest.raises(GenerationError) as info:
        generate(model, [[1, 2]], 2, eos_token_id=-1)
    assert info.value.option == "eos_token_id"


def test_one_decoder_serves_every_seed_and_eos():
    model = tiny_model().eval()
    first = decoder_for(model, SamplingOptions(temperature=0.8, seed=1, eos_token_id=3))
    assert decoder_for(model, SamplingOptions(temperature=0.8, seed=2)) is first
    assert decoder_for(model, SamplingOptions(temperature=0.5, seed=1)) is not first
    a = generate(model, [[1, 2, 3]], 6, temperature=0.8, seed=1)
    b = generate(model, [[1, 2, 3]], 6, temperature=0.8, seed=2)
    assert a == generate(model, [[1, 2, 3]], 6, temperature=0.8, seed=1) and a != b


def test_bad_prefill_chunk_size_is_a_generation_error():
    model = tiny_model()
    with pytest.raises(GenerationError) as info:
        prefill(model, torch.tensor([[1, 2]]), model.allocate_cache(1), chunk_size=0)
    assert info.value.option == "prefill_chunk_size" and isinstance(info.value, BlackMambaError)
    with pytest.raises(GenerationError, match="prefill chunk size"):
        generate(model, [[1, 2]], 2, prefill_chunk_size=-1)
