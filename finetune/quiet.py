"""TensorFlow's native start-up lines (oneDNN, CUDA stub, CPU features, absl) kept off the terminal.

TensorFlow 2.21 prints them from C++ while it loads, before TF_CPP_MIN_LOG_LEVEL is read, so they are
held back by pointing the process's stderr at /dev/null for the duration of `import tensorflow` alone.
A user who sets TF_CPP_MIN_LOG_LEVEL below 3 (e.g. 0) sees them as TensorFlow prints them.
"""

from __future__ import annotations

import os
import sys

import finetune


def import_tensorflow() -> None:
    """Import TensorFlow once, without its native start-up lines unless the user asked for its logs."""
    if "tensorflow" in sys.modules or finetune.TENSORFLOW_LOGS_ASKED:
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401  (a Python error still raises, and is shown once stderr is back)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
