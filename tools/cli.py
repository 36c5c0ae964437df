"""How the task programs end: a failure is one or two readable lines on stderr and exit status 1.

``--debug`` on the command line, or ``PACNET_DEBUG=1`` in the environment, shows the traceback
instead. Ctrl-C ends with status 130 and one line.

Example (the last lines of a task program's ``main.py``)::

    if __name__ == '__main__':
        sys.exit(run_cli(main, 'task_jointUpsampling.main'))
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence

__all__ = ["DEBUG_ENV", "ArgumentParser", "debug_requested", "error_lines", "run_cli"]

DEBUG_ENV = "PACNET_DEBUG"
_MAX_LINE = 300


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are two lines (the error, a pointer to --help), not the
    whole usage text; the exit status stays argparse's 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n  (see --help)\n")


def debug_requested(argv: Sequence[str]) -> bool:
    """True when ``--debug`` is among the arguments or ``$PACNET_DEBUG`` is set to a true value."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def error_lines(err: BaseException) -> list[str]:
    """The first two lines of an exception's message, shortened; the type name when it is bare."""
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    if not text or isinstance(err, (AssertionError, IndexError, KeyError, AttributeError, TypeError,
                                    EOFError, ZeroDivisionError, RuntimeError)):
        lines[0] = f"{type(err).__name__}: {lines[0]}" if text else lines[0]
    shown = [line if len(line) <= _MAX_LINE else line[:_MAX_LINE] + " ..." for line in lines[:2]]
    if len(lines) > 2:
        shown[-1] += f" (+{len(lines) - 2} more lines)"
    return shown


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], prog: str,
            argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)`` and turn any exception into two short stderr lines and an exit status.

    Returns:
        0 on success, 1 on an error, 130 on Ctrl-C (argparse's own exits, e.g. status 2 for a bad
        flag, pass through unchanged).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if debug_requested(argv):
        main(argv)
        return 0
    try:
        main(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (this is the program's last line of defence)
        lines = error_lines(err)
        hint = f"(--debug or {DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {lines[0]}", file=sys.stderr)
        print(f"  {lines[1]} {hint}" if len(lines) > 1 else f"  {hint}", file=sys.stderr)
        return 1
    return 0
