"""The HTTP server: OpenAI's completions and chat completions, tokenize / detokenize, health, metrics and a
playground page, on FastAPI + uvicorn.

Handlers run on the event loop and never touch the model: they validate the request (:mod:`.schemas`),
tokenize, hand the prompt to the :class:`~.scheduler.Scheduler` thread and relay its events, as one JSON
response or as server-sent events ending in ``data: [DONE]``. The scheduler sends token ids; each request
turns them into text here (a :class:`~blackmamba.generation.text.TextStreamer` with its stop strings), so
the scheduler's thread does no per-token text work. Events cross from that thread in batches: one wake-up
of the event loop per scheduler step, not one per token (:class:`_Dispatcher`). The model loads in a
background thread after the socket is open, so ``/health`` answers 503 until it is ready.

Robustness: every error is an OpenAI-style object (``{"error": {"message", "type", "param", "code"}}``);
malformed JSON, wrong types, empty or over-long prompts and out-of-range values are 400; a full queue is 429;
a body over ``--max-body-bytes`` is 413; a request past ``--request-timeout`` is 504; with ``--api-key``
every ``/v1/*`` request needs ``Authorization: Bearer KEY`` (401). A client that disconnects has its request
cancelled, which frees its state slot. At shutdown uvicorn lets in-flight requests finish for
``--shutdown-timeout`` seconds, then the scheduler fails the rest with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers import Tokenizer

from .. import __version__
from ..generation.text import TextStreamer
from .chat import ChatTemplate, TemplateError
from .metrics import ServerMetrics
from .options import ServeError, ServeOptions
from .scheduler import Delta, Event, Failed, Finished, QueueFull, SamplingParams, Scheduler, ShuttingDown, TokenLogprob
from .schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad_request,
    parse,
)

log = logging.getLogger("blackmamba.serve")

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DISCONNECT_POLL_S = 0.25
# How long a thread may hold the GIL while another waits (Python's default is 5 ms). The scheduler thread
# comes back from every device step wanting it while the event loop formats and sends tokens; 5 ms would be
# longer than a decode step.
SWITCH_INTERVAL_S = 0.0005


@dataclass
class ServerState:
    """What the handlers share; the model side is filled in by the loading thread."""

    options: ServeOptions
    model_name: str
    metrics: ServerMetrics
    template: ChatTemplate
    api_key: str | None
    created: int = field(default_factory=lambda: int(time.time()))
    ready: bool = False
    error: str | None = None
    tokenizer: Tokenizer | None = None
    scheduler: Scheduler | None = None
    model_vocab: int = 0
    on_fatal: Callable[[], None] | None = None
    dispatcher: _Dispatcher | None = None

    def require_ready(self) -> Scheduler:
        if self.error is not None:
            raise ApiError(503, f"the model failed to load: {self.error}", "service_unavailable")
        if not self.ready or self.scheduler is None:
            raise ApiError(503, "the model is still loading; retry when /health answers 200", "service_unavailable")
        return self.scheduler


def load_into(state: ServerState) -> None:
    """Load the model, tokenizer, state pool and scheduler (the slow part), then mark the server ready."""
    import torch

    from ..checkpoint import load_pretrained
    from ..devices import resolve_device, resolve_dtype
    from ..tokenizer import eos_token_id, load_tokenizer
    from .engine import PoolEngine
    from .prompt_cache import PromptCache

    o = state.options
    start = time.monotonic()
    try:
        device = resolve_device(o.device)
        dtype = resolve_dtype(o.dtype, device)
    except ValueError as e:
        raise ServeError(f"--device/--dtype: {e}") from None
    model = load_pretrained(o.model, device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(o.model, model.config.vocab_size)
    engine = PoolEngine(model, o.max_batch)
    engine.warm_up()
    cache = PromptCache(o.prompt_cache_mib * 2**20, o.prompt_cache_interval)
    scheduler = Scheduler(
        engine,
        tokenizer,
        max_queue=o.max_queue,
        max_num_batched_tokens=o.max_num_batched_tokens,
        max_prefill_batch=o.max_prefill_batch,
        prompt_cache=cache,
        metrics=state.metrics,
        eos_token_id=eos_token_id(tokenizer),
    )
    state.metrics.watch(
        lambda: {
            "num_requests_running": scheduler.num_running,
            "num_requests_waiting": scheduler.num_waiting,
            "prefix_cache_queries": cache.queries,
            "prefix_cache_hits": cache.hits,
        }
    )
    scheduler.start()
    state.tokenizer, state.scheduler, state.model_vocab = tokenizer, scheduler, model.config.vocab_size
    state.ready = True
    log.info(
        "model %s loaded in %.1f s on %s (%s, %d CPU threads): %d slots of %.2f MiB each",
        state.model_name, time.monotonic() - start, device, str(model.dtype).removeprefix("torch."),
        torch.get_num_threads(), o.max_batch, engine.state_bytes / 2**20,
    )  # fmt: skip


def _load_in_background(state: ServerState) -> None:
    try:
        load_into(state)
    except Exception as e:  # reported by /health and, for `blackmamba serve`, as the exit error
        state.error = str(e) or type(e).__name__
        log.error("loading the model failed: %s", state.error, exc_info=not isinstance(e, ServeError | OSError))
        if state.on_fatal is not None:
            state.on_fatal()


class _Guard:
    """ASGI middleware in front of every route: the API key on ``/v1/*`` and the request body size limit."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = self.state.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + key.encode()):
                what = "missing" if not given else "wrong"
                await _send_error(
                    send, ApiError(401, f"{what} API key: send 'Authorization: Bearer KEY'", "authentication_error")
                )
                return
        limit = self.state.options.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            await _send_error(send, _too_large(limit))
            return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit:,} bytes", "invalid_request_error")


async def _send_error(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"malformed JSON in the request body: {e}") from None


class _Dispatcher:
    """Carries events from the scheduler's thread to one event loop. The first event of a batch schedules
    one drain of the loop; the events that follow before it runs join it. So a scheduler step that emits a
    token for each of 64 streams wakes the loop once, not 64 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: deque[tuple[_Job, Event]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def push(self, job: _Job, event: Event) -> None:
        with self._lock:
            self._pending.append((job, event))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, deque()
            self._scheduled = False
        for job, event in batch:
            job.deliver(event)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Job:
    """One request's events, carried from the scheduler thread to the handler's event loop, with the text of
    its tokens (decoded here, with the request's stop strings)."""

    def __init__(
        self, scheduler: Scheduler, dispatcher: _Dispatcher, timeout: float, tokenizer: Tokenizer, stop: tuple[str, ...]
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.loop = dispatcher.loop
        self.events: deque[Event] = deque()
        self.streamer = TextStreamer(tokenizer, stop)
        self.deadline = time.monotonic() + timeout + 5.0  # the scheduler times out first; this is a backstop
        self.rid: int | None = None
        self.done = False
        self._waiter: asyncio.Future | None = None

    def sink(self, event: Event) -> None:
        """Called by the scheduler's thread."""
        self.dispatcher.push(self, event)

    def deliver(self, event: Event) -> None:
        """Called on the event loop."""
        self.events.append(event)
        if self._waiter is not None:
            _wake(self._waiter)

    def _text(self, event: Event) -> Event:
        if isinstance(event, Delta) and event.tokens:
            return replace(event, text="".join([self.streamer.put(t) for t in event.tokens]))
        if isinstance(event, Finished):
            self.done = True
            return replace(event, text=self.streamer.finish())
        if isinstance(event, Failed):
            self.done = True
        return event

    async def next(self, request: Request) -> Event:
        """The next event; cancels the request (and raises ``CancelledError``) if the client went away."""
        while True:
            if self.events:
                return self._text(self.events.popleft())
            # A bare future and a timer: cheaper than asyncio.wait_for, which wraps each wait in a task.
            self._waiter = self.loop.create_future()
            timer = self.loop.call_later(DISCONNECT_POLL_S, _wake, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if self.events:
                continue
            if await request.is_disconnected():
                self.close()
                raise asyncio.CancelledError("client disconnected")
            if time.monotonic() > self.deadline:
                self.close()
                return Failed(504, "the request timed out", "timeout")

    def close(self) -> None:
        if not self.done and self.rid is not None:
            self.done = True
            self.scheduler.abort(self.rid)


@dataclass
class _Prepared:
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise ApiError(
            404, f"the model `{name}` does not exist; this server has `{state.model_name}`", "not_found_error", "model"
        )


def _check_ids(state: ServerState, ids: list[int], what: str, limit: int) -> None:
    bad = [t for t in ids if not 0 <= t < limit]
    if bad:
        raise bad_request(f"{what} has token ids outside [0, {limit}): {bad[:5]}", what)


def _sampling(
    state: ServerState,
    req,
    prompt_len: int,
    max_tokens: int | None,
    default: int | None,
    logprobs: int | None,
    prompt_logprobs: bool,
    extra_stops: tuple[str, ...],
) -> SamplingParams:
    max_len = state.options.max_model_len
    if prompt_len > max_len:
        raise bad_request(
            f"the prompt has {prompt_len} tokens; this server allows {max_len} (--max-model-len)", "prompt"
        )
    if max_tokens is None:
        max_tokens = max_len - prompt_len if default is None else min(default, max_len - prompt_len)
    if prompt_len + max_tokens > max_len:
        raise bad_request(
            f"this model's maximum context length is {max_len} tokens, but {prompt_len + max_tokens} were requested "
            f"({prompt_len} in the prompt, {max_tokens} to generate)",
            "max_tokens",
        )
    top_k = None if req.top_k in (None, -1, 0) else req.top_k
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_k=top_k,
        top_p=None if req.top_p in (None, 1.0) else req.top_p,
        repetition_penalty=None if req.repetition_penalty in (None, 1.0) else req.repetition_penalty,
        stop=tuple(dict.fromkeys([*req.stop, *extra_stops])),
        seed=req.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        ignore_eos=req.ignore_eos,
    )


async def _encode(state: ServerState, text: str) -> list[int]:
    return (await run_in_threadpool(state.tokenizer.encode, text)).ids


async def _prepare_completion(state: ServerState, req: CompletionRequest) -> _Prepared:
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise bad_request("the prompt is empty", "prompt")
        ids, text = await _encode(state, req.prompt), req.prompt
        if not ids:
            raise bad_request("the prompt encodes to no tokens", "prompt")
    else:
        ids = list(req.prompt)
        if not ids:
            raise bad_request("the prompt is empty", "prompt")
        _check_ids(state, ids, "prompt", state.model_vocab)
        text = state.tokenizer.decode(ids) if req.echo else ""
    params = _sampling(
        state, req, len(ids), req.max_tokens, DEFAULT_COMPLETION_TOKENS, req.logprobs,
        req.echo and req.logprobs is not None, (),
    )  # fmt: skip
    return _Prepared(ids, text, params)


async def _prepare_chat(state: ServerState, req: ChatCompletionRequest) -> _Prepared:
    text = state.template.render(req.rendered_messages())
    ids = await _encode(state, text)
    if not ids:
        raise bad_request("the messages render to an empty prompt", "messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    top = req.top_logprobs or 0 if req.logprobs else None
    params = _sampling(state, req, len(ids), max_tokens, None, top, False, state.template.stops)
    return _Prepared(ids, text, params)


def _submit(state: ServerState, prepared: _Prepared) -> _Job:
    scheduler = state.require_ready()
    loop = asyncio.get_running_loop()
    if state.dispatcher is None or state.dispatcher.loop is not loop:
        state.dispatcher = _Dispatcher(loop)
    job = _Job(scheduler, state.dispatcher, state.options.request_timeout, state.tokenizer, prepared.params.stop)
    try:
        job.rid = scheduler.submit(prepared.prompt_ids, prepared.params, job.sink, state.options.request_timeout)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error") from None
    except ShuttingDown as e:
        raise ApiError(503, str(e), "service_unavailable") from None
    return job


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character: printable Latin-1 bytes stand for
    themselves, the other 68 bytes take the characters from U+0100 on, in byte order. This inverts that."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: chr(b) for b in printable}
    rest = (b for b in range(256) if b not in chars)
    chars.update((b, chr(256 + i)) for i, b in enumerate(rest))
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes a token stands for (a byte-level token may hold part of a UTF-8 character)."""
    piece = tokenizer.id_to_token(token)
    byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
    if byte_level and piece is not None and all(c in _BYTE_OF for c in piece):
        return bytes(_BYTE_OF[c] for c in piece)
    return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token as OpenAI's log-probabilities show it: its text, or ``bytes:\\xNN...`` when its bytes are not
    whole UTF-8 characters (so different partial tokens stay different keys)."""
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class _Output:
    """The pieces of one request's output, gathered from its events (for the JSON response or the stream)."""

    def __init__(self, tokenizer: Tokenizer, text_offset: int) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self.offset = text_offset
        self.logprobs: list[TokenLogprob] = []
        self.offsets: list[int] = []
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self.finished: Finished | None = None

    def add(self, event: Delta) -> None:
        if event.prompt_logprobs is not None:
            self.prompt_logprobs = event.prompt_logprobs
        for lp in event.logprobs or ():
            self.logprobs.append(lp)
            self.offsets.append(self.offset + len(self.text))
        self.text += event.text


def _usage(finished: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finished.cached_tokens},
    }


def _legacy_logprobs(
    tokenizer: Tokenizer, entries: list[TokenLogprob | None], ids: list[int], offsets: list[int]
) -> dict[str, Any]:
    """The /v1/completions log-probability object (token strings, their log-probabilities, the top-N)."""
    return {
        "tokens": [_token_text(tokenizer, t) for t in ids],
        "token_logprobs": [None if e is None else e.logprob for e in entries],
        "top_logprobs": [None if e is None else {_token_text(tokenizer, t): v for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }


def _prompt_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    offsets, at = [], 0
    for t in ids:
        offsets.append(at)
        at += len(tokenizer.decode([t], skip_special_tokens=False))
    return offsets


def _completion_logprobs(state: ServerState, prepared: _Prepared, out: _Output, echo: bool) -> dict[str, Any] | None:
    if prepared.params.logprobs is None:
        return None
    entries: list[TokenLogprob | None] = list(out.logprobs)
    ids = [e.token for e in out.logprobs]
    offsets = list(out.offsets)
    if echo and out.prompt_logprobs is not None:
        entries = [*out.prompt_logprobs, *entries]
        ids = [*prepared.prompt_ids, *ids]
        offsets = [*_prompt_offsets(state.tokenizer, prepared.prompt_ids), *offsets]
    return _legacy_logprobs(state.tokenizer, entries, ids, offsets)


def _chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]} for e in entries]}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _collect(job: _Job, request: Request, out: _Output) -> Finished:
    try:
        while True:
            event = await job.next(request)
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, event.kind)
            if isinstance(event, Finished):
                out.text += event.text
                out.finished = event
                return event
            out.add(event)
    finally:
        job.close()


def create_app(options: ServeOptions, load: bool = True) -> tuple[FastAPI, ServerState]:
    """The ASGI app and its state; with ``load`` the model loads in a background thread at startup."""
    template = ChatTemplate(options.chat_template)
    name = options.served_model_name or Path(options.model).resolve().name
    state = ServerState(options, name, ServerMetrics(name), template, options.resolved_api_key)
    playground = resources.files("blackmamba.serve").joinpath("static/playground.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load:
            threading.Thread(target=_load_in_background, args=(state,), name="blackmamba-load", daemon=True).start()
        yield
        state.ready = False
        if state.scheduler is not None:
            await run_in_threadpool(state.scheduler.shutdown)

    app = FastAPI(title="blackmamba", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(TemplateError)
    async def template_error(request: Request, exc: TemplateError) -> JSONResponse:
        return await api_error(request, bad_request(str(exc), "messages"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return await api_error(request, ApiError(500, "internal server error; see the server log", "server_error"))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.error is not None:
            return JSONResponse({"status": "error", "message": state.error}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "blackmamba",
            "max_model_len": options.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = parse(TokenizeRequest, await _read_json(request))
        _check_model(state, req.model)
        state.require_ready()
        text = (
            req.prompt
            if req.prompt is not None
            else state.template.render(
                [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
            )
        )
        ids = await _encode(state, text)
        return {"count": len(ids), "max_model_len": options.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = parse(DetokenizeRequest, await _read_json(request))
        _check_model(state, req.model)
        state.require_ready()
        _check_ids(state, req.tokens, "tokens", state.tokenizer.get_vocab_size())
        return {"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await _read_json(request))
        _check_model(state, req.model)
        state.require_ready()
        prepared = await _prepare_completion(state, req)
        job = _submit(state, prepared)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo_text = prepared.prompt_text if req.echo else ""
        if req.stream:
            return StreamingResponse(
                _completion_stream(state, request, job, prepared, req, rid, created, echo_text),
                media_type="text/event-stream",
            )
        out = _Output(state.tokenizer, len(echo_text))
        finished = await _collect(job, request, out)
        choice = {
            "index": 0,
            "text": echo_text + out.text,
            "logprobs": _completion_logprobs(state, prepared, out, req.echo),
            "finish_reason": finished.reason,
        }
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": [choice],
                "usage": _usage(finished),
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatCompletionRequest, await _read_json(request))
        _check_model(state, req.model)
        state.require_ready()
        prepared = await _prepare_chat(state, req)
        job = _submit(state, prepared)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(
                _chat_stream(state, request, job, req, rid, created), media_type="text/event-stream"
            )
        out = _Output(state.tokenizer, 0)
        finished = await _collect(job, request, out)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": _chat_logprobs(state.tokenizer, out.logprobs) if req.logprobs else None,
            "finish_reason": finished.reason,
        }
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": state.model_name,
                "choices": [choice],
                "usage": _usage(finished),
            }
        )

    app.add_middleware(_Guard, state=state)
    return app, state


def _error_event(event: Failed) -> str:
    return _sse(ApiError(event.status, event.message, event.kind).body())


async def _completion_stream(
    state: ServerState,
    request: Request,
    job: _Job,
    prepared: _Prepared,
    req: CompletionRequest,
    rid: str,
    created: int,
    echo_text: str,
) -> AsyncIterator[str]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    tokenizer = state.tokenizer
    offset = len(echo_text)

    def chunk(text: str, logprobs: dict | None = None, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

    try:
        if echo_text and not prepared.params.prompt_logprobs:
            yield chunk(echo_text)
        while True:
            event = await job.next(request)
            if isinstance(event, Failed):
                yield _error_event(event)
                break
            if isinstance(event, Finished):
                if event.text:
                    yield chunk(event.text)
                yield chunk("", finish=event.reason)
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event)})
                break
            if event.prompt_logprobs is not None:
                ids = prepared.prompt_ids
                entries = list(event.prompt_logprobs)
                yield chunk(echo_text, _legacy_logprobs(tokenizer, entries, ids, _prompt_offsets(tokenizer, ids)))
                continue
            logprobs = None
            if prepared.params.logprobs is not None:
                logprobs = _legacy_logprobs(tokenizer, list(event.logprobs), list(event.tokens), [offset])
            if event.text or logprobs is not None:
                yield chunk(event.text, logprobs)
            offset += len(event.text)
        yield "data: [DONE]\n\n"
    finally:
        job.close()


async def _chat_stream(
    state: ServerState, request: Request, job: _Job, req: ChatCompletionRequest, rid: str, created: int
) -> AsyncIterator[str]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    def chunk(delta: dict[str, Any], logprobs: dict | None = None, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.next(request)
            if isinstance(event, Failed):
                yield _error_event(event)
                break
            if isinstance(event, Finished):
                if event.text:
                    yield chunk({"content": event.text})
                yield chunk({}, finish=event.reason)
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(event)})
                break
            logprobs = _chat_logprobs(state.tokenizer, list(event.logprobs)) if req.logprobs else None
            if event.text or logprobs is not None:
                yield chunk({"content": event.text}, logprobs)
        yield "data: [DONE]\n\n"
    finally:
        job.close()


class ServerThread:
    """The server in a background thread of this process, for tests, notebooks and benchmarks::

    with ServerThread(ServeOptions(model=DIR, port=0)) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
    """

    def __init__(self, options: ServeOptions) -> None:
        self.app, self.state = create_app(options)
        config = uvicorn.Config(
            self.app,
            host=options.host,
            port=options.port,
            log_level=options.log_level,
            timeout_graceful_shutdown=int(options.shutdown_timeout),
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="blackmamba-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self, timeout: float = 120.0) -> ServerThread:
        """Start and wait until the model is loaded (raises :class:`ServeError` if loading fails)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not (self.server.started and (self.state.ready or self.state.error)):
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise ServeError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        if self.state.error:
            self.stop()
            raise ServeError(self.state.error)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(options: ServeOptions) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM (what ``blackmamba serve`` does)."""
    from ..checkpoint import load_config

    load_config(options.model)  # a missing or broken checkpoint fails now, not after the socket is open
    app, state = create_app(options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        timeout_graceful_shutdown=int(options.shutdown_timeout),
    )
    server = uvicorn.Server(config)

    def fatal() -> None:
        server.should_exit = True

    state.on_fatal = fatal
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(level=options.log_level.upper(), format="%(levelname)s:     %(message)s")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again once it has restored the
    # previous handlers; with these, a graceful stop ends the process normally (exit 0).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main_thread else None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if state.error is not None:
        raise ServeError(state.error)
