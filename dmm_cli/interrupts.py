"""Ctrl-C and SIGTERM held back while state must change as one (an optimizer step, a checkpoint, a rename)."""
from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if noted and reraise:
        raise KeyboardInterrupt
