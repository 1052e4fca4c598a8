"""The classifier: a keras.applications backbone under a small head, and freezing by blocks."""

from __future__ import annotations

import math
from typing import Any

import keras

from finetune.backbones import BACKBONES, BackboneSpec
from finetune.config import UsageError
from finetune.weights import missing_weights_message, resolve

BACKBONE_LAYER = "backbone"
POOL_LAYER = "pool"  # the global pooling on the backbone's output: the head starts after it
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)  # keras.applications.efficientnet's own (non-public) constant


def build_backbone(backbone_cfg: Any, weights_dir: str | None) -> keras.Model:
    """The headless keras.applications model, with the configured weights."""
    spec = BACKBONES[backbone_cfg.name]
    weights = resolve(spec, backbone_cfg, weights_dir)
    try:
        backbone = _keras_backbone(spec, backbone_cfg, weights)
    except Exception as error:  # Keras raises plain Exception/ValueError/OSError for a failed download or bad file
        if weights == "imagenet":
            raise UsageError(missing_weights_message(spec, backbone_cfg, weights_dir, error)) from error
        if weights is not None:
            reason = " ".join(str(error).split())[:200]
            raise UsageError(f"backbone.weights={weights} does not fit {spec.name} ({reason})") from error
        raise
    backbone.name = BACKBONE_LAYER
    return backbone


def _keras_backbone(spec: BackboneSpec, backbone_cfg: Any, weights: str | None) -> keras.Model:
    """Keras's model for `weights` (None, "imagenet" or a file); a file is loaded into the imagenet model.

    Keras builds EfficientNet differently for weights="imagenet" than for a file path, and ImageNet-derived
    weights (Keras's own file from `weights_dir`, or a user's) only give the right outputs in the former.
    """
    size = backbone_cfg.input_size
    kwargs = {key: backbone_cfg[key] for key in spec.extra_kwargs}
    constructor = getattr(keras.applications, spec.constructor)
    from_file = weights not in (None, "imagenet")
    backbone = constructor(
        include_top=False, weights=None if from_file else weights, input_shape=(size, size, 3), **kwargs
    )
    if from_file:
        backbone = _as_imagenet_build(spec, backbone)
        backbone.load_weights(weights)
    return backbone


def _as_imagenet_build(spec: BackboneSpec, backbone: keras.Model) -> keras.Model:
    """Keras's weights=None model turned into the model Keras builds for weights="imagenet" (no weights yet)."""
    if not spec.imagenet_stddev_rescaling:
        return backbone
    scale = [1.0 / math.sqrt(stddev) for stddev in IMAGENET_STDDEV_RGB]

    def call_and_rescale_normalized(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
        outputs = layer(*args, **kwargs)
        if isinstance(layer, keras.layers.Normalization):
            return keras.layers.Rescaling(scale)(outputs)
        return outputs

    return keras.models.clone_model(backbone, call_function=call_and_rescale_normalized)


def build_classifier(cfg: Any, num_classes: int) -> keras.Model:
    """Raw 0..255 RGB images in, class probabilities out; the backbone always runs in inference mode."""
    spec = BACKBONES[cfg.backbone.name]
    size = cfg.backbone.input_size
    backbone = build_backbone(cfg.backbone, cfg.get("weights_dir"))
    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = inputs
    if not spec.scales_inputs:
        x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale_to_pm1")(x)
    x = backbone(x, training=False)  # BatchNorm keeps its moving statistics in both phases
    pooling = keras.layers.GlobalAveragePooling2D if cfg.head.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pooling(name=POOL_LAYER)(x)
    x = keras.layers.Dropout(cfg.head.dropout, name="dropout")(x)
    for index, units in enumerate(cfg.head.hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"hidden_{index}")(x)
        x = keras.layers.Dropout(cfg.head.dropout, name=f"hidden_{index}_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def block_map(backbone: keras.Model, spec: BackboneSpec) -> dict[str, list[keras.layers.Layer]]:
    """Backbone layers grouped into blocks, bottom to top ("final" last); stem layers are left out."""
    blocks: dict[str, list[keras.layers.Layer]] = {}
    for layer in backbone.layers:
        block = spec.block_of(layer.name)
        if block is not None:
            blocks.setdefault(block, []).append(layer)
    if "final" in blocks:
        blocks["final"] = blocks.pop("final")
    return blocks


def top_blocks(backbone: keras.Model, spec: BackboneSpec, count: int) -> list[str]:
    """Names of the top `count` blocks plus the final conv (when there is one); empty when count is 0."""
    if count == 0:
        return []
    names = [name for name in block_map(backbone, spec) if name != "final"]
    chosen = names[-count:]
    if spec.final_pattern:
        chosen.append("final")
    return chosen


def freeze_backbone(backbone: keras.Model) -> None:
    """Phase 1: nothing in the backbone trains."""
    backbone.trainable = False


def unfreeze_top_blocks(backbone: keras.Model, spec: BackboneSpec, count: int) -> list[str]:
    """Phase 2: only the top `count` blocks (and the final conv) train; BatchNorm layers stay frozen."""
    chosen = set(top_blocks(backbone, spec, count))
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = (
            spec.block_of(layer.name) in chosen and not isinstance(layer, keras.layers.BatchNormalization)
        )
    return sorted(chosen)


def model_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a classifier built here."""
    return model.get_layer(BACKBONE_LAYER)
