"""Ctrl-C as one line, not a traceback, for the command-line scripts, from their first lines on.

The scripts catch KeyboardInterrupt around their work, but importing torch and detectron2 takes
seconds before that; a Ctrl-C then would end in a traceback through the import machinery. Only
the standard library is imported here, so a script can install this before its heavy imports.
"""
import os
import sys

__all__ = ["ctrl_c_in_one_line"]


def ctrl_c_in_one_line(program: str) -> None:
    """Make an uncaught KeyboardInterrupt print ``"<program>: interrupted"`` and exit with 130
    (128 + SIGINT, as a shell reports it); other uncaught exceptions keep Python's traceback."""

    def hook(kind, value, traceback) -> None:
        if issubclass(kind, KeyboardInterrupt):
            print(f"{program}: interrupted", file=sys.stderr, flush=True)
            os._exit(130)
        sys.__excepthook__(kind, value, traceback)

    sys.excepthook = hook
