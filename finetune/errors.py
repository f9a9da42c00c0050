"""The one base class of user errors: reported as one `error:` line and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import reprlib
import sys
from typing import Any, Callable


class FinetuneError(ValueError):
    """Something the user can fix (config, data, model, checkpoint, environment), stated in one line."""

    def __str__(self) -> str:
        # One line whatever a quoted path or value holds (a file name may contain a newline).
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")


SHOWN_CHARS = 80  # a value quoted in an error line: enough to recognise it, never the line's bulk
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def shown(value: Any) -> str:
    """A user-supplied value as an error line quotes it: its repr (newlines escaped), at most about SHOWN_CHARS characters.

    reprlib does bounded work on huge or deeply nested values (an expanded YAML alias bomb, a megabyte row).
    """
    if isinstance(value, str):
        value = str(value)  # a str subclass (config.Plain) would be repr'd in full before being cut
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_CHARS + 10 else text[:SHOWN_CHARS] + "..."


def listed(names) -> str:
    """Names joined with commas for an error line, cut after about SHOWN_CHARS characters (with how many there are)."""
    names = [str(n) for n in names]
    text = ", ".join(names)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(names)} in all)"


# How a surviving rank's one line starts when another rank died (finetune.distributed.rank_lost); the
# launcher (finetune.launch_output) recognises it and names the dead rank instead, which only it knows.
RANK_LOST = "lost the connection to another rank"


class CheckpointError(FinetuneError):
    """A checkpoint cannot be used: missing, incomplete, unsafe, or from an incompatible run."""


def run_command(argv: list[str], parse_cli: Callable[[list[str]], argparse.Namespace], command: Callable[[argparse.Namespace], int]) -> int:
    """A command-line tool's exit code: argparse's own for a usage error (2, printed) or --help (0); 2 with one
    `error:` line for a FinetuneError; else what `command(args)` returns."""
    try:
        args = parse_cli(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    try:
        return command(args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
