"""Phase 2 trains only the chosen blocks; BatchNorm moving statistics never move."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import SHARED_WEIGHTS
from finetune.backbones import BACKBONES
from finetune.model import build_classifier, freeze_backbone, model_backbone, unfreeze_top_blocks


REAL_WEIGHTS = {  # random weights in inference-mode BatchNorm give vanishing gradients; real ones do not
    "mobilenet_v2": (0.35, SHARED_WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
    "mobilenet_v3_small": (1.0, SHARED_WEIGHTS / "mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5"),
}


def classifier_cfg(name: str):
    alpha, weights = REAL_WEIGHTS[name]
    return OmegaConf.create(
        {
            "backbone": {"name": name, "alpha": alpha, "minimalistic": False,
                         "input_size": 64, "weights": str(weights), "unfreeze_blocks": 2},
            "head": {"pooling": "avg", "dropout": 0.0, "hidden_units": [], "class_weight": None},
        }
    )


def snapshot(model: keras.Model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [w.numpy().copy() for w in layer.weights] for layer in model_backbone(model).layers if layer.weights}


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_phase2_changes_only_the_top_blocks_and_keeps_batchnorm_statistics(name: str) -> None:
    spec = BACKBONES[name]
    keras.utils.set_random_seed(0)
    cfg = classifier_cfg(name)
    model = build_classifier(cfg, num_classes=3)
    backbone = model_backbone(model)
    chosen = set(unfreeze_top_blocks(backbone, spec, 2))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy")
    before = snapshot(model)
    images = np.random.default_rng(0).uniform(0, 255, (16, 64, 64, 3)).astype("float32")
    labels = keras.utils.to_categorical(np.arange(16) % 3, 3)
    model.fit(images * 3 + 40, labels, batch_size=8, epochs=2, verbose=0)  # shifted inputs: batch stats differ

    after = snapshot(model)
    changed = {n for n in before if any(not np.array_equal(b, a) for b, a in zip(before[n], after[n]))}
    batchnorms = {layer.name for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert changed, "phase 2 trained nothing"
    assert not changed & batchnorms, f"BatchNorm weights or statistics moved: {sorted(changed & batchnorms)}"
    assert {spec.block_of(n) for n in changed} <= chosen
    assert {spec.block_of(n) for n in changed} == chosen  # every chosen block (and the final conv) trained


def test_phase1_freezes_the_whole_backbone() -> None:
    model = build_classifier(classifier_cfg("mobilenet_v2"), num_classes=3)
    freeze_backbone(model_backbone(model))
    trainable = {w.path.split("/")[0] for w in model.trainable_weights}
    assert trainable == {"probabilities"}
