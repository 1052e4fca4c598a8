"""A weights file through the offline routes builds the model Keras builds for weights="imagenet".

Keras builds some families differently for weights="imagenet" than for a weights file (EfficientNet adds
a rescaling layer); ImageNet weights from `weights_dir` or `backbone.weights=` must get Keras's imagenet model.
There are no real EfficientNet weights here, so each test writes a Keras-style file and obtains Keras's own
imagenet build of it by making Keras's download return that file.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving import legacy_h5_format  # Keras's published weight files use this layout
from keras.src.utils import file_utils  # every keras.applications module downloads through it
from omegaconf import DictConfig, OmegaConf

from conftest import PROJECT
from finetune.backbones import BACKBONES, BackboneSpec
from finetune.model import build_backbone

SIZE = 32
DEFAULT_TIER = {"mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                "efficientnet_b7"}
OTHER_FAMILIES = {"resnet50", "resnet50_v2", "vgg16", "densenet121", "nasnet_mobile", "efficientnet_v2_b0", "convnext_tiny"}
TESTED = [name for name in BACKBONES if name.startswith(("mobilenet", "efficientnet_b")) or name in OTHER_FAMILIES]
FAMILIES = [pytest.param(name, marks=[] if name in DEFAULT_TIER else [pytest.mark.slow]) for name in TESTED]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Four random 0..255 RGB images."""
    return np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")


def backbone_cfg(name: str, weights: str) -> DictConfig:
    """The family's shipped config at a small input size."""
    cfg = OmegaConf.load(PROJECT / "conf" / "backbone" / f"{name}.yaml")
    return OmegaConf.merge(cfg, {"input_size": SIZE, "weights": weights})


def keras_build(spec: BackboneSpec, cfg: DictConfig, weights: str | None) -> keras.Model:
    """Keras's own constructor, without finetune in between."""
    kwargs = {key: cfg[key] for key in spec.extra_kwargs}
    constructor = getattr(keras.applications, spec.constructor)
    return constructor(include_top=False, weights=weights, input_shape=(SIZE, SIZE, 3), **kwargs)


def write_weights_file(spec: BackboneSpec, cfg: DictConfig, images: np.ndarray, folder: Path) -> Path:
    """Seeded weights (EfficientNet's input statistics fitted to `images`) in Keras's layout, under its file name."""
    keras.utils.set_random_seed(0)
    model = keras_build(spec, cfg, None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization) and layer.input_mean is None:  # ConvNeXt's is fixed
            layer.adapt(images / 255.0)  # it follows Keras's Rescaling(1/255), as in Keras's ImageNet files
    path = folder / spec.weights_file(cfg)
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


def keras_imagenet_build(spec: BackboneSpec, cfg: DictConfig, weights_file: Path,
                         monkeypatch: pytest.MonkeyPatch) -> keras.Model:
    """Keras's weights="imagenet" model, with Keras's download answered by `weights_file`."""
    requested = []

    def get_file(fname: str, *args: object, **kwargs: object) -> str:
        requested.append(fname)
        return str(weights_file)

    with monkeypatch.context() as patch:
        patch.setattr(file_utils, "get_file", get_file)
        model = keras_build(spec, cfg, "imagenet")
    assert requested == [weights_file.name]  # the registry names the file Keras asks for
    return model


def outputs(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(images, training=False))


def assert_same_outputs(actual: np.ndarray, expected: np.ndarray, route: str) -> None:
    """Equal to float32 rounding, judged against how much the outputs differ between images."""
    spread = np.abs(expected - expected[::-1]).max()
    assert spread > 0, "the outputs do not depend on the image; the comparison would prove nothing"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * spread, err_msg=route)


@pytest.mark.parametrize("name", FAMILIES)
def test_offline_routes_build_keras_imagenet_model(name: str, images: np.ndarray, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BACKBONES[name]
    cfg = backbone_cfg(name, "imagenet")
    weights_file = write_weights_file(spec, cfg, images, tmp_path)
    expected = outputs(keras_imagenet_build(spec, cfg, weights_file, monkeypatch), images)
    from_folder = build_backbone(cfg, weights_dir=str(tmp_path))
    assert_same_outputs(outputs(from_folder, images), expected, "weights_dir")
    from_path = build_backbone(backbone_cfg(name, str(weights_file)), weights_dir=None)
    assert_same_outputs(outputs(from_path, images), expected, "backbone.weights")


def test_users_own_efficientnet_weights_get_the_imagenet_model(images: np.ndarray, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights a user saved from Keras's imagenet EfficientNet (Keras 3's .weights.h5) load into that model."""
    spec = BACKBONES["efficientnet_b0"]
    cfg = backbone_cfg(spec.name, "imagenet")
    users_model = keras_imagenet_build(spec, cfg, write_weights_file(spec, cfg, images, tmp_path), monkeypatch)
    users_file = tmp_path / "my_efficientnet.weights.h5"
    users_model.save_weights(users_file)
    backbone = build_backbone(backbone_cfg(spec.name, str(users_file)), weights_dir=None)
    assert_same_outputs(outputs(backbone, images), outputs(users_model, images), "backbone.weights")
