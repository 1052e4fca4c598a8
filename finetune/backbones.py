"""Registry of keras.applications backbones: constructor, preprocessing, input sizes, ImageNet weights, block map.

Pure Python (no TensorFlow import), so config validation stays fast.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

MIN_INPUT_SIZE = 32  # the smallest input any family accepts (keras.applications' own minimum for most)


@dataclass(frozen=True)
class InputNormalization:
    """What a backbone expects of raw 0..255 RGB pixels: (pixel - mean) / stddev per channel, maybe in BGR order."""

    label: str  # for the summary and the README: "[-1, 1]", "caffe: BGR minus the ImageNet mean" ...
    mean_rgb: tuple[float, float, float]
    stddev_rgb: tuple[float, float, float]
    bgr: bool = False  # the weights were trained on BGR images (Caffe)


# The three modes of keras.applications.imagenet_utils.preprocess_input, for 0..255 RGB input
TF_MODE = InputNormalization("[-1, 1]", (127.5, 127.5, 127.5), (127.5, 127.5, 127.5))
TORCH_MODE = InputNormalization(
    "torch: ImageNet mean/std", (0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)
)
CAFFE_MODE = InputNormalization("caffe: BGR, ImageNet mean subtracted", (123.68, 116.779, 103.939), (1.0, 1.0, 1.0), bgr=True)


@dataclass(frozen=True)
class BackboneSpec:
    """What finetune knows about one backbone of keras.applications."""

    name: str
    constructor: str  # attribute of keras.applications
    keras_module: str  # keras.applications module: its preprocess_input is what `input_normalization` reproduces
    input_normalization: InputNormalization | None  # None: the model normalizes 0..255 RGB itself
    imagenet_alphas: tuple[float, ...] | None  # None: the family has no alpha knob
    imagenet_sizes: tuple[int, ...] | None  # None: ImageNet weights at any size >= min_input_size
    block_pattern: str  # regex; group 1 names the block a layer belongs to
    final_pattern: str | None  # regex of the final layers (conv, norm) that follow the last block
    num_blocks: int
    weights_file: Callable[[dict[str, Any]], str]  # Keras's cache file name for the no-top weights
    extra_kwargs: tuple[str, ...] = field(default=())  # config keys passed straight to the constructor
    min_input_size: int = MIN_INPUT_SIZE  # keras.applications' own minimum (min_size) for the family
    # Layers whose names give no block (Keras names some automatically: conv2d_7, add_3) join the block of
    # the first named layer they feed ("feeds"), or of the layer before them in Keras's order ("follows")
    loose_layers: str = "feeds"
    # A block takes two tensors (NASNet's cells read the two previous cells): no single tensor crosses the
    # boundary between two blocks, so a cache of one block's output cannot stand in for the layers below it
    two_input_blocks: bool = False
    # Keras's weights="imagenet" build (and only that build) rescales by 1/sqrt(ImageNet stddev) after its
    # Normalization layer; weights derived from ImageNet expect that layer, also when they come from a file
    imagenet_stddev_rescaling: bool = False

    @property
    def scales_inputs(self) -> bool:
        """True when the model takes 0..255 RGB as it is (its preprocessing is built in)."""
        return self.input_normalization is None

    def block_of(self, layer_name: str) -> str | None:
        """The block a layer's name places it in ("final" for the last conv), or None (stem, or a name Keras
        made up; finetune.model.layer_blocks places those by the graph)."""
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


def _fixed_file(file_name: str) -> Callable[[dict[str, Any]], str]:
    """Families whose no-top file does not depend on the config (one file per model)."""
    return lambda cfg: file_name


def _keras_rows(cfg: dict[str, Any], sizes: tuple[int, ...]) -> int:
    """Keras loads the 224 file for an input size it has no weights for."""
    size = int(cfg["input_size"])
    return size if size in sizes else 224


def _scaled_blocks(repeats: tuple[int, ...], depth_coefficient: float) -> int:
    """EfficientNet's blocks: each stage's repeats scaled by the depth coefficient, rounded up (as Keras does)."""
    return sum(math.ceil(depth_coefficient * r) for r in repeats)


_EFFICIENTNET_REPEATS = (1, 2, 2, 3, 3, 4, 1)  # keras.applications.efficientnet DEFAULT_BLOCKS_ARGS
_EFFICIENTNET_DEPTH = (1.0, 1.1, 1.2, 1.4, 1.8, 2.2, 2.6, 3.1)
_EFFICIENTNET_V2 = {  # variant: (repeats of keras.applications.efficientnet_v2 DEFAULT_BLOCKS_ARGS, depth coefficient)
    "b0": ((1, 2, 2, 3, 5, 8), 1.0),
    "b1": ((1, 2, 2, 3, 5, 8), 1.1),
    "b2": ((1, 2, 2, 3, 5, 8), 1.2),
    "b3": ((1, 2, 2, 3, 5, 8), 1.4),
    "s": ((2, 4, 4, 6, 9, 15), 1.0),
    "m": ((3, 5, 5, 7, 14, 18, 5), 1.0),
    "l": ((4, 7, 7, 10, 19, 25, 7), 1.0),
}
_RESNET_REPEATS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # residual units per stage
_DENSENET_REPEATS = {121: (6, 12, 24, 16), 169: (6, 12, 32, 32), 201: (6, 12, 48, 32)}  # dense units per block
_CONVNEXT_REPEATS = {"tiny": (3, 3, 9, 3), "small": (3, 3, 27, 3), "base": (3, 3, 27, 3), "large": (3, 3, 27, 3),
                     "xlarge": (3, 3, 27, 3)}
_NASNET_CELLS = {"mobile": 4, "large": 6}  # normal cells between reductions (Keras's num_blocks)
_KERAS_KERNELS_NOTOP = "_weights_tf_dim_ordering_tf_kernels_notop.h5"  # the suffix of Keras's older no-top files


def _mobilenets() -> list[BackboneSpec]:
    v3 = [
        BackboneSpec(
            name=f"mobilenet_v3_{size}",
            constructor=f"MobileNetV3{size.capitalize()}",
            keras_module="mobilenet_v3",
            input_normalization=None,
            imagenet_alphas=(0.75, 1.0),
            imagenet_sizes=None,
            block_pattern=r"^(expanded_conv(?:_\d+)?)_",
            final_pattern=r"^conv_1(?:_|$)",
            num_blocks=blocks,
            weights_file=_v3_file(size),
            extra_kwargs=("alpha", "minimalistic"),
        )
        for size, blocks in (("small", 11), ("large", 15))
    ]
    return [
        BackboneSpec(
            name="mobilenet",
            constructor="MobileNet",
            keras_module="mobilenet",
            input_normalization=TF_MODE,
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
            keras_module="mobilenet_v2",
            input_normalization=TF_MODE,
            imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
            imagenet_sizes=(96, 128, 160, 192, 224),
            block_pattern=r"^(expanded_conv|block_\d+)_",
            final_pattern=r"^Conv_1",
            num_blocks=17,
            weights_file=_v2_file,
            extra_kwargs=("alpha",),
        ),
        *v3,
    ]


def _efficientnets() -> list[BackboneSpec]:
    v1 = [
        BackboneSpec(
            name=f"efficientnet_b{variant}",
            constructor=f"EfficientNetB{variant}",
            keras_module="efficientnet",
            input_normalization=None,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(block\d+[a-z])_",
            final_pattern=r"^top_",
            num_blocks=_scaled_blocks(_EFFICIENTNET_REPEATS, depth),
            weights_file=_fixed_file(f"efficientnetb{variant}_notop.h5"),
            imagenet_stddev_rescaling=True,
        )
        for variant, depth in enumerate(_EFFICIENTNET_DEPTH)
    ]
    v2 = [
        BackboneSpec(
            name=f"efficientnet_v2_{variant}",
            constructor=f"EfficientNetV2{variant.upper()}",
            keras_module="efficientnet_v2",
            input_normalization=None,  # include_preprocessing=True (Keras's default)
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(block\d+[a-z])_",
            final_pattern=r"^top_",
            num_blocks=_scaled_blocks(repeats, depth),
            weights_file=_fixed_file(f"efficientnetv2-{variant}_notop.h5"),
        )
        for variant, (repeats, depth) in _EFFICIENTNET_V2.items()
    ]
    return v1 + v2


def _resnets() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=f"resnet{depth}{suffix}",
            constructor=f"ResNet{depth}{suffix.replace('_v2', 'V2')}",
            keras_module="resnet_v2" if suffix else "resnet",
            input_normalization=TF_MODE if suffix else CAFFE_MODE,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(conv\d_block\d+)_",
            final_pattern=r"^post_" if suffix else None,  # V2's last BatchNorm + ReLU
            num_blocks=sum(repeats),
            weights_file=_fixed_file(f"resnet{depth}{suffix.replace('_', '')}{_KERAS_KERNELS_NOTOP}"),
        )
        for suffix in ("", "_v2")
        for depth, repeats in _RESNET_REPEATS.items()
    ]


def _classic_cnns() -> list[BackboneSpec]:
    """VGG, Xception, InceptionV3, InceptionResNetV2 and DenseNet: one ImageNet file per model, no knobs."""
    vgg = [
        BackboneSpec(
            name=f"vgg{depth}",
            constructor=f"VGG{depth}",
            keras_module=f"vgg{depth}",
            input_normalization=CAFFE_MODE,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(block\d)_",
            final_pattern=None,
            num_blocks=5,
            weights_file=_fixed_file(f"vgg{depth}{_KERAS_KERNELS_NOTOP}"),
        )
        for depth in (16, 19)
    ]
    densenets = [
        BackboneSpec(
            name=f"densenet{depth}",
            constructor=f"DenseNet{depth}",
            keras_module="densenet",
            input_normalization=TORCH_MODE,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(conv\d_block\d+|pool[2-4])_",  # dense units, and the transitions between blocks
            final_pattern=r"^(?:bn|relu)$",
            num_blocks=sum(repeats) + 3,
            weights_file=_fixed_file(f"densenet{depth}{_KERAS_KERNELS_NOTOP}"),
        )
        for depth, repeats in _DENSENET_REPEATS.items()
    ]
    return [
        *vgg,
        BackboneSpec(
            name="xception",
            constructor="Xception",
            keras_module="xception",
            input_normalization=TF_MODE,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(block\d+)_",
            final_pattern=None,
            num_blocks=14,
            weights_file=_fixed_file(f"xception{_KERAS_KERNELS_NOTOP}"),
            min_input_size=71,
            loose_layers="follows",  # the residual shortcuts (conv2d, batch_normalization, add) of each block
        ),
        BackboneSpec(
            name="inception_v3",
            constructor="InceptionV3",
            keras_module="inception_v3",
            input_normalization=TF_MODE,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(mixed\d+)$",  # each module's output; its branches feed it
            final_pattern=None,
            num_blocks=11,
            weights_file=_fixed_file(f"inception_v3{_KERAS_KERNELS_NOTOP}"),
            min_input_size=75,
        ),
        BackboneSpec(
            name="inception_resnet_v2",
            constructor="InceptionResNetV2",
            keras_module="inception_resnet_v2",
            input_normalization=TF_MODE,
            imagenet_alphas=None,
            imagenet_sizes=None,
            block_pattern=r"^(mixed_\d[a-z]|block\d+_\d+)(?:_|$)",  # mixed_5b, block35_1 .. block8_10, reductions
            final_pattern=r"^conv_7b",
            num_blocks=1 + 10 + 1 + 20 + 1 + 10,
            weights_file=_fixed_file(f"inception_resnet_v2{_KERAS_KERNELS_NOTOP}"),
            min_input_size=75,
        ),
        *densenets,
    ]


def _nasnets() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=f"nasnet_{size}",
            constructor=f"NASNet{size.capitalize()}",
            keras_module="nasnet",
            input_normalization=TF_MODE,
            imagenet_alphas=None,
            imagenet_sizes=(image_size,),
            # a cell's named layers end in its id: stem_1, stem_2 (the stem's reduction cells), 0, 1, .., reduce_4, ..
            block_pattern=r"^(?:separable_conv|reduction|normal|adjust).*?_(stem_\d|reduce_\d+|\d+)$",
            final_pattern=None,
            num_blocks=2 + 3 * cells + 2,
            weights_file=_fixed_file(f"nasnet_{size}_no_top.h5"),
            two_input_blocks=True,
        )
        for (size, cells), image_size in zip(_NASNET_CELLS.items(), (224, 331))
    ]


def _convnexts() -> list[BackboneSpec]:
    return [
        BackboneSpec(
            name=f"convnext_{size}",
            constructor=f"ConvNeXt{size.capitalize().replace('large', 'Large')}",
            keras_module="convnext",
            input_normalization=None,  # include_preprocessing=True (Keras's default)
            imagenet_alphas=None,
            imagenet_sizes=None,
            # ConvNeXt blocks, and the downsampling between stages
            block_pattern=r"^convnext_[a-z]+_(stage_\d_block_\d+|downsampling_block_\d)(?:_|$)",
            final_pattern=r"^layer_normalization(?:_\d+)?$",  # the last LayerNorm (Keras names it itself)
            num_blocks=sum(repeats) + 3,
            weights_file=_fixed_file(f"convnext_{size}_notop.h5"),
        )
        for size, repeats in _CONVNEXT_REPEATS.items()
    ]


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [*_mobilenets(), *_efficientnets(), *_resnets(), *_classic_cnns(), *_nasnets(), *_convnexts()]
}


def imagenet_alphas(spec: BackboneSpec, cfg: dict[str, Any]) -> tuple[float, ...] | None:
    """Alphas with ImageNet weights for this config (V3 minimalistic has only 1.0)."""
    if spec.name.startswith("mobilenet_v3") and cfg.get("minimalistic"):
        return (1.0,)
    return spec.imagenet_alphas
