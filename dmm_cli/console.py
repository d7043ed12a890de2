"""Where words go: results to stdout, everything else (logs, warnings, progress) to stderr."""
from __future__ import annotations

import os
import sys
import warnings

_quiet = False
_debug = False


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


def set_debug(debug: bool) -> None:
    """Without --debug, library chatter (deprecations, load reports and bars) stays out of a CLI user's way."""
    global _debug
    _debug = debug
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def quiet_loading() -> None:
    """Called where diffusers and transformers are imported anyway: no per-file loading bars, errors only."""
    if _debug:
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
