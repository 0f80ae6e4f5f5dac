"""Serving over HTTP: an OpenAI-compatible server with continuous batching, an exact prompt-state cache,
Prometheus metrics and a playground page (``blackmamba serve``; needs the ``serve`` extra).

    engine.py        the state pool: a fixed-size recurrent state per stream; prefill, batched decode, snapshots
    prompt_cache.py  states at token boundaries and prompt ends, in an LRU bounded in bytes
    scheduler.py     the loop: admit, chunked prefill under a token budget, one decode step over all streams
    schemas.py       request bodies, validated strictly; OpenAI-style errors
    server.py        FastAPI routes, server-sent events, API key and body limits, the background loader
    metrics.py       Prometheus metrics under vLLM's names
    chat.py          chat messages -> prompt (plain template, or Jinja)
    options.py       ServeOptions, from which the CLI's arguments are derived
    static/          the playground page (one HTML file, no build step)

Only ``options`` is imported eagerly, so the CLI works without the extra installed.
"""

from .options import ServeError, ServeOptions

__all__ = ["ServeError", "ServeOptions", "ServerThread", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("ServerThread", "create_app", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
