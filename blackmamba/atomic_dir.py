"""Replace a folder in one atomic step, so a reader, a kill or a full disk never sees half of a new version.

The new version is built in a temporary folder beside the target (same file system), every file fsynced, and
then swapped in: on Linux with ``renameat2(RENAME_EXCHANGE)``, which exchanges the two names in one step, so
the target always holds a complete version and the old one ends up under the temporary name, to be deleted.
Where the exchange is unavailable (another OS, a file system without it) the fallback moves the old version
aside, then the new one in; a kill between the two renames leaves the old version under its aside name,
and :func:`recover` (run by the next writer) puts it back.

Temporary names are ``.<target>.tmp-<pid>-<hex>`` (new versions) and ``.<target>.old-<pid>-<hex>`` (old
versions moved aside). A writer removes those of dead processes, and only when every entry in them is a file
its ``owned`` predicate recognises: nothing the tool did not write is ever deleted.

Every file-system call goes through a function of this module (:data:`STEPS`), so a test can inject a
fault at each step. Files and folders are created with modes 0o666 / 0o777, so the umask applies.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

STEPS = (
    "make_dir",
    "open_file",
    "write_chunk",
    "sync_file",
    "sync_dir",
    "exchange",
    "rename",
    "remove_file",
    "remove_dir",
)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")
_active: set[Path] = set()


def make_dir(path: Path) -> None:
    os.mkdir(path, 0o777)


def open_file(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def write_chunk(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def sync_file(fd: int) -> None:
    os.fsync(fd)


def sync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # some platforms cannot open a folder; nothing to sync there
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _renameat2() -> Callable | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``), since
    setting and restoring it races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` (both must exist) atomically. False when this system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def rename(a: Path, b: Path) -> None:
    os.rename(a, b)


def remove_file(path: Path) -> None:
    os.unlink(path)


def remove_dir(path: Path) -> None:
    os.rmdir(path)


def write_file(path: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """Create ``path`` (it must not exist) with ``chunks``, and fsync it."""
    fd = open_file(path)
    try:
        for chunk in chunks:
            write_chunk(fd, chunk)
        sync_file(fd)
    finally:
        os.close(fd)


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing ancestors; the ones created, outermost first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        make_dir(path)
    return list(reversed(missing))


def temp_dir(target: Path) -> Path:
    """Create an empty folder beside ``target`` to build its next version in."""
    while True:
        path = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            make_dir(path)
        except FileExistsError:
            continue
        _active.add(path)
        return path


def release(path: Path) -> None:
    """``path`` is no longer in use by this process (a later writer may remove it if it is left over)."""
    _active.discard(path)


def swap_in(new: Path, target: Path) -> Path | None:
    """Put the folder ``new`` at ``target`` atomically. Returns the folder that now holds the previous version
    (for the caller to remove), or None when ``target`` did not exist. It raises only when nothing changed
    (the caller then fsyncs ``target.parent``; a failure there no longer undoes the swap)."""
    if not os.path.lexists(target):
        rename(new, target)
        return None
    if exchange(new, target):
        return new
    aside = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    _active.add(aside)
    rename(target, aside)
    try:
        rename(new, target)
    except BaseException:
        _active.discard(aside)  # if putting it back fails too, the next writer's recover() does
        rename(aside, target)
        raise
    return aside


def remove_owned(folder: Path, owned: Callable[[str], bool]) -> bool:
    """Delete ``folder`` if every entry in it is a regular file that ``owned`` recognises by name. Returns
    False (and deletes nothing) when it holds anything else."""
    names = os.listdir(folder)
    if not all(owned(n) and stat.S_ISREG(os.lstat(folder / n).st_mode) for n in names):
        return False
    for name in names:
        remove_file(folder / name)
    remove_dir(folder)
    release(folder)
    return True


def is_owned(folder: Path, owned: Callable[[str], bool]) -> bool:
    """Every entry in ``folder`` is a regular file that ``owned`` recognises (True for an empty folder)."""
    try:
        return all(owned(n) and stat.S_ISREG(os.lstat(folder / n).st_mode) for n in os.listdir(folder))
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def leftovers(target: Path) -> list[tuple[str, Path]]:
    """Temporary folders of ``target`` left by writers that died (or by this process, no longer in use):
    (``"tmp"`` or ``"old"``, path), newest first."""
    out = []
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return []
    for entry in entries:
        m = _TEMP.fullmatch(entry)
        path = target.parent / entry
        if not m or m["name"] != target.name or path in _active:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or not _alive(pid):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                out.append((m["kind"], path))
    out.sort(key=lambda kp: os.lstat(kp[1]).st_mtime, reverse=True)
    return out


def recover(target: Path, owned: Callable[[str], bool], complete: Callable[[Path], bool]) -> list[Path]:
    """Tidy up after writers of ``target`` that died: put back a previous version a fallback swap left aside
    (when ``target`` is missing), then delete their temporary folders that hold only ``owned`` files.
    ``complete`` says whether a folder holds a whole version. Returns the folders left alone."""
    found = leftovers(target)
    if not os.path.lexists(target):
        for kind, path in found:
            if kind == "old" and is_owned(path, owned) and complete(path):
                rename(path, target)
                sync_dir(target.parent)
                found.remove((kind, path))
                break
    kept = []
    for _, path in found:
        try:
            removed = remove_owned(path, owned)
        except OSError:
            removed = False
        if not removed:
            kept.append(path)
    return kept
