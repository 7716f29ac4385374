"""Stopping a driver on purpose: SIGINT (Ctrl-C) and SIGTERM (what schedulers send) become one exception.

Python's default turns SIGINT into a KeyboardInterrupt only when SIGINT was not ignored at start (a
background job of a non-interactive shell inherits it ignored, so `kill -INT` did nothing), and it
leaves SIGTERM to kill the process outright, skipping every cleanup. Inside `stop_on_signals()` both
raise `Interrupted` in the main thread instead, so the driver shuts Ray down, keeps what is on disk
and exits with the shell's code for the signal: 130 for SIGINT, 143 for SIGTERM (128 + signal number,
which is also how a scheduler tells "terminated by its signal" from a failure). Signals that arrive
while it is cleaning up are ignored, so a second Ctrl-C cannot cut the cleanup short.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop signal reached the driver.

    A KeyboardInterrupt, so that no `except Exception` swallows it and so that Ray's blocking calls, which
    check for signals while they wait, give up promptly (they re-raise it as a plain KeyboardInterrupt:
    `signal_number` recovers which signal it was).
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []


def _ignore_more(signum: int, frame) -> None:
    """After the first signal: cleanup runs to its end."""


def _raise(signum: int, frame) -> None:
    for s in SIGNALS:
        signal.signal(s, _ignore_more)
    _received.append(signum)
    raise Interrupted(signum)


def signal_number(exc: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt raised inside `stop_on_signals` (SIGINT if none was seen)."""
    return getattr(exc, "signum", None) or (_received[-1] if _received else signal.SIGINT)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the block; the previous handlers come back after it.

    Only the main thread can own signal handlers; called from another thread this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    old = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
