"""Ctrl-C and `kill` stop a run at the next safe point (between training steps, between trials, between
stages), never inside a checkpoint write or a library callback. A second signal stops at once."""

from __future__ import annotations

import signal
import sys

_pending = False


def install() -> None:
    """Route SIGINT and SIGTERM through one handler."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


def _handle(signum: int, frame: object) -> None:
    global _pending
    if _pending:
        raise KeyboardInterrupt
    _pending = True
    print("\nStopping at the next safe point (Ctrl-C again to stop now)...", file=sys.stderr, flush=True)


def check() -> None:
    """A safe point: raise KeyboardInterrupt when a stop was asked for."""
    if _pending:
        raise KeyboardInterrupt
