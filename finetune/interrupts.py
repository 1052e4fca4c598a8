"""Ctrl-C and `kill` stop a run cleanly: during training, only between steps, never inside a checkpoint write."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

_deferring = False
_pending = False


def install() -> None:
    """Route SIGINT and SIGTERM through one handler."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


def _handle(signum: int, frame: object) -> None:
    global _pending
    if _deferring and not _pending:  # a second signal stops at once
        _pending = True
        print("\nStopping after the current training step (press Ctrl-C again to stop now)...", file=sys.stderr)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside this block a signal only raises the flag that `stop_requested()` reads."""
    global _deferring, _pending
    _deferring, _pending = True, False
    try:
        yield
    finally:
        _deferring = False


def stop_requested() -> bool:
    """Whether a signal arrived inside a `deferred()` block."""
    return _pending
