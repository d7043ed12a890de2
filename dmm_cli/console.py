"""Where words go: results to stdout, everything else (logs, warnings, progress) to stderr."""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import warnings

from .errors import DMMError

_quiet = False
_debug = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def result(line: str) -> None:
    with _writing_stdout():
        print(line, file=sys.stdout, flush=True)


def result_bytes(data: bytes) -> None:
    """A result that is a file's bytes (a PNG for `-o -`)."""
    with _writing_stdout():
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


@contextlib.contextmanager
def _writing_stdout():
    """A full disk or a failing device behind stdout is the environment, said in one sentence (exit 1). A reader
    that went away (EPIPE, `| head -1`) is left to click, which exits quietly as pipelines expect."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.EPIPE:
            raise
        _drop_stdout()
        raise DMMError(f"cannot write to stdout: {e.strerror or e}") from None


def _drop_stdout() -> None:
    """What could not be written stays in stdout's buffer; point stdout at /dev/null so that Python's flush at
    exit does not fail again with a second message."""
    try:
        target = sys.stdout.fileno()
    except (OSError, ValueError):  # a stream with no descriptor (a notebook's): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, target)
    os.close(devnull)


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
