"""Where words go: results to stdout, everything else (logs, warnings, progress) to stderr."""
from __future__ import annotations

import sys

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def result(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


def say(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def progress_disabled() -> bool:
    return _quiet
