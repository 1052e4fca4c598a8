"""The classifier: a keras.applications backbone under a small head, and freezing by blocks."""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from finetune.backbones import BACKBONES, BackboneSpec, InputNormalization
from finetune.config import UsageError
from finetune.weights import missing_weights_message, resolve

BACKBONE_LAYER = "backbone"
POOL_LAYER = "pool"  # the global pooling on the backbone's output: the head starts after it
PREPROCESS_LAYER = "preprocess"  # raw 0..255 RGB in, what the backbone's weights expect out
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
    x = inputs if spec.scales_inputs else preprocess(spec.input_normalization, inputs)
    x = backbone(x, training=False)  # BatchNorm keeps its moving statistics in both phases
    pooling = keras.layers.GlobalAveragePooling2D if cfg.head.pooling == "avg" else keras.layers.GlobalMaxPooling2D
    x = pooling(name=POOL_LAYER)(x)
    x = keras.layers.Dropout(cfg.head.dropout, name="dropout")(x)
    for index, units in enumerate(cfg.head.hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"hidden_{index}")(x)
        x = keras.layers.Dropout(cfg.head.dropout, name=f"hidden_{index}_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def preprocess(normalization: InputNormalization, images: Any) -> Any:
    """The backbone's input normalization as one frozen plain Keras layer (it converts to TFLite as it is).

    Per channel (pixel - mean) / stddev is a Rescaling; Caffe's BGR order also swaps channels, which a fixed
    1x1 convolution does together with the mean subtraction.
    """
    scale = [1.0 / stddev for stddev in normalization.stddev_rgb]
    offset = [-mean / stddev for mean, stddev in zip(normalization.mean_rgb, normalization.stddev_rgb)]
    if not normalization.bgr:
        return keras.layers.Rescaling(scale, offset, name=PREPROCESS_LAYER)(images)
    kernel = np.zeros((1, 1, 3, 3), "float32")
    for rgb in range(3):
        kernel[0, 0, rgb, 2 - rgb] = scale[rgb]
    to_bgr = keras.layers.Conv2D(3, 1, name=PREPROCESS_LAYER, trainable=False)
    to_bgr.build((None, None, None, 3))
    to_bgr.set_weights([kernel, np.array(offset[::-1], "float32")])
    return to_bgr(images)


def layer_blocks(backbone: keras.Model, spec: BackboneSpec) -> dict[str, str | None]:
    """Each backbone layer's block, in Keras's layer order; None for the input and the stem.

    A layer is placed by its name (`spec.block_of`). One whose name gives no block (Keras names some layers
    itself: conv2d_7, add_3) is stem while it is on the chain from the input to the first fork or block;
    otherwise it joins, by `spec.loose_layers`, the block of the first named layer it feeds ("feeds"; when
    that is the final conv, or it feeds none, the latest block it is fed from) or the block of the layer
    before it ("follows").
    """
    layers = backbone.layers
    named = {layer.name: spec.block_of(layer.name) for layer in layers}
    producers = _producers(backbone)
    consumers: dict[str, list[str]] = {layer.name: [] for layer in layers}
    for name, inputs in producers.items():
        for producer in inputs:
            consumers[producer].append(name)
    stem = _stem_chain(layers[0].name, named, consumers)
    order = {block: index for index, block in enumerate(dict.fromkeys(b for b in named.values() if b))}
    blocks: dict[str, str | None] = {}
    previous = None
    for layer in layers:
        block = named[layer.name]
        if block is None and layer.name not in stem:
            if spec.loose_layers == "follows":
                block = previous
            else:
                block = _fed_block(layer.name, named, consumers) or max(
                    (blocks[p] for p in producers[layer.name] if blocks[p]), key=order.get, default=None)
        blocks[layer.name] = previous = block
    return blocks


def _producers(backbone: keras.Model) -> dict[str, list[str]]:
    """The layers whose outputs each backbone layer takes (layers only: Keras ops such as `x + y` are skipped)."""
    names = {id(layer): layer.name for layer in backbone.layers}
    producers: dict[str, list[str]] = {}
    for layer in backbone.layers:
        found: list[str] = []
        pending = [parent for node in layer._inbound_nodes for parent in node.parent_nodes]
        while pending:
            node = pending.pop()
            if id(node.operation) in names:
                found.append(names[id(node.operation)])
            else:  # a Keras op between layers: look through it
                pending.extend(node.parent_nodes)
        producers[layer.name] = found
    return producers


def _stem_chain(start: str, named: dict[str, str | None], consumers: dict[str, list[str]]) -> set[str]:
    """The unnamed layers from the input up to the first fork (inclusive) or the first layer of a block."""
    chain, current = {start}, start
    while len(consumers[current]) == 1 and named[consumers[current][0]] is None:
        current = consumers[current][0]
        chain.add(current)
    return chain


def _fed_block(name: str, named: dict[str, str | None], consumers: dict[str, list[str]]) -> str | None:
    """The block of the nearest named layer downstream (breadth first); None when that is "final" or absent."""
    seen, frontier = {name}, [name]
    while frontier:
        following = [c for layer in frontier for c in consumers[layer] if c not in seen]
        for consumer in following:
            if named[consumer] is not None:
                return None if named[consumer] == "final" else named[consumer]
        seen.update(following)
        frontier = following
    return None


def block_map(backbone: keras.Model, spec: BackboneSpec) -> dict[str, list[keras.layers.Layer]]:
    """Backbone layers grouped into blocks, bottom to top ("final" last); stem layers are left out."""
    blocks: dict[str, list[keras.layers.Layer]] = {}
    placed = layer_blocks(backbone, spec)
    for layer in backbone.layers:
        block = placed[layer.name]
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
    placed = layer_blocks(backbone, spec)
    backbone.trainable = True
    for layer in backbone.layers:
        layer.trainable = placed[layer.name] in chosen and not isinstance(layer, keras.layers.BatchNormalization)
    return sorted(chosen)


def model_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a classifier built here."""
    return model.get_layer(BACKBONE_LAYER)
