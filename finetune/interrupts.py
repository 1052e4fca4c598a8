"""Ctrl-C and `kill` stop a run cleanly: during training, only between steps, never inside a checkpoint write."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

import keras

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
    """Inside this block a signal only asks StopOnSignal to stop at the next step boundary."""
    global _deferring, _pending
    _deferring, _pending = True, False
    try:
        yield
    finally:
        _deferring = False


class StopOnSignal(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at a step or epoch boundary once a signal arrived (put it last)."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._stop_if_asked()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._stop_if_asked()

    @staticmethod
    def _stop_if_asked() -> None:
        if _pending:
            raise KeyboardInterrupt
