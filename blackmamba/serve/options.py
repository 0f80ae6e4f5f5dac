"""The server's options, stated once: the dataclass is the Python API, and ``blackmamba serve``'s arguments
are derived from its fields (name, type, default and help text).

This module imports nothing beyond the standard library, so the CLI can list ``serve``'s options without the
``serve`` extra installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from ..errors import BlackMambaError

API_KEY_ENV = "BLACKMAMBA_API_KEY"


class ServeError(BlackMambaError, ValueError):
    """A bad server option or an unusable model directory."""


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServeOptions:
    model: str = field(metadata={"help": "checkpoint directory (released layout or ours)", "required": True})
    host: str = _opt("127.0.0.1", "address to listen on (loopback by default)")
    port: int = _opt(8000, "TCP port (0: any free port)")
    max_batch: int = _opt(64, "state slots: streams decoded together in one step")
    max_queue: int = _opt(1024, "requests waiting for a slot before new ones get 429")
    max_model_len: int = _opt(4096, "prompt plus completion tokens allowed per request")
    max_num_batched_tokens: int = _opt(
        2048, "tokens per scheduler iteration (one per decoding stream, the rest for prompt chunks)"
    )
    max_prefill_batch: int = _opt(
        64, "prompt chunks prefilled together in one forward (1: each alone, bit-exact with offline generate)"
    )
    api_key: str | None = _opt(None, f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV})")
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = _opt("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    chat_template: str | None = _opt(None, "Jinja chat template file (Hugging Face style); default: a plain template")
    served_model_name: str | None = _opt(None, "model name in the API (default: the directory's name)")
    prompt_cache_mib: int = _opt(1024, "memory for cached prompt states, MiB (0: no prompt cache)")
    prompt_cache_interval: int = _opt(256, "tokens between cached states; also the prefill chunk length")
    request_timeout: float = _opt(600.0, "seconds a request may take, queueing included")
    max_body_bytes: int = _opt(4 * 2**20, "largest request body accepted (413 above)")
    shutdown_timeout: float = _opt(30.0, "seconds in-flight requests get to finish at shutdown")
    log_level: str = _opt("info", "uvicorn's log level: critical, error, warning, info, debug")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must be in [0, 65535], got {self.port}")
        for name in (
            "max_batch", "max_queue", "max_model_len", "max_num_batched_tokens", "max_prefill_batch",
            "prompt_cache_interval",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("prompt_cache_mib", "max_body_bytes"):
            if getattr(self, name) < 0:
                raise ServeError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("request_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                raise ServeError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeError("--api-key is empty")

    @property
    def resolved_api_key(self) -> str | None:
        return self.api_key if self.api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per field of :class:`ServeOptions`."""
    for f in dataclasses.fields(ServeOptions):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if f.metadata.get("required"):
            parser.add_argument(flag, required=True, type=kind, help=f.metadata["help"])
        else:
            shown = "" if f.default is None or "default" in f.metadata["help"] else f" (default {f.default})"
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"] + shown)


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    return ServeOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions)})
