"""What training leaves in memory after its model is gone, released so that a search's memory stays flat.

Keras 3's TensorFlow optimizer sums the gradients with `ReplicaContext.all_reduce`, which inside a traced
train step is a `tf.custom_gradient`. In graph mode TensorFlow registers that op's gradient function in its
process-wide gradient registry (as `CustomGradient-<n>`) and never removes it, and the function's closure
holds tensors of the train step's graph. So every fitted model leaves its train-step graphs (with the graphs
of the optimizer's conditionals) alive after `keras.backend.clear_session()`: the growth of keras-tuner#395
(TensorFlow issues 27492 and 97697), ~90 MB a trial for MobileNetV2 at 96 px.

Such a gradient function only serves to differentiate the graph it was traced in; once training has ended
nothing differentiates the train step again, so the entries registered while training are dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tensorflow.python.framework import ops

CUSTOM_GRADIENT_PREFIX = "CustomGradient-"  # tensorflow.python.ops.custom_gradient.generate_name


def custom_gradient_names() -> set[str]:
    """Names of the gradient functions TensorFlow registered for the tf.custom_gradient ops it traced."""
    return {name for name in ops.gradient_registry.list() if name.startswith(CUSTOM_GRADIENT_PREFIX)}


@contextlib.contextmanager
def released_training_graphs() -> Iterator[None]:
    """Run the training inside; afterwards drop the custom gradients it registered, so its graphs can be collected."""
    before = custom_gradient_names()
    try:
        yield
    finally:
        for name in custom_gradient_names() - before:
            del ops.gradient_registry._registry[name]  # the registry has no public removal
