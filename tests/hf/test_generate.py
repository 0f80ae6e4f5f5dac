"""transformers' generate over the recurrent-state cache gives the native tokens: greedy, EOS, left padding,
sampling, beam search (the state follows the beams), and the text-generation pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import blackmamba
from blackmamba.hf import BlackMambaCache, BlackMambaForCausalLM

PROMPTS = [[5, 77, 120, 9, 250, 31, 64, 18, 201], [299], [12, 13, 14], [150, 3, 3, 90, 100, 42, 7, 7, 8, 9, 10, 11]]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return ids, mask


def new_tokens(out: torch.Tensor, prompt_length: int, eos: int | None = None) -> list[list[int]]:
    rows = out[:, prompt_length:].tolist()
    return [row[: row.index(eos)] if eos is not None and eos in row else row for row in rows]


@pytest.fixture(scope="module")
def hf(dirs):
    return AutoModelForCausalLM.from_pretrained(dirs["hf"])


def test_greedy_left_padded_batch_equals_blackmamba_generate(hf, model):
    ids, mask = left_padded(PROMPTS)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out.shape == (len(PROMPTS), ids.shape[1] + 12)  # max_new_tokens
    native = blackmamba.generate(model, PROMPTS, 12)
    assert new_tokens(out, ids.shape[1]) == native
    assert len({tuple(t) for t in native}) == len(PROMPTS)  # the rows differ, so the comparison means something


def test_eos_stops_each_row_where_blackmamba_generate_does(hf, model):
    full = blackmamba.generate(model, PROMPTS, 12)
    eos = full[0][4]  # a token the first row produces mid-way
    native = blackmamba.generate(model, PROMPTS, 12, eos_token_id=eos)
    assert native[0] == full[0][:4]
    ids, mask = left_padded(PROMPTS)
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    assert new_tokens(out, ids.shape[1], eos) == native


def test_step_path_equals_full_recompute(hf, model):
    """A cache carried through decode steps gives the logits of a forward over the whole sequence."""
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        out = hf(ids, attention_mask=mask)
        cache = out.cache
        assert isinstance(cache, BlackMambaCache) and cache.get_seq_length() == ids.shape[1]
        seq, logits = ids, out.logits[:, -1]
        for _ in range(4):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = hf(nxt, cache=cache).logits[:, -1]
            expected = model(seq, mask=mask.bool()).logits[:, -1]
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)  # as tests/model/test_model.py


def test_beam_search_reorders_the_state(hf):
    ids, mask = left_padded(PROMPTS[:2])
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, num_beams=4, num_return_sequences=2)
    kw |= dict(do_sample=False, eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    cached = hf.generate(**kw)
    recomputed = hf.generate(**kw, use_cache=False)  # the reference: a full forward per step, no state
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores)
    # The beams disagree with greedy somewhere, so their states really were permuted between steps.
    greedy = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert not torch.equal(cached.sequences[::2], greedy)


def test_sampling_is_seeded_and_never_samples_padding_rows(hf):
    ids, mask = left_padded(PROMPTS)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=5.0, top_k=0)
    torch.manual_seed(0)
    a = hf.generate(**kw, eos_token_id=None)
    torch.manual_seed(0)
    b = hf.generate(**kw, eos_token_id=None, use_cache=False)
    assert torch.equal(a, b)  # the cached state gives the recomputed distribution, draw for draw
    new = a[:, ids.shape[1] :]
    assert new.max() < 300  # ids 300..319 are suppressed (tokenizer_vocab_size)
    assert len(set(new.flatten().tolist())) > 20  # a hot temperature: really sampled


def test_pipeline_text_generation(dirs, model, tokenizer):
    generator = pipeline("text-generation", model=str(dirs["hf"]))
    prompt = "the cat sat"
    text = generator(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer.encode(prompt).ids
    native = blackmamba.generate(model, [ids], 10, eos_token_id=0)[0]
    assert text == tokenizer.decode(native)
    assert len(native) > 0


def test_pipeline_from_a_released_folder(dirs, model, tokenizer):
    tok = AutoTokenizer.from_pretrained(dirs["released"])
    generator = pipeline("text-generation", model=str(dirs["released"]), tokenizer=tok)
    text = generator("a bird", max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    native = blackmamba.generate(model, [tokenizer.encode("a bird").ids], 6, eos_token_id=0)[0]
    assert text == tokenizer.decode(native)


def test_assisted_decoding_is_refused(hf):
    with pytest.raises(ValueError, match="stateful"):
        hf.generate(torch.tensor([[1, 2, 3]]), assistant_model=hf, max_new_tokens=2)


def test_from_native_generates_like_the_native_model(model):
    hf = BlackMambaForCausalLM.from_native(model)
    out = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out[0, len(PROMPTS[0]) :].tolist() == blackmamba.generate(model, [PROMPTS[0]], 6)[0]


def test_chunked_prefill_continues_the_state(hf, model):
    ids, mask = left_padded(PROMPTS)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    chunked = hf.generate(**kw, prefill_chunk_size=5)  # 12 prompt positions: chunks of 5, 5 and 2
    assert new_tokens(chunked, ids.shape[1]) == blackmamba.generate(model, PROMPTS, 6)
