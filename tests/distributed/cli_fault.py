"""``python -m tests.distributed.cli_fault STEP ARGS...``: the ``blackmamba`` command line with ARGS, except that
rank 1 raises when it reaches optimizer step STEP (started by torchrun in the distributed trainer tests)."""

from __future__ import annotations

import os
import sys

from blackmamba import cli
from blackmamba.training import trainer


def main() -> int:
    fail_at = int(sys.argv[1])
    schedule = trainer.lr_at

    def lr_at(step: int, *args: float) -> float:
        if os.environ.get("RANK") == "1" and step == fail_at:
            raise ValueError(f"injected failure at step {step}")
        return schedule(step, *args)

    trainer.lr_at = lr_at
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
