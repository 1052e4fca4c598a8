"""Every keras.applications family: preprocessing as Keras's own, a block map that covers the model, freezing
by blocks, Keras's weight file names, the published parameter and multiply-add counts, TFLite, and training.

The default tier builds each family once at its smallest input (weights=null); the other sizes of each family,
the published counts at full size, the TFLite conversions and the CLI runs are the slow tier.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from keras.src.utils import file_utils  # every keras.applications module downloads through it
from omegaconf import DictConfig, OmegaConf

from conftest import cli, quick_overrides
from finetune.backbones import BACKBONES
from finetune.config import UsageError, compose, validate_model
from finetune.model import (block_map, build_classifier, freeze_backbone, layer_blocks, model_backbone, preprocess,
                            unfreeze_top_blocks)
from finetune.summary import render

# One model per family in the default tier (MobileNet and EfficientNet V1 are covered by test_backbones.py):
# its first and last block as Keras names them, and how many layers with weights its stem has
FAMILIES = {
    "resnet50": ("conv2_block1", "conv5_block3", 2),  # conv1_conv, conv1_bn
    "resnet50_v2": ("conv2_block1", "conv5_block3", 1),  # conv1_conv (pre-activation: no BatchNorm)
    "vgg16": ("block1", "block5", 0),
    "xception": ("block1", "block14", 0),  # its first convs are block1
    "inception_v3": ("mixed0", "mixed10", 10),  # five convs with their BatchNorm, before the first module
    "inception_resnet_v2": ("mixed_5b", "block8_10", 10),
    "densenet121": ("conv2_block1", "conv5_block16", 2),
    "nasnet_mobile": ("stem_1", "12", 2),  # stem_conv1, stem_bn1; then the stem's two reduction cells
    "efficientnet_v2_b0": ("block1a", "block6h", 2),
    "convnext_tiny": ("stage_0_block_0", "stage_3_block_2", 1),  # the stem Sequential (conv + LayerNorm)
}
NAMING_SCHEMES = ("resnet50", "efficientnet_v2_b0", "convnext_tiny")  # the default tier's file-name checks
EVERY_BACKBONE = [pytest.param(name, marks=[] if name in FAMILIES else [pytest.mark.slow]) for name in BACKBONES]


def backbone_cfg(name: str, size: int | None = None, weights: str | None = None) -> DictConfig:
    """The backbone's shipped config (conf/backbone/<name>.yaml), at `size` (default: its smallest input)."""
    cfg = compose([f"backbone={name}"]).backbone
    return OmegaConf.merge(cfg, {"input_size": size or BACKBONES[name].min_input_size, "weights": weights})


def classifier(name: str, num_classes: int = 3) -> keras.Model:
    head = {"pooling": "avg", "dropout": 0.0, "hidden_units": [], "class_weight": None}
    return build_classifier(OmegaConf.create({"backbone": backbone_cfg(name), "head": head}), num_classes)


def raw_images(size: int, count: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (count, size, size, 3)).astype("float32")


@pytest.mark.parametrize("name", BACKBONES)
def test_preprocessing_is_keras_own_preprocess_input(name: str) -> None:
    """The layer in front of the backbone computes what keras.applications.<module>.preprocess_input computes."""
    spec = BACKBONES[name]
    images = raw_images(8)
    keras_preprocessed = keras.ops.convert_to_numpy(
        getattr(keras.applications, spec.keras_module).preprocess_input(images.copy()))
    if spec.input_normalization is None:  # the model normalizes itself: Keras's preprocess_input passes through
        np.testing.assert_array_equal(keras_preprocessed, images)
        return
    ours = keras.ops.convert_to_numpy(preprocess(spec.input_normalization, keras.ops.convert_to_tensor(images)))
    np.testing.assert_allclose(ours, keras_preprocessed, rtol=1e-5, atol=1e-4)


def entering(tensor: object, block: str, placed: dict[str, str | None]) -> set[int]:
    """The tensor, if it comes into `block` from outside; a Keras op between layers (MobileNetV3's hard-sigmoid
    arithmetic, ConvNeXt's residual add) counts as inside when every input it is made from is."""
    operation = tensor._keras_history.operation
    if isinstance(operation, keras.layers.Layer) or not operation._inbound_nodes:
        inside = isinstance(operation, keras.layers.Layer) and placed.get(operation.name) == block
        return set() if inside else {id(tensor)}
    given = keras.tree.flatten(operation._inbound_nodes[0].input_tensors)
    return {id(tensor)} if any(entering(source, block, placed) for source in given) else set()


