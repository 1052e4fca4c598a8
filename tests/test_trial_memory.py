"""A search's memory stays flat: nothing keeps a finished trial's TensorFlow graphs alive (keras-tuner#395).

Counted as the function graphs Python still holds after a collection, not as RSS (which the allocator and
the machine make noisy); `benchmarks/search_memory.py` measures the RSS.
"""

from __future__ import annotations

import gc
from pathlib import Path

import keras
import numpy as np
from tensorflow.python.framework.func_graph import FuncGraph

from conftest import quick_overrides
from finetune.config import compose
from finetune.run import prepare_data
from finetune.trial_memory import released_training_graphs
from finetune.tuning import FinetuneHyperModel, TwoPhaseTuner, make_oracle


def function_graphs() -> int:
    """How many TensorFlow function graphs (traced tf.functions: train steps and their parts) are alive."""
    keras.backend.clear_session()  # collects garbage too
    gc.collect()
    return sum(isinstance(obj, FuncGraph) for obj in gc.get_objects())


def fit_small_model() -> None:
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile("adam", "categorical_crossentropy")
    model.fit(np.ones((8, 4), "float32"), np.eye(2)[np.arange(8) % 2], epochs=1, verbose=0)


def test_training_inside_the_release_leaves_no_graphs_and_outside_it_does() -> None:
    before = function_graphs()
    with released_training_graphs():
        fit_small_model()
    assert function_graphs() == before
    fit_small_model()  # TensorFlow's registry of custom gradients pins the train step: why trial_memory exists
    assert function_graphs() > before


def test_a_finished_trial_leaves_no_graphs(tmp_path: Path, tiny_images: Path) -> None:
    cfg = compose(quick_overrides(
        tiny_images, tmp_path / "search", "mode=tune", "tuner.max_trials=1", "tuner.phase1_epochs=1",
        "tuner.phase2_epochs=1", f"data.cache_dir={tmp_path / 'cache'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"mlflow.artifact_location={tmp_path / 'artifacts'}"))
    data = prepare_data(cfg)
    tuner = TwoPhaseTuner(cfg, data, oracle=make_oracle(cfg.tuner, cfg.seed),
                          hypermodel=FinetuneHyperModel(cfg, data.num_classes), directory=str(tmp_path),
                          project_name="tuner")
    before = function_graphs()
    tuner.search()
    assert [trial.status for trial in tuner.oracle.trials.values()] == ["COMPLETED"]
    assert function_graphs() == before
