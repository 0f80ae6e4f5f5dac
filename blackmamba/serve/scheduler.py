"""Continuous batching: one thread runs the model for every request, between HTTP handlers and the state pool.

Each iteration of the loop:

1. takes in new requests and cancellations, fails requests past their deadline;
2. admits waiting requests while the pool has free slots, starting each from the longest prefix the prompt
   cache holds (:mod:`.prompt_cache`);
3. launches one decode step over every stream that has its first token (one batched ``engine.decode``);
4. prefills prompt chunks within a token budget per iteration (``max_num_batched_tokens`` less one token per
   running stream; at least one chunk always runs, so prefill never starves and the running streams wait for
   at most one budget of prompt tokens per step). Chunks end on the prompt cache's grid of ``interval``
   positions, which is what makes cached and uncached prompts compute the same numbers. The chunks of an
   iteration run batched, as few forwards as exactness allows (:meth:`Scheduler._prefill_groups`): on a GPU
   a forward costs about the same host time whatever its batch, so one forward for many prompts instead of
   one per prompt is most of the server's throughput under load;
5. samples the next token of every stream that got logits in this step (decode rows and prompts just
   finished) in one batched call, reads the tokens back (the one read from the device per iteration) and
   hands each request its token ids through its sink.

Turning ids into text (UTF-8-safe, stop strings) and into JSON is the HTTP side's work, off this thread; a
request with stop strings is also followed here by a :class:`TextStreamer`, only to know when to stop.

A finished, stopped, timed-out or cancelled stream gives its slot back at once.

The same answers as offline. A request samples exactly as :func:`blackmamba.generate` does for one prompt
(the same logit processing; with a ``seed``, one uniform number per token from its own ``torch.Generator``),
and its decode steps compute each row as if it ran alone, so a request whose prompt was prefilled alone gets
the tokens offline generation gives it, bit for bit, whatever else shares the decode batch. A prompt chunk
prefilled in a batch with others is computed as the model computes a batch: the same positions and
state, but matrix products over more rows, which may round differently (on a CPU a one-row product takes
another kernel than a many-row one; on a GPU tile sizes follow the token count), so its state and logits can
differ from a lone prefill in the last bits, and a greedy or seeded continuation can then differ where two
tokens are within that rounding of each other. Offline :func:`blackmamba.generate` of the same prompts as one
batch (prompts of one chunk each) computes exactly what a batched prefill does, and the tests hold the server
to it. ``max_prefill_batch=1`` prefills every prompt alone and restores bit-for-bit equality with
single-prompt generation, at the cost of one forward per prompt chunk.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..generation import Decoder, SamplingOptions
from ..generation.text import TextStreamer
from .engine import PoolEngine
from .metrics import ServerMetrics
from .prompt_cache import CacheEntry, PrefixKeys, PromptCache

log = logging.getLogger("blackmamba.serve")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already (HTTP 429)."""


