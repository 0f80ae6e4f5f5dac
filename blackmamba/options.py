"""Run options stated once: a dataclass field carries its name, type, default and help text, and both the
command line and an options file are derived from it.

    @dataclass
    class TrainArgs:
        lr: float = option(2e-3, "peak learning rate")

:func:`add_options` gives each field one argparse option: ``--lr`` (``_`` becomes ``-``); ``X | None``
parses X; ``Literal[...]`` gives the choices; a bool that defaults to False is a ``--name`` switch and one
that defaults to True a ``--no-name`` switch; a field without a default is a required option; fields that
share a ``group`` are mutually exclusive. The help text gets ``(default X)`` unless the default is None or a
bool, or the text already speaks of its default. :func:`read_options_file` reads the same options from JSON or
TOML, checked against the fields' types, and :class:`OptionsParser` lets a subcommand take them from a file
named on its command line, its flags overriding the file.

Only the standard library is used: the CLI builds its parser before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tomllib
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, Literal

from .errors import BlackMambaError


class OptionsFileError(BlackMambaError, ValueError):
    """An options file that cannot be read, or holds an unknown option or a value of the wrong type."""


def option(default: Any = MISSING, help: str = "", *, flag: str | None = None, group: str | None = None) -> Any:
    """A dataclass field carrying its command-line help (and, rarely needed, its flag and exclusive group)."""
    metadata = {"help": help} | ({"flag": flag} if flag else {}) | ({"group": group} if group else {})
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One field of an options dataclass as the command line sees it."""

    name: str
    flag: str
    kind: type  # int, float, str or bool (the inner type of X | None)
    optional: bool  # None is a valid value
    choices: tuple[Any, ...] | None
    default: Any  # MISSING: required
    help: str
    group: str | None

    @property
    def required(self) -> bool:
        return self.default is MISSING


def _describe(hint: Any) -> tuple[type, bool, tuple[Any, ...] | None]:
    """(inner type, optional, choices) of a field's annotation."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"an option must have one type (optionally | None), got {hint}")
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices
    if hint not in (int, float, str, bool):
        raise TypeError(f"an option's type must be int, float, str, bool or a Literal, got {hint}")
    return hint, optional, None


def option_specs(cls: type) -> list[OptionSpec]:
    """The command-line view of every field of the dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind, optional, choices = _describe(hints[f.name])
        default = f.default if f.default_factory is MISSING else f.default_factory()
        help = f.metadata.get("help", "")  # tests/cli/test_options.py refuses an option without help
        flag = f.metadata.get("flag")
        if flag is None:
            negated = kind is bool and default is True
            flag = ("--no-" if negated else "--") + f.name.replace("_", "-")
        specs.append(OptionSpec(f.name, flag, kind, optional, choices, default, help, f.metadata.get("group")))
    return specs


def _help(spec: OptionSpec) -> str:
    if spec.required or spec.default is None or spec.kind is bool or "default" in spec.help:
        return spec.help
    shown = f"{spec.default:g}" if isinstance(spec.default, float) else spec.default
    return f"{spec.help} (default {shown})"


def add_options(parser: argparse.ArgumentParser, cls: type, only: Iterable[str] | None = None) -> None:
    """One argparse option per field of ``cls`` (or per field named in ``only``, in that order)."""
    specs = {s.name: s for s in option_specs(cls)}
    names = list(specs) if only is None else list(only)
    groups: dict[str, Any] = {}
    for name in names:
        spec = specs[name]
        target: Any = parser
        if spec.group is not None:
            if spec.group not in groups:
                groups[spec.group] = parser.add_mutually_exclusive_group()
            target = groups[spec.group]
        kwargs: dict[str, Any] = {"dest": spec.name, "help": _help(spec)}
        if spec.kind is bool:
            kwargs |= {"action": "store_false" if spec.flag.startswith("--no-") else "store_true"}
        else:
            kwargs |= {"type": spec.kind} if spec.kind is not str else {}
            kwargs |= {"choices": spec.choices} if spec.choices else {}
        if spec.required:
            kwargs["required"] = True
        elif spec.kind is not bool:
            kwargs["default"] = spec.default
        target.add_argument(spec.flag, **kwargs)


def options_from_namespace(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` made from the parsed options (its checks in ``__post_init__`` run)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _check_value(spec: OptionSpec, value: Any, where: str) -> None:
    if value is None:
        if spec.optional:
            return
        raise OptionsFileError(f"{where}: {spec.name} cannot be null")
    if spec.kind is bool:
        ok = isinstance(value, bool)
    elif spec.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif spec.kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = {"bool": "true or false", "float": "a finite number"}.get(spec.kind.__name__, f"a {spec.kind.__name__}")
        raise OptionsFileError(f"{where}: {spec.name} must be {kind}, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise OptionsFileError(
            f"{where}: {spec.name} must be one of {', '.join(map(str, spec.choices))}, got {value!r}"
        )


def read_options_file(path: str | os.PathLike, cls: type) -> dict[str, Any]:
    """The options in a JSON object or a TOML table (``.toml``), by field name (``max_steps``; ``max-steps``
    is read the same), each checked against its field's type. Unknown names are an error that lists them."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read((1 << 20) + 1)
    except OSError as e:
        raise OptionsFileError(f"{where}: cannot read the options file ({e.strerror or e})") from None
    if len(raw) > 1 << 20:
        raise OptionsFileError(f"{where}: an options file must be under 1 MiB")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text) if where.endswith(".toml") else json.loads(text)
    except UnicodeDecodeError:
        raise OptionsFileError(f"{where}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionsFileError(f"{where}: not valid TOML ({e})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError
        raise OptionsFileError(f"{where}: not valid JSON ({e}); give a JSON object, or TOML in a .toml file") from None
    if not isinstance(data, dict):
        raise OptionsFileError(f"{where}: expected an object of options, got {type(data).__name__}")
    specs = {s.name: s for s in option_specs(cls)}
    values: dict[str, Any] = {}
    unknown = []
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in specs:
            unknown.append(key)
        elif name in values:
            raise OptionsFileError(f"{where}: {name} is given twice")
        else:
            _check_value(specs[name], value, where)
            values[name] = value
    if unknown:
        raise OptionsFileError(
            f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(specs)})"
        )
    return values


class OptionsParser(argparse.ArgumentParser):
    """An ArgumentParser one of whose (sub)commands may read its options from a file (:meth:`add_options_file`).

    The file is read before the command line is parsed: its values stand in for the options' defaults (and
    for required options), so flags given on the command line override them. Subcommand parsers made by
    ``add_subparsers`` are of this class too."""

    _options_file: tuple[str, type] | None = None

    def add_options_file(self, cls: type, flag: str = "--args-file") -> None:
        self._options_file = (flag, cls)
        self.add_argument(
            flag,
            metavar="FILE",
            help="read these options from a JSON object or a TOML file (.toml), by name (e.g. max_steps); "
            "options given on the command line override the file",
        )

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._options_file is None:
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        flag, cls = self._options_file
        find = argparse.ArgumentParser(prog=self.prog, add_help=False)
        find.add_argument(flag, dest="path")
        path = find.parse_known_args(args)[0].path
        if path is None:
            return super().parse_known_args(args, namespace)
        values = read_options_file(path, cls)
        changed = [(a, a.default, a.required) for a in self._actions if a.dest in values]
        for action, _, _ in changed:
            action.default, action.required = values[action.dest], False
        try:
            return super().parse_known_args(args, namespace)
        finally:  # the parser is left as it was built
            for action, default, required in changed:
                action.default, action.required = default, required
