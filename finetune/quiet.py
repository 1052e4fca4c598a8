"""TensorFlow's native start-up lines (oneDNN, CUDA stub, CPU features, absl) kept off the terminal.

TensorFlow 2.21 prints them from C++ while it loads, before TF_CPP_MIN_LOG_LEVEL is read, so they are
held back by pointing the process's stderr at /dev/null for the duration of `import tensorflow` alone.
A user who sets TF_CPP_MIN_LOG_LEVEL below 3 (e.g. 0) sees them as TensorFlow prints them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import finetune


def import_tensorflow() -> None:
    """Import TensorFlow once, without its native start-up lines unless the user asked for its logs."""
    if "tensorflow" in sys.modules:
        return
    with native_output_hidden():
        import tensorflow  # noqa: F401  (a Python error still raises, and is shown once stderr is back)


@contextmanager
def native_output_hidden() -> Iterator[None]:
    """Within the block, what native code prints to the process's stderr (file descriptor 2) goes to /dev/null,
    unless the user asked for TensorFlow's logs; Python's own `sys.stderr` (progress bars, errors) still shows.

    Besides TensorFlow's start-up lines, libjpeg prints "Improper call to JPEG library in state 201" for every
    JPEG it refuses: without this, a scan of a folder with many broken files buries its own report.
    """
    if finetune.TENSORFLOW_LOGS_ASKED:
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding or "utf-8",
                         errors="backslashreplace")
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        sys.stderr = terminal
        yield
    finally:
        sys.stderr = python_stderr
        terminal.close()
        os.dup2(saved, 2)
        os.close(saved)