class ShuttingDown(Exception):
    """The server stops taking requests (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings, already validated by the HTTP layer."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # top-N alternatives per generated token (0: the chosen token's only)
    prompt_logprobs: bool = False  # log-probabilities of the prompt tokens too (echo with logprobs)
    ignore_eos: bool = False

    @property
    def options(self) -> SamplingOptions:
        return SamplingOptions(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
        )


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the N most likely tokens at this position, most likely first


@dataclass(frozen=True)
class Delta:
    """New output of a request: the ``tokens`` sampled, and their log-probabilities when asked for; ``text``
    safe to show (empty while a character or a possible stop string is incomplete) is added by the consumer,
    which runs its own :class:`TextStreamer` over the tokens.
    The first event of a request asking for prompt log-probabilities carries them (one per prompt token,
    None for the first) and no token."""

    text: str = ""  # filled by the consumer (the HTTP side decodes): the scheduler sends ids only
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of a successful request: ``reason`` is stop or length (or abort, never sent)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str = ""  # text released only now (held back until the end); added by the consumer


@dataclass(frozen=True)
class Failed:
    """The last event of a request that could not complete: an HTTP status and a message."""

    status: int
    message: str
    kind: str = "server_error"


Event = Delta | Finished | Failed
Sink = Callable[[Event], None]

_WAITING, _PREFILL, _DECODE, _DONE = "waiting", "prefill", "decode", "done"
_EMPTY = ()


@dataclass(eq=False)
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    sink: Sink
    arrival: float
    deadline: float
    phase: str = _WAITING
    slot: int | None = None
    pos: int = 0  # prompt tokens in the state (or planned for this iteration)
    cached: int = 0
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # seeded requests only: the others share the scheduler's
    seen: Tensor | None = None
    stopper: TextStreamer | None = None  # requests with stop strings only: finds where to stop
    keys: PrefixKeys | None = None
    prompt_lp: list[TokenLogprob | None] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    last_emit: float = 0.0


class Scheduler:
    """Owns the engine, the prompt cache and every request; :meth:`start` runs its loop in a thread.

    ``submit`` and ``abort`` may be called from any thread; events reach each request's ``sink`` from the
    scheduler's thread."""

    def __init__(
        self,
        engine: PoolEngine,
        tokenizer: Tokenizer,
        *,
        max_queue: int,
        max_num_batched_tokens: int,
        prompt_cache: PromptCache,
        metrics: ServerMetrics,
        eos_token_id: int | None,
        max_prefill_batch: int = 64,
    ) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_prefill_batch < 1:
            raise ValueError(f"max_prefill_batch must be >= 1, got {max_prefill_batch}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_batch = max_prefill_batch
        self.cache = prompt_cache
        self.interval = prompt_cache.interval
        self.metrics = metrics
        self.eos_token_id = eos_token_id
        self.device = engine.device
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[_Request] = deque()
        self._aborts: deque[int] = deque()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ready: list[tuple[_Request, Tensor]] = []  # whole prompt in the state: first token due this step
        # Unseeded sampling draws from one generator for all requests (one draw per step, not one per request).
        self._shared = torch.Generator(device=self.device).manual_seed(random.getrandbits(63))
        self._processors: dict[SamplingOptions, Decoder] = {}
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self._n_waiting = 0  # waiting + inbox, read by submit and the metrics

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._n_waiting

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="blackmamba-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink, timeout: float) -> int:
        """Queue a request; returns its id. Raises :class:`QueueFull` or :class:`ShuttingDown`."""
        now = time.monotonic()
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._n_waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._n_waiting += 1
            request = _Request(next(self._ids), list(prompt), params, sink, now, now + timeout)
            self._inbox.append(request)
        self._wake.set()
        return request.rid

    def abort(self, rid: int) -> None:
        """Cancel a request (its client went away): its slot is freed at the next iteration."""
        with self._lock:
            self._aborts.append(rid)
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, fail those still queued or running with 503, and join the thread."""
        with self._lock:
            self._accepting = False
            self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                self._take_inbox()
                if self._stop:
                    for request in [*self._waiting, *self._running]:
                        self._fail(request, 503, "the server is shutting down", "service_unavailable")
                    return
                if not self._waiting and not self._running:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                try:
                    self._iteration()
                except Exception:
                    # A bug or an out-of-memory error in one step must not take the server down: the requests
                    # of this step get a 500 and the loop goes on with the next ones.
                    log.exception("scheduler iteration failed")
                    self._ready = []
                    for request in list(self._running):
                        self._fail(request, 500, "internal error while generating; see the server log")

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = set(self._aborts), deque()
        self._waiting.extend(new)
        if aborts:
            for request in [r for r in [*self._waiting, *self._running] if r.rid in aborts]:
                self._finish(request, "abort")

    def _iteration(self) -> None:
        now = time.monotonic()
        for request in [r for r in [*self._waiting, *self._running] if now > r.deadline]:
            self._fail(request, 504, "the request timed out", "timeout")
        self._admit(now)
        decoding = [r for r in self._running if r.phase == _DECODE]
        chunks = self._plan_prefill(self.max_num_batched_tokens - len(decoding))
        t0 = time.monotonic()
        rows: list[_Request] = []
        logits: list[Tensor] = []
        if decoding:
            # The step is queued first: on a GPU it runs while the host launches the prefill below.
            slots = [r.slot for r in decoding]
            logits.append(self.engine.decode(slots, self.engine.next_tokens(slots)))
            rows += decoding
        for group in self._prefill_groups(chunks):
            group = [c for c in group if c[0].phase == _PREFILL]  # a request may have failed meanwhile
            if group:
                self._prefill(group)
        ready, self._ready = self._start_decoding(self._ready), []
        if ready:
            rows += [r for r, _ in ready]
            logits.append(torch.stack([lg for _, lg in ready]))
        if rows:
            self._emit_tokens(rows, logits[0] if len(logits) == 1 else torch.cat(logits))
        if decoding and not chunks:
            self.metrics.decode_step.observe(time.monotonic() - t0)

    def _admit(self, now: float) -> None:
        while self._waiting and self.engine.free_slots:
            request = self._waiting.popleft()
            self._n_waiting -= 1
            request.slot = self.engine.acquire()
            request.admitted = now
            request.phase = _PREFILL
            self._running.append(request)
            self.metrics.queue_time.observe(now - request.arrival)
            params = request.params
            if params.stop:
                request.stopper = TextStreamer(self.tokenizer, params.stop)
            if params.seed is not None and params.temperature > 0:
                request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
            if params.repetition_penalty is not None:
                request.seen = torch.zeros(1, self.engine.vocab_size, dtype=torch.bool, device=self.device)
                request.seen[0, request.prompt] = True
            if self.cache.enabled:
                request.keys = PrefixKeys(request.prompt, self.interval)
                # Prompt log-probabilities need every position's logits, so such a request computes them all.
                entry = None if params.prompt_logprobs else self.cache.lookup(request.keys)
                if entry is not None:
                    self.engine.restore(request.slot, entry.state)
                    request.pos = request.cached = entry.length
                    if entry.length == len(request.prompt):
                        self._ready.append((request, entry.logits))

    def _plan_prefill(self, budget: int) -> list[tuple[_Request, int, int]]:
        """Chunks (request, start, end) for this iteration, each ending on the grid or at the prompt end."""
        chunks = []
        for request in self._running:
            while request.phase == _PREFILL and request.pos < len(request.prompt):
                end = min(len(request.prompt), (request.pos // self.interval + 1) * self.interval)
                if chunks and end - request.pos > budget:
                    return chunks
                chunks.append((request, request.pos, end))
                budget -= end - request.pos
                request.pos = end
        return chunks

    def _prefill_groups(self, chunks: list[tuple[_Request, int, int]]) -> list[list[tuple[_Request, int, int]]]:
        """The chunks of one iteration as forwards, in the order they must run.

        A request's later chunk continues from its earlier one, so the chunks go in waves (every request's
        first chunk of this iteration, then the second ones, ...). Within a wave, chunks of one length run
        together without padding; first chunks (a zero state) of other lengths run left-padded, longest
        first, a group closing where padding would more than double its work. A request that wants the
        log-probabilities of its prompt runs alone (it needs every position's logits)."""
        waves: list[list[tuple[_Request, int, int]]] = []
        seen: dict[int, int] = {}
        for chunk in chunks:
            k = seen.get(chunk[0].rid, 0)
            seen[chunk[0].rid] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(chunk)
        groups = []
        for wave in waves:
            by_length: dict[int, list[tuple[_Request, int, int]]] = {}
            fresh = []
            for chunk in wave:
                request, start, end = chunk
                if request.params.prompt_logprobs or self.max_prefill_batch == 1:
                    groups.append([chunk])
                elif start == 0:
                    fresh.append(chunk)
                else:
                    by_length.setdefault(end - start, []).append(chunk)
            fresh.sort(key=lambda c: c[2], reverse=True)
            padded: list[list[tuple[_Request, int, int]]] = []
            for chunk in fresh:
                same = by_length.get(chunk[2])
                if same is not None:
                    same.append(chunk)
                elif padded and 2 * chunk[2] >= padded[-1][0][2]:
                    padded[-1].append(chunk)
                else:
                    padded.append([chunk])
            for group in [*by_length.values(), *padded]:
                n = self.max_prefill_batch
                groups += [group[i : i + n] for i in range(0, len(group), n)]
        return groups

    def _prefill(self, group: list[tuple[_Request, int, int]]) -> None:
        """One forward over the chunks of ``group``; prompts it completes join ``_ready``."""
        t0 = time.monotonic()
        if len(group) == 1:
            request, start, end = group[0]
            rows = [self._prefill_chunk(request, start, end)]
        else:
            slots = [request.slot for request, _, _ in group]
            rows = list(self.engine.prefill_batch(slots, [r.prompt[s:e] for r, s, e in group]))
            for (request, _, end), logits in zip(group, rows, strict=True):
                self._cache_state(request, end, logits)
        self.metrics.prefill_chunk.observe(time.monotonic() - t0)
        for (request, _, end), logits in zip(group, rows, strict=True):
            if end == len(request.prompt):
                self._ready.append((request, logits))

    def _prefill_chunk(self, request: _Request, start: int, end: int) -> Tensor:
        want_all = request.params.prompt_logprobs
        logits = self.engine.prefill(request.slot, request.prompt[start:end], all_logits=want_all)
        if want_all:
            if start == 0:
                request.prompt_lp.append(None)
            following = torch.tensor(request.prompt[start + 1 : end], dtype=torch.long, device=self.device)
            if len(following):
                request.prompt_lp.extend(self._logprobs(logits[: len(following)], following, self._top_n(request)))
            logits = logits[-1]
        self._cache_state(request, end, logits)
        return logits

    def _cache_state(self, request: _Request, end: int, logits: Tensor) -> None:
        """Keep the state of ``request``'s slot after ``end`` prompt tokens, if it is on the grid or the end."""
        if self.cache.enabled:
            last = end == len(request.prompt)
            if end % self.interval == 0:
                key = request.keys.boundary(end // self.interval)
                if not self.cache.contains(key, with_logits=last):
                    state = self.engine.snapshot(request.slot)
                    self.cache.insert(key, CacheEntry(end, state, logits.clone() if last else None))
            elif last and not self.cache.contains(request.keys.end, with_logits=True):
                self.cache.insert(request.keys.end, CacheEntry(end, self.engine.snapshot(request.slot), logits.clone()))

    @staticmethod
    def _top_n(request: _Request) -> int:
        return request.params.logprobs or 0

    def _processor(self, options: SamplingOptions) -> Decoder:
        processor = self._processors.get(options)
        if processor is None:
            if len(self._processors) > 256:  # options come from clients: keep the table bounded
                self._processors.clear()
            processor = self._processors[options] = Decoder(self.engine.model, options, use_graphs=False)
        return processor

    def _uniforms(self, requests: list[_Request], temperature: float) -> Tensor:
        # A seeded request draws exactly what stream_generate draws for a batch of one: one rand per token from
        # its own generator. The others share one draw per step.
        if temperature == 0:
            return torch.zeros(len(requests), device=self.device)
        shared = torch.rand(len(requests), generator=self._shared, device=self.device)
        seeded = [i for i, r in enumerate(requests) if r.generator is not None]
        if not seeded:
            return shared
        if len(seeded) == len(requests):
            return torch.cat([torch.rand(1, generator=r.generator, device=self.device) for r in requests])
        own = torch.cat([torch.rand(1, generator=requests[i].generator, device=self.device) for i in seeded])
        return shared.index_copy(0, self.engine.to_device(seeded), own)

    def _sample(self, requests: list[_Request], logits: Tensor) -> Tensor:
        groups: dict[SamplingOptions, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.params.options, []).append(i)
        if len(groups) == 1:  # one set of options for the whole step (the common case): no gather
            ((options, _),) = groups.items()
            return self._process(options, requests, logits)
        tokens = torch.empty(len(requests), dtype=torch.long, device=self.device)
        for options, rows in groups.items():
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            tokens[index] = self._process(options, [requests[i] for i in rows], logits.index_select(0, index))
        return tokens

    def _process(self, options: SamplingOptions, requests: list[_Request], logits: Tensor) -> Tensor:
        seen = None if options.repetition_penalty is None else torch.cat([r.seen for r in requests])
        return self._processor(options).process(logits, seen, self._uniforms(requests, options.temperature))

    def _logprobs(self, logits: Tensor, chosen: Tensor, top_n: int) -> list[TokenLogprob]:
        """Log-probabilities of the model's distribution (before temperature and filtering), as OpenAI's API
        reports them; ids the tokenizer cannot produce are excluded."""
        logits = logits.float()
        usable = self.engine.model.config.tokenizer_vocab_size
        if usable and usable < logits.shape[-1]:
            logits = logits[:, :usable]
        lp = torch.log_softmax(logits, dim=-1)
        picked = lp.gather(1, chosen[:, None])[:, 0].tolist()
        if not top_n:
            return [TokenLogprob(t, p, ()) for t, p in zip(chosen.tolist(), picked, strict=True)]
        top_vals, top_ids = lp.topk(top_n, dim=-1)
        rows = zip(chosen.tolist(), picked, top_ids.tolist(), top_vals.tolist(), strict=True)
        return [TokenLogprob(t, p, tuple(zip(ids, vals, strict=True))) for t, p, ids, vals in rows]

    def _start_decoding(self, ready: list[tuple[_Request, Tensor]]) -> list[tuple[_Request, Tensor]]:
        """Requests whose prompt is in the state: emit prompt log-probabilities; those that want a first token."""
        ready = [(r, lg) for r, lg in ready if r.phase == _PREFILL]  # not failed meanwhile
        for request, _ in ready:
            request.phase = _DECODE
            self.metrics.prompt_tokens.inc(len(request.prompt))
            if request.params.prompt_logprobs:
                request.sink(Delta(prompt_logprobs=tuple(request.prompt_lp)))
        return [(r, lg) for r, lg in ready if not self._finish_if_done(r)]

    def _emit_tokens(self, requests: list[_Request], logits: Tensor) -> None:
        tokens = self._sample(requests, logits)
        logprobs: list[TokenLogprob | None] = [None] * len(requests)
        want = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if want:
            index = torch.tensor(want, dtype=torch.long, device=self.device)
            top_n = max(self._top_n(requests[i]) for i in want)
            computed = self._logprobs(logits.index_select(0, index), tokens.index_select(0, index), top_n)
            for i, lp in zip(want, computed, strict=True):
                n = self._top_n(requests[i])
                logprobs[i] = TokenLogprob(lp.token, lp.logprob, lp.top[:n])
        self.engine.set_next_tokens([r.slot for r in requests], tokens)
        values = tokens.tolist()  # the iteration's one read from the device
        now = time.monotonic()
        self.metrics.generation_tokens.inc(len(values))
        for request, token, lp in zip(requests, values, logprobs, strict=True):
            self._emit_token(request, token, lp, now)

    def _emit_token(self, request: _Request, token: int, lp: TokenLogprob | None, now: float) -> None:
        m = self.metrics
        if not request.generated:
            request.first_token = now
            m.ttft.observe(now - request.arrival)
        else:
            m.itl.observe(now - request.last_emit)
        request.last_emit = now
        request.generated.append(token)
        if token == self.eos_token_id and not request.params.ignore_eos:
            self._finish(request, "stop")
            return
        if request.seen is not None:
            request.seen[0, token] = True
        request.sink(Delta(tokens=(token,), logprobs=None if lp is None else (lp,)))
        if request.stopper is not None:
            request.stopper.put(token)
            if request.stopper.stopped:
                self._finish(request, "stop")
                return
        self._finish_if_done(request)

    def _finish_if_done(self, request: _Request) -> bool:
        if len(request.generated) >= request.params.max_tokens:
            self._finish(request, "length")
            return True
        return False

    def _release(self, request: _Request) -> None:
        if request.phase == _WAITING:
            self._waiting.remove(request)
            self._n_waiting -= 1
        elif request.phase != _DONE:
            self._running.remove(request)
            self.engine.release(request.slot)
        request.phase = _DONE

    def _finish(self, request: _Request, reason: str) -> None:
        """End a request normally (stop, length) or because its client left (abort): free the slot first."""
        if request.phase == _DONE:
            return
        self._release(request)
        now = time.monotonic()
        m = self.metrics
        m.finished(reason)
        m.e2e.observe(now - request.arrival)
        if request.generated:
            m.decode_time.observe(now - request.first_token)
            m.prefill_time.observe(request.first_token - request.admitted)
        request.sink(Finished(reason, len(request.prompt), len(request.generated), request.cached))

    def _fail(self, request: _Request, status: int, message: str, kind: str = "server_error") -> None:
        if request.phase == _DONE:
            return
        self._release(request)
        self.metrics.finished("abort")
        request.sink(Failed(status, message, kind))
