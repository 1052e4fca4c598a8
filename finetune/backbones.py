"""Registry of keras.applications backbones: constructor, preprocessing, ImageNet weights, block map.

Pure Python (no TensorFlow import), so config validation stays fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class BackboneSpec:
    """What finetune knows about one backbone of keras.applications."""

    name: str
    constructor: str  # attribute of keras.applications
    scales_inputs: bool  # True: the model rescales 0..255 itself; False: we add a [-1, 1] rescaling
    imagenet_alphas: tuple[float, ...] | None  # None: the family has no alpha knob
    imagenet_sizes: tuple[int, ...] | None  # None: ImageNet weights at any size >= 32
    block_pattern: str  # regex; group 1 names the block a layer belongs to
    final_pattern: str | None  # regex of the final conv layers that follow the last block
    num_blocks: int
    weights_file: Callable[[dict[str, Any]], str]  # Keras's cache file name for the no-top weights
    extra_kwargs: tuple[str, ...] = field(default=())  # config keys passed straight to the constructor
    # Keras's weights="imagenet" build (and only that build) rescales by 1/sqrt(ImageNet stddev) after its
    # Normalization layer; weights derived from ImageNet expect that layer, also when they come from a file
    imagenet_stddev_rescaling: bool = False

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer belongs to ("final" for the last conv), or None for stem/other layers."""
        match = re.match(self.block_pattern, layer_name)
        if match:
            return match.group(1)
        if self.final_pattern and re.match(self.final_pattern, layer_name):
            return "final"
        return None


def _v1_file(cfg: dict[str, Any]) -> str:
    alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[float(cfg["alpha"])]
    return f"mobilenet_{alpha_text}_{_keras_rows(cfg, (128, 160, 192, 224))}_tf_no_top.h5"


def _v2_file(cfg: dict[str, Any]) -> str:
    rows = _keras_rows(cfg, (96, 128, 160, 192, 224))
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(cfg['alpha'])}_{rows}_no_top.h5"


def _v3_file(size: str) -> Callable[[dict[str, Any]], str]:
    def file_name(cfg: dict[str, Any]) -> str:
        minimal = "_minimalistic" if cfg.get("minimalistic") else ""
        return f"weights_mobilenet_v3_{size}{minimal}_224_{float(cfg['alpha'])}_float_no_top_v2.h5"

    return file_name


def _efficientnet_file(variant: int) -> Callable[[dict[str, Any]], str]:
    return lambda cfg: f"efficientnetb{variant}_notop.h5"


def _keras_rows(cfg: dict[str, Any], sizes: tuple[int, ...]) -> int:
    """Keras loads the 224 file for an input size it has no weights for."""
    size = int(cfg["input_size"])
    return size if size in sizes else 224


def _efficientnet_blocks(depth_coefficient: float) -> int:
    base_repeats = (1, 2, 2, 3, 3, 4, 1)  # keras.applications.efficientnet DEFAULT_BLOCKS_ARGS
    return sum(math.ceil(depth_coefficient * r) for r in base_repeats)


_EFFICIENTNET_DEPTH = (1.0, 1.1, 1.2, 1.4, 1.8, 2.2, 2.6, 3.1)

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec(
            name="mobilenet",
            constructor="MobileNet",
            scales_inputs=False,
            imagenet_alphas=(0.25, 0.5, 0.75, 1.0),
            imagenet_sizes=(128, 160, 192, 224),
            block_pattern=r"^conv_(?:dw|pw)_(\d+)(?:_|$)",
            final_pattern=None,
            num_blocks=13,
            weights_file=_v1_file,
            extra_kwargs=("alpha", "depth_multiplier"),
        ),
        BackboneSpec(
            name="mobilenet_v2",
            constructor="MobileNetV2",
            scales_inputs=False,
            imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
            imagenet_sizes=(96, 128, 160, 192, 224),
            block_pattern=r"^(expanded_conv|block_\d+)_",
            final_pattern=r"^Conv_1",
            num_blocks=17,
            weights_file=_v2_file,
            extra_kwargs=("alpha",),
        ),
        *[
            BackboneSpec(
                name=f"mobilenet_v3_{size}",
                constructor=f"MobileNetV3{size.capitalize()}",
                scales_inputs=True,
                imagenet_alphas=(0.75, 1.0),
                imagenet_sizes=None,
                block_pattern=r"^(expanded_conv(?:_\d+)?)_",
                final_pattern=r"^conv_1(?:_|$)",
                num_blocks=blocks,
                weights_file=_v3_file(size),
                extra_kwargs=("alpha", "minimalistic"),
            )
            for size, blocks in (("small", 11), ("large", 15))
        ],
        *[
            BackboneSpec(
                name=f"efficientnet_b{variant}",
                constructor=f"EfficientNetB{variant}",
                scales_inputs=True,
                imagenet_alphas=None,
                imagenet_sizes=None,
                block_pattern=r"^(block\d+[a-z])_",
                final_pattern=r"^top_",
                num_blocks=_efficientnet_blocks(depth),
                weights_file=_efficientnet_file(variant),
                imagenet_stddev_rescaling=True,
            )
            for variant, depth in enumerate(_EFFICIENTNET_DEPTH)
        ],
    ]
}


def imagenet_alphas(spec: BackboneSpec, cfg: dict[str, Any]) -> tuple[float, ...] | None:
    """Alphas with ImageNet weights for this config (V3 minimalistic has only 1.0)."""
    if spec.name.startswith("mobilenet_v3") and cfg.get("minimalistic"):
        return (1.0,)
    return spec.imagenet_alphas
