"""The project's error types.

Every error that means "the input is wrong" (a file, a field, an option) derives from ``BlackMambaError``,
so the CLI can print it as one ``error: ...`` line and exit 1, while a genuine bug still shows its
traceback. Each subclass keeps the builtin base it had before (ValueError or RuntimeError), so code that
caught those still does.
"""

from __future__ import annotations


class BlackMambaError(Exception):
    """Bad input or an unusable file, reported to the user as one line."""
