"""Ctrl-C and SIGTERM: both raise KeyboardInterrupt, are remembered even where a library swallows them, and
are held back while state must change as one (an optimizer step, a checkpoint, a rename)."""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_arrived = False


def _mark_arrived() -> None:
    global _arrived
    _arrived = True


def _raise(signum, frame):
    _mark_arrived()
    raise KeyboardInterrupt


def catch() -> None:
    """From now on SIGINT and SIGTERM raise KeyboardInterrupt (`kill` gets what Ctrl-C gets: cleanup runs),
    and `arrived` forgets earlier ones."""
    global _arrived
    _arrived = False
    for s in SIGNALS:
        signal.signal(s, _raise)


def ignore() -> None:
    """From now on SIGINT and SIGTERM do nothing: the process's outcome is decided, and a late signal must not
    replace it. Signal handlers can only change in the main thread; elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def arrived() -> bool:
    """Whether an interrupt arrived since `catch`. Torch's C++ code turns a KeyboardInterrupt raised inside it
    into a ValueError with no trace of it (loading safetensors does this), so the error the user then sees is
    only a consequence of the interrupt."""
    return _arrived


@contextlib.contextmanager
def deferred(reraise: bool = True):
    """Inside, SIGINT and SIGTERM are noted instead of raised; on the way out, a noted one is raised as
    KeyboardInterrupt (unless `reraise` is false: a second Ctrl-C while the first is being handled).

    Signal handlers can only change in the main thread; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []

    def note(signum, frame):
        _mark_arrived()
        noted.append(signum)

    previous = {s: signal.signal(s, note) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if noted and reraise:
        raise KeyboardInterrupt
