"""Text out of generated token ids, one token at a time: UTF-8-safe streaming and stop strings.

A byte-level BPE token can end inside a multi-byte character, and a stop string can be split over several
tokens, so printing ``decode([token])`` per token would show broken characters and the start of a stop
string that should never be printed. Re-decoding the whole output every token (and searching all of it for
the stop strings) is correct but quadratic: the CLI did that, and its streaming fell from 386 to 140 tokens/s
between 1K and 16K new tokens.

:class:`TextStreamer` does a constant amount of work per token instead:

- it decodes only a short window of recent ids and keeps a count of the window's characters already taken;
  older ids are dropped once their text can no longer change (see ``_shrink``);
- a trailing U+FFFD (a character whose remaining bytes may still come) is held back until the next token;
- a stop string can only complete in the newest text, so it searches the held-back tail (shorter than the
  longest stop string) plus the new text, and it holds back any tail that could still become a stop string.

The text it releases equals ``tokenizer.decode(ids)`` cut before the first stop string, for any tokenizer
whose decoding of appended ids only changes the last, incomplete character: byte-level BPEs such as the
GPT-NeoX tokenizer and those trained by ``blackmamba data prepare`` (tests/generation/test_text.py checks it
on random ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer

from ..model import BlackMamba
from .generate import stream_generate
from .sampling import GenerationError

REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string it contains, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _check_stops(stops: Iterable[str]) -> tuple[str, ...]:
    if isinstance(stops, (str, bytes)):
        raise GenerationError(f"stop must be a list of strings, not one string ({stops!r}): use [{stops!r}]", "stop")
    try:
        out = tuple(stops)
    except TypeError:
        raise GenerationError(f"stop must be a list of strings, got {stops!r}", "stop") from None
    for s in out:
        if not isinstance(s, str) or not s:
            raise GenerationError(f"stop strings must be non-empty strings, got {s!r}", "stop")
    return out


class TextStreamer:
    """Turns token ids, fed one at a time with :meth:`put`, into text that is safe to print.

    ``put`` returns the new text that can be shown now ("" while a character or a possible stop string is
    incomplete); once a stop string appears, ``stopped`` is true, ``stop_string`` names it, and the text
    before it was the last returned. :meth:`finish` returns what is still held back at the end of
    generation. ``window`` is the number of recent ids decoded per token (the cost of one token)."""

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), window: int = 8) -> None:
        if window < 1:
            raise GenerationError(f"window must be >= 1, got {window}", "window")
        self.tokenizer = tokenizer
        self.stops = _check_stops(stop)
        self.stopped = False
        self.stop_string: str | None = None
        self.n_tokens = 0  # ids put before the stop (the stop's own tokens included)
        self.decoded_ids = 0  # ids passed to tokenizer.decode so far: the work done, for tests
        self._window = window
        self._ids: list[int] = []  # the recent ids whose text is still being assembled
        self._taken = 0  # characters of decode(self._ids) already passed on
        self._last_length = 0  # len(decode(self._ids))
        self._held = ""  # text passed on but not yet released: it may be the start of a stop string
        self._finished = False

    def _decode(self, ids: list[int]) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids)

    def put(self, token_id: int) -> str:
        """Add one generated id; return the text that became safe to print."""
        if self._finished:
            raise GenerationError("TextStreamer.put after finish()")
        if self.stopped:
            return ""
        self.n_tokens += 1
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text) == self._last_length and self._decode([token_id]) == "":
            self._ids.pop()  # an id that decodes to nothing (a special token): keeping it would only grow the window
            return ""
        self._last_length = len(text)
        stable = len(text) - 1 if text.endswith(REPLACEMENT) else len(text)
        new = text[self._taken : stable]
        self._taken = max(self._taken, stable)
        self._shrink(text)
        return self._release(new, final=False)

    def finish(self) -> str:
        """The text still held back (a trailing partial character appears as U+FFFD, as decode gives it)."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        new = self._decode(self._ids)[self._taken :] if self._ids else ""
        return self._release(new, final=True)

    def _shrink(self, text: str) -> None:
        """Once the window holds twice ``window`` ids, drop all but the last ``window`` of them.

        The kept ids decode to ``tail``: the end of ``text``, led by one U+FFFD per byte of a character the
        cut split (continuation bytes alone). Those bytes cannot join anything later, so the kept ids go on
        decoding to the same text as the whole window did, past that garbage; the cut is made only when
        everything before the common end has been taken. Offsets from the end are kept, so ``_taken`` moves
        by the difference in length."""
        if len(self._ids) < 2 * self._window:
            return
        cut = len(self._ids) - self._window
        tail = self._decode(self._ids[cut:])
        garbage = len(tail) - len(tail.lstrip(REPLACEMENT))
        if text.endswith(tail[garbage:]) and self._taken >= len(text) - len(tail) + garbage:
            self._ids = self._ids[cut:]
            self._taken -= len(text) - len(tail)
            self._last_length = len(tail)

    def _release(self, new: str, final: bool) -> str:
        text = self._held + new
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.stop_string = min(hits)
            self.stopped = True
            self._held = ""
            return text[:at]
        keep = 0 if final else self._stop_prefix_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _stop_prefix_length(self, text: str) -> int:
        """The length of the longest end of ``text`` that is the beginning of a stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


def stream_text(
    model: BlackMamba,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop: Iterable[str] = (),
    streamer: TextStreamer | None = None,
    **options,
) -> Iterator[str]:
    """Generate after one prompt (token ids) and yield the new text in printable pieces, ending before the
    first stop string. ``options`` go to :func:`~blackmamba.generation.stream_generate` (temperature, top_k,
    top_p, repetition_penalty, eos_token_id, seed, ...). Pass a ``streamer`` to read its token count or
    ``stop_string`` afterwards (its own stop strings are used, and ``stop`` must be empty)."""
    if streamer is None:
        streamer = TextStreamer(tokenizer, stop)
    elif tuple(stop):
        raise GenerationError("give the stop strings to the streamer or to stream_text, not both", "stop")
    for step in stream_generate(model, [prompt_ids], max_new_tokens, **options):
        if step[0] is None:
            break
        piece = streamer.put(step[0])
        if piece:
            yield piece
        if streamer.stopped:
            return
    rest = streamer.finish()
    if rest:
        yield rest


def generate_text(
    model: BlackMamba, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, stop: Iterable[str] = (), **options
) -> str:
    """The continuation of the text ``prompt`` (without the prompt), cut before the first stop string.
    ``options`` as for :func:`stream_text`; the tokenizer's end-of-text id stops generation unless
    ``eos_token_id`` is given (None: never stop at it)."""
    from ..tokenizer import eos_token_id

    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise GenerationError("the prompt encodes to no tokens", "prompt")
    options.setdefault("eos_token_id", eos_token_id(tokenizer))
    return "".join(stream_text(model, tokenizer, ids, max_new_tokens, stop, **options))
