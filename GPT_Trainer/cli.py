"""How every entry script reports expected errors: one line on stderr, no traceback.

A script raises `UserError` (or one of the exception types below that only bad input causes) with a
message naming the file or flag, what is wrong and what is allowed; `run` prints it as one line and exits
with status 1. `--debug` on the command line (or TWOMAMBA_DEBUG=1) shows the traceback instead. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys


class UserError(Exception):
    """Bad input (a file, a flag, a config): reported in one line, exit status 1."""


def debug_requested(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("TWOMAMBA_DEBUG") == "1"


def without_debug(argv: list[str] | None) -> list[str]:
    """argv without the --debug flag, so each script's own parser never sees it."""
    args = sys.argv[1:] if argv is None else argv
    return [a for a in args if a != "--debug"]


def run(main, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Call main(argv) and turn a UserError into one line on stderr and exit status 1."""
    debug = debug_requested(argv)
    try:
        result = main(without_debug(argv))
    except UserError as err:
        if debug:
            raise
        name = prog or os.path.basename(sys.argv[0]) or "error"
        print(f"{name}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0
