"""CLI exit codes (documented in docs/cli.md and ../shared/RELIABILITY.md)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """What the ``graphopt`` process returns."""

    OK = 0
    INTERNAL = 1  #: a bug: traceback with --debug, plus a reproducer path
    USAGE = 2  #: bad flag, bad pipeline text, missing path
    INVALID_INPUT = 3  #: invalid or unsupported model or calibration data
    SECURITY = 4  #: external data outside the model folder, links
    VERIFICATION = 5  #: result not equivalent within tolerance; nothing published
    RESOURCE = 6  #: memory, disk or time limit
    OUTPUT_CONFLICT = 7  #: destination exists without --overwrite, or is the input
    INTERRUPTED = 130  #: Ctrl-C; nothing published