def entering_tensors(backbone: keras.Model, placed: dict[str, str | None]) -> dict[str, int]:
    """How many distinct tensors from outside each block feed its layers."""
    outside: dict[str, set[int]] = {}
    for layer in backbone.layers:
        block = placed[layer.name]
        if block is None or block == "final":
            continue
        for given in keras.tree.flatten(layer._inbound_nodes[0].input_tensors):
            outside.setdefault(block, set()).update(entering(given, block, placed))
    return {block: len(tensors) for block, tensors in outside.items() if tensors}


@pytest.mark.parametrize("name", EVERY_BACKBONE)
def test_block_map_covers_the_model_and_phase2_trains_only_the_top_blocks(name: str) -> None:
    spec = BACKBONES[name]
    model = classifier(name)
    backbone = model_backbone(model)
    placed = layer_blocks(backbone, spec)
    blocks = [block for block in block_map(backbone, spec) if block != "final"]
    assert len(blocks) == spec.num_blocks
    if name in FAMILIES:
        stem_weighted = [layer for layer in backbone.layers if placed[layer.name] is None and layer.weights]
        assert (blocks[0], blocks[-1], len(stem_weighted)) == FAMILIES[name]

    # outside every block: only the stem, before the first block; the final layers come after the last block
    order = [placed[layer.name] for layer in backbone.layers]
    first_block = next(index for index, block in enumerate(order) if block not in (None, "final"))
    assert all(block is not None for block in order[first_block:]), "a layer after the stem is outside every block"
    if "final" in order:
        assert order.index("final") > max(i for i, block in enumerate(order) if block not in (None, "final"))

    # one tensor enters each block, except where the spec says blocks take two (NASNet's cells)
    entering = entering_tensors(backbone, placed)
    assert set(entering) == set(blocks)
    assert max(entering.values()) == (2 if spec.two_input_blocks else 1), entering

    freeze_backbone(backbone)
    assert {weight.path.split("/")[0] for weight in model.trainable_weights} == {"probabilities"}
    chosen = set(unfreeze_top_blocks(backbone, spec, 2))
    assert chosen == set(blocks[-2:]) | ({"final"} if spec.final_pattern else set())
    trained = {layer.name for layer in backbone.layers if layer.trainable_weights}
    batchnorms = {layer.name for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}
    weighted_in_chosen = {layer.name for layer in backbone.layers if placed[layer.name] in chosen and layer.weights}
    assert trained == weighted_in_chosen - batchnorms
    assert {placed[layer] for layer in trained} >= chosen - {"final"}  # every chosen block trains something


def test_keras_shortcuts_and_branches_join_their_block() -> None:
    """Layers Keras names itself (Xception's shortcut adds, InceptionV3's mixed9_1) sit in the block they serve,
    whatever numbers Keras gave their names (the second Xception's are add_12 ..)."""
    for _ in range(2):
        backbone = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3))
        placed = layer_blocks(backbone, BACKBONES["xception"])
        adds = [placed[layer.name] for layer in backbone.layers if isinstance(layer, keras.layers.Add)]
        assert adds == [f"block{n}" for n in range(2, 14)]
    inception = layer_blocks(keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(75, 75, 3)),
                             BACKBONES["inception_v3"])
    assert (inception["mixed9_0"], inception["mixed9_1"]) == ("mixed9", "mixed10")


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in NAMING_SCHEMES else [pytest.mark.slow])
                                  for name in BACKBONES])
