"""Chat messages -> one prompt string: a plain documented template for the base models, or a Jinja file.

BlackMamba's released models are base models with no chat format of their own, so the default template is
plain text that a base model continues naturally::

    {system message}            (if any, followed by a blank line)
    User: {message}             (each turn followed by a blank line)
    Assistant: {message}
    ...
    Assistant:                  (the generation prompt)

and generation stops at the next ``"\\nUser:"`` (added to the request's stop strings), so the model answers
one turn. ``--chat-template FILE`` replaces it with a Jinja template as in Hugging Face's
``tokenizer_config.json``: it sees ``messages`` (role and content), ``add_generation_prompt`` (true),
``bos_token`` (""), ``eos_token`` (``<|endoftext|>``) and ``raise_exception(message)``; it runs in Jinja's
sandbox, and adds no stop strings (the end-of-text token still stops).
"""

from __future__ import annotations

from pathlib import Path

from .options import ServeError

PLAIN_STOPS = ("\nUser:",)
_PLAIN_NAMES = {"user": "User", "assistant": "Assistant"}


class TemplateError(ServeError):
    """The chat template refused the messages (the client's error: HTTP 400)."""


def render_plain(messages: list[dict[str, str]]) -> str:
    parts = []
    for m in messages:
        name = _PLAIN_NAMES.get(m["role"])
        parts.append(m["content"] if name is None else f"{name}: {m['content']}")
    return "\n\n".join([*parts, "Assistant:"])


class ChatTemplate:
    """``render(messages)`` -> prompt text; ``stops``: stop strings the template implies."""

    def __init__(self, path: str | None = None, eos_token: str = "<|endoftext|>") -> None:
        self.path = path
        self.eos_token = eos_token
        self._template = None
        self.stops: tuple[str, ...] = PLAIN_STOPS
        if path is None:
            return
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ServeError(f"--chat-template {path}: cannot read it ({e})") from None
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise ServeError(f"--chat-template {path}: line {e.lineno}: {e.message}") from None
        self.stops = ()

    def render(self, messages: list[dict[str, str]]) -> str:
        if self._template is None:
            return render_plain(messages)
        from jinja2 import TemplateError as JinjaError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token=self.eos_token
            )
        except TemplateError:
            raise
        except (JinjaError, TypeError, ValueError, KeyError, IndexError) as e:
            raise TemplateError(f"the chat template failed on these messages: {e}") from None
