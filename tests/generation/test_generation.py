import pytest
import torch

from blackmamba import BlackMamba, BlackMambaConfig, generate, stream_generate
from blackmamba.errors import BlackMambaError
from blackmamba.generation import GenerationError, sample_next

from ..helpers import tiny_model


def prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 1, 3, 14, 2)]


def test_greedy_outputs_vary_so_the_tests_below_mean_something():
    model = tiny_model()
    outs = generate(model, prompts(), 16)
    assert len({tuple(o) for o in outs}) == len(outs)
    assert all(len(set(o)) > 2 for o in outs)


def test_batched_prompts_give_exactly_what_each_gives_alone():
    model = tiny_model(1)
    together = generate(model, prompts(), 20)
    alone = [generate(model, [p], 20)[0] for p in prompts()]
    assert together == alone


def test_greedy_matches_argmax_of_full_forward():
    model = tiny_model(2)
    prompt = prompts()[0]
    new = generate(model, [prompt], 8)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert new == seq[len(prompt) :]


def test_sampling_is_seeded_and_respects_options():
    model = tiny_model()
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = generate(model, prompts(), 12, seed=3, **kw)
    b = generate(model, prompts(), 12, seed=3, **kw)
    c = generate(model, prompts(), 12, seed=4, **kw)
    assert a == b and a != c


def test_ids_beyond_the_tokenizer_are_never_sampled():
    model = tiny_model(tokenizer_vocab_size=100)
    with torch.no_grad():
        model.embedding.weight[100:] *= 50  # make the padding rows the most likely tokens
    outs = generate(model, prompts(), 10, temperature=2.0, seed=0) + generate(model, prompts(), 10)
    assert all(0 <= t < 100 for o in outs for t in o)


def test_eos_stops_each_prompt_and_stream_matches():
    model = tiny_model(1)
    first = generate(model, prompts(), 6)
    cut = next(i for i in range(1, 6) if first[0][i] not in first[0][:i])
    eos = first[0][cut]
    outs = generate(model, prompts(), 6, eos_token_id=eos)
    assert outs[0] == first[0][:cut]
    steps = list(stream_generate(model, prompts(), 6, eos_token_id=eos))
    assert [[s[i] for s in steps if s[i] is not None] for i in range(len(outs))] == outs
    assert steps[-1][0] is None


def test_top_k_one_is_greedy_and_top_p_keeps_the_first():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), logits.argmax(-1))


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 5
    for temperature in (1e-30, 1e-45, 5e-324):
        assert torch.equal(sample_next(logits, temperature, uniform=torch.rand(6)), logits.argmax(-1))
        assert torch.equal(sample_next(logits, temperature, top_k=3, top_p=0.5), logits.argmax(-1))


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1, 999]]), "outside"),
        (dict(prompts=[[1, -1]]), "outside"),
        (dict(prompts=[[1, True]]), "outside"),
        (dict(prompts=[[1, 2.0]]), "outside"),
        (dict(prompts="hello"), "list of token-id lists"),
        (dict(prompts=[1, 2, 3]), "prompt 0 must be a list"),
        (dict(prompts=["hello"]), "prompt 0 must be a list"),
        (dict(prompts=[[1]], max_new_tokens=-1), "max_new_tokens"),
        (dict(prompts=[[1]], max_new_tokens=10**7), "max_new_tokens must be in"),
        (dict(prompts=[[1]], max_new_tokens=2.5), "max_new_tokens must be an int"),
        (dict(prompts=[[1]], top_p=1.5), "top_p"),
        (dict(prompts=[[1]], top_p=float("nan")), "top_p"),
        (dict(prompts=[[1]], temperature=-1.0), "temperature"),
        (dict(prompts=[[1]], temperature=float("nan")), "temperature"),
        (dict(prompts=[[1]], temperature=float("inf")), "temperature"),
        (dict(prompts=[[1]], temperature=10**400), "temperature"),
        (dict(prompts=[[1]], temperature="0.5"), "temperature"),
        (dict(prompts=[[1]], temperature=None), "temperature"),
        (dict(prompts=[[1]], top_k=-2), "top_k"),
        (dict(prompts=[[1]], top_k=2.5), "top_k"),
        (dict(prompts=[[1]], repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(prompts=[[1]], repetition_penalty=float("-inf")), "repetition_penalty"),
        (dict(prompts=[[1]], repetition_penalty=0.0), "repetition_penalty"),
    ],
)
def test_bad_arguments_are_named(args, match):
    model = tiny_model()
    kw = dict(max_new_tokens=3) | args
    with pytest.raises(GenerationError, match=match) as info:
        generate(model, **kw)
    assert isinstance(info.value, BlackMambaError) and isinstance(info.value, ValueError)
    option = match.split()[0] if match.split()[0] in kw else "prompts"
    assert info.value.option == option


def test_attention_models_refuse_to_generate_past_their_kv_cache():
    config = BlackMambaConfig.from_preset(
        "tiny", vocab_size=64, layer_pattern=["attention", "moe"], n_heads=2, max_seq_len=16
    )
    model = BlackMamba(config).eval()
    assert len(generate(model, [[1, 2, 3, 4]], 12)[0]) == 12  # 16 positions: fits
    with pytest.raises(GenerationError, match="KV cache holds") as err:
        generate(model, [[1, 2, 3, 4], [5]], 13)
    assert err.value.option == "max_new_tokens"