def test_keras_asks_for_the_file_the_registry_names(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras's weights="imagenet" build requests exactly spec.weights_file (what weights_dir must hold); no network."""
    spec = BACKBONES[name]
    size = spec.imagenet_sizes[0] if spec.imagenet_sizes else spec.min_input_size
    cfg = backbone_cfg(name, size, "imagenet")
    requested = []

    def get_file(fname: str, *args: object, **kwargs: object) -> str:
        requested.append(fname)
        raise LookupError("offline")

    monkeypatch.setattr(file_utils, "get_file", get_file)
    with pytest.raises(LookupError):
        getattr(keras.applications, spec.constructor)(
            include_top=False, weights="imagenet", input_shape=(size, size, 3),
            **{key: cfg[key] for key in spec.extra_kwargs})
    assert requested == [spec.weights_file(cfg)]


@pytest.mark.parametrize(("name", "size", "allowed"), [("inception_v3", 74, "75 or more"), ("xception", 70, "71 or more"),
                                                ("nasnet_large", 224, "allowed: 331 (or backbone.weights=null)")])
def test_a_size_the_family_cannot_take_is_one_line(name: str, size: int, allowed: str) -> None:
    with pytest.raises(UsageError) as refused:
        validate_model(compose([f"backbone={name}", f"backbone.input_size={size}"]))
    assert str(refused.value).startswith(f"backbone.input_size={size} ")
    assert name in str(refused.value) and allowed in str(refused.value) and "\n" not in str(refused.value)


def test_summary_shows_preprocessing_sizes_and_a_block_map_that_adds_up() -> None:
    text = render(compose(["backbone=resnet50", "backbone.input_size=32", "backbone.unfreeze_blocks=2"]), 5)
    assert "Preprocessing (inside the model, which takes raw 0..255 RGB): caffe: BGR, ImageNet mean subtracted" in text
    assert "Input sizes: any size >= 32, with ImageNet weights" in text
    backbone_params = int(re.search(r"\(backbone ([\d,]+),", text).group(1).replace(",", ""))
    rows = text.split("phase 2\n")[1].splitlines()
    assert [row.split()[0] for row in rows][:2] == ["(stem)", "conv2_block1"]
    assert sum(int(row.split()[2].replace(",", "")) for row in rows) == backbone_params
    assert [row.split()[0] for row in rows if row.endswith("trainable")] == ["conv5_block2", "conv5_block3"]


# Keras's published table (keras.io/api/applications: parameters with the 1000-class top, default input size)
# and the multiply-adds the papers publish for the same models
PUBLISHED = {
    "resnet50": (224, 25.6, 3.8),  # He et al. 2015, table 1: 3.8 x 10^9 FLOPs (multiply-adds)
    "resnet50_v2": (224, 25.6, None),
    "inception_v3": (299, 23.9, None),
    "xception": (299, 22.9, None),
    "densenet121": (224, 8.1, None),
    "nasnet_mobile": (224, 5.3, 0.564),  # Zoph et al. 2018, table 2: 564M mult-adds
    "efficientnet_b0": (224, 5.3, 0.39),  # Tan & Le 2019, table 2: 0.39B FLOPs
    "efficientnet_v2_b0": (224, 7.2, None),
    "convnext_tiny": (224, 28.6, 4.5),  # Liu et al. 2022, table 1: 4.5G FLOPs
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_summary_counts_match_the_published_tables(name: str) -> None:
    size, params_m, gmacs = PUBLISHED[name]
    cfg = compose([f"backbone={name}", f"backbone.input_size={size}", "head.hidden_units=[]"])
    text = render(cfg, 1000)  # our head at 1000 classes is Keras's top: pooling and one Dense layer
    total = int(text.splitlines()[1].split()[1].replace(",", ""))
    assert round(total / 1e6, 1) == params_m
    if gmacs is not None:
        macs = float(text.splitlines()[2].split()[1]) / 1e3
        assert macs == pytest.approx(gmacs, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_converts_to_tflite_that_takes_raw_pixels(name: str, tmp_path: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    from finetune.bundle import convert_tflite, write_saved_model

    keras.utils.set_random_seed(0)
    model = classifier(name)
    # the pooled features the head reads: with random weights some families' probabilities are all but uniform
    # (Xception's differ by ~2e-6 between images), so they are compared where the images still differ
    features = keras.Model(model.input, model.get_layer("probabilities").input, name="features")
    images = raw_images(BACKBONES[name].min_input_size)
    expected = keras.ops.convert_to_numpy(features(images, training=False))
    scale = np.abs(expected).max()
    assert np.abs(expected[0] - expected[1]).max() > 0.01 * scale, "the features do not depend on the image"
    write_saved_model(features, tmp_path / "saved_model", top_k=None)
    interpreter = Interpreter(model_content=convert_tflite(tmp_path / "saved_model", "tflite_float32", images))
    interpreter.allocate_tensors()
    given, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    for image, pooled in zip(images, expected):
        interpreter.set_tensor(given["index"], image[None])
        interpreter.invoke()
        np.testing.assert_allclose(interpreter.get_tensor(output["index"])[0], pooled, atol=1e-3 * scale)


TRAINED_THROUGH_CLI = {  # phase 2 with backbone.unfreeze_blocks=2: the top two blocks (and the final layers)
    "resnet50": ["conv5_block2", "conv5_block3"],
    "inception_v3": ["mixed10", "mixed9"],
    "convnext_tiny": ["final", "stage_3_block_1", "stage_3_block_2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED_THROUGH_CLI)
def test_family_trains_through_the_cli(name: str, tmp_path: Path, tiny_images: Path) -> None:
    size = BACKBONES[name].min_input_size
    run_dir = tmp_path / "run"
    replaced = {"backbone": f"backbone={name}", "backbone.input_size": f"backbone.input_size={size}"}
    overrides = [replaced.get(item.split("=")[0], item) for item in quick_overrides(
        tiny_images, run_dir, "train.phase1.epochs=1", "train.phase2.epochs=1", "backbone.unfreeze_blocks=2")]
    result = cli(*overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test_accuracy" in json.loads((run_dir / "metrics.json").read_text())
    assert json.loads((run_dir / "state.json").read_text())["unfrozen_blocks"] == TRAINED_THROUGH_CLI[name]
    loaded = keras.saving.load_model(run_dir / "model.keras", safe_mode=True)
    assert loaded.input_shape[1:] == (size, size, 3)
