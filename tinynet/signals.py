"""Ctrl-C and SIGTERM that arrive during a write are acted on once the write is complete.

A SIGINT (Ctrl-C) or SIGTERM (``kill``, a batch scheduler, a container stop)
raises where the program happens to be.  In the middle of a write that cuts
the write short: the atomic write keeps the old file, and what the new one
recorded (a finished epoch, the best weights) is lost.  Ignoring the signal
instead loses the user's request.  Inside ``with deferred_signals():`` both
are noted and nothing else; when the outermost such block ends, the handlers
that were there before are restored and the first signal noted is handed to
them, so that it is acted on exactly as it would have been, only after the
write.  Nested blocks defer to the outermost, so a caller can make several
writes one step (the best weights, then the checkpoint that records them).

Signal handlers belong to the main thread: elsewhere the block changes
nothing (the signal reaches the main thread, not the writer).  Only entering
a block changes the handlers; importing this module changes nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading

__all__ = ["deferred_signals", "DEFERRED_SIGNALS"]

#: The signals a block defers.  SIGKILL cannot be caught: atomic writes are what make it harmless.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_depth = 0  # how many blocks are open (main thread only)
_previous: dict = {}  # the handlers the outermost block replaced
_pending: list = []  # the signals noted, first first


def _note(signum, frame) -> None:
    if signum not in _pending:
        _pending.append(signum)


def _deliver(signum: int) -> None:
    """Act on ``signum`` as the handler restored for it would have done."""
    handler = signal.getsignal(signum)
    if callable(handler):  # Python's Ctrl-C handler (KeyboardInterrupt), or the program's own
        handler(signum, None)
    elif handler == signal.SIG_DFL:  # the default action (for SIGTERM: the process ends)
        signal.raise_signal(signum)


@contextlib.contextmanager
def deferred_signals():
    """Within the block, SIGINT and SIGTERM are noted; at its end the first one noted is acted on."""
    global _depth
    if threading.current_thread() is not threading.main_thread() or (
            _depth == 0 and any(signal.getsignal(s) is None for s in DEFERRED_SIGNALS)):  # a handler not from Python
        yield
        return
    if _depth == 0:
        _pending.clear()
        _previous.update({signum: signal.signal(signum, _note) for signum in DEFERRED_SIGNALS})
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for signum, handler in _previous.items():
                signal.signal(signum, handler)
            _previous.clear()
            if _pending:
                _deliver(_pending.pop(0))
