"""Output paths of ``eval`` and ``demo``: checked before any heavy work, written whole or not at all.

``check_output_file`` / ``check_output_dir`` refuse, without writing anything, a path that cannot be
written: a folder where a file is wanted (or the reverse), a path under a file, or a read-only place. So a
mistyped ``--out`` fails in a second with one message instead of after an hour of scoring.
``write_text_atomic`` then writes a report beside its target and renames it into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..atomic_dir import current_umask
from ..errors import BlackMambaError


class OutputPathError(BlackMambaError, ValueError):
    """An output path that cannot be written; the message names the option and the path."""


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _check_name(path: str | os.PathLike, option: str) -> Path:
    given = os.fspath(path)
    if not given or "\0" in given:
        raise OutputPathError(f"{option} must be a path, got {given!r}")
    return Path(given)


def _check_parent(target: Path, option: str) -> None:
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {target}: {ancestor} is a file, so nothing can be written under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {target}: {ancestor} is read-only (no permission to write there)")


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """``path`` may be written as a file: it is not a folder, not under a file, and its folder (or the
    nearest one that exists) and the file itself, if present, are writable. Nothing is created."""
    target = _check_name(path, option)
    if target.is_dir():
        raise OutputPathError(f"{option} {target} is a folder; give a file name")
    if os.path.lexists(target) and not target.exists():
        raise OutputPathError(f"{option} {target} is a symlink to nothing")
    _check_parent(target, option)
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputPathError(f"{option} {target} is read-only")
    return target


def check_output_dir(path: str | os.PathLike, option: str, allowed: frozenset[str] | None = None) -> Path:
    """``path`` may be used as an output folder: it is not a file, not under a file, and writable. With
    ``allowed``, an existing folder may hold only those names (and the hidden temporaries ``.NAME.*`` that
    an atomic writer leaves beside one of them), so a tool never writes into a folder of someone else's files."""
    target = _check_name(path, option)
    if os.path.lexists(target) and not target.is_dir():
        raise OutputPathError(f"{option} {target} is a file, not a folder")
    _check_parent(target, option)
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {target} is read-only (no permission to write there)")
        if allowed is not None:
            foreign = sorted(n for n in os.listdir(target) if n not in allowed and not _temporary_of(n, allowed))
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise OutputPathError(
                    f"{option} {target} already holds files this command did not write ({shown}): "
                    "choose a new or empty folder"
                )
    return target


def _temporary_of(name: str, allowed: frozenset[str]) -> bool:
    return name.startswith(".") and any(name[1:].startswith(f"{a}.") for a in allowed)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and one rename: a reader (or a
    crash) sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
