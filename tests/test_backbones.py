"""The registry matches keras.applications: block counts, block names, Keras weight file names."""

from __future__ import annotations

import keras
import pytest
from omegaconf import OmegaConf

from conftest import SHARED_WEIGHTS
from finetune.backbones import BACKBONES
from finetune.model import block_map, top_blocks


@pytest.mark.parametrize(
    ("name", "top_two"),
    [
        ("mobilenet", ["12", "13"]),
        ("mobilenet_v2", ["block_15", "block_16", "final"]),
        ("mobilenet_v3_small", ["expanded_conv_9", "expanded_conv_10", "final"]),
        ("mobilenet_v3_large", ["expanded_conv_13", "expanded_conv_14", "final"]),
        ("efficientnet_b0", ["block6d", "block7a", "final"]),
        ("efficientnet_b1", ["block7a", "block7b", "final"]),
    ],
)
def test_block_map_matches_the_built_backbone(name: str, top_two: list[str]) -> None:
    spec = BACKBONES[name]
    backbone = getattr(keras.applications, spec.constructor)(include_top=False, weights=None, input_shape=(64, 64, 3))
    blocks = block_map(backbone, spec)
    assert len([b for b in blocks if b != "final"]) == spec.num_blocks
    assert top_blocks(backbone, spec, 2) == top_two
    weighted = [layer for layer in backbone.layers if layer.weights]
    stem = [layer.name for layer in weighted if spec.block_of(layer.name) is None]
    assert len(stem) <= 4, stem  # only the stem conv (+ BN, normalization) is outside every block


def test_efficientnet_block_counts_follow_the_depth_coefficient() -> None:
    assert [BACKBONES[f"efficientnet_b{i}"].num_blocks for i in range(8)] == [16, 23, 23, 26, 32, 39, 45, 55]


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ({"name": "mobilenet", "alpha": 0.25, "input_size": 224}, "mobilenet_2_5_224_tf_no_top.h5"),
        (
            {"name": "mobilenet_v2", "alpha": 0.35, "input_size": 224},
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
        ),
        (
            {"name": "mobilenet_v2", "alpha": 1, "input_size": 160},
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5",
        ),
        (
            {"name": "mobilenet_v3_large", "alpha": 0.75, "minimalistic": False, "input_size": 256},
            "weights_mobilenet_v3_large_224_0.75_float_no_top_v2.h5",
        ),
        ({"name": "efficientnet_b3", "input_size": 300}, "efficientnetb3_notop.h5"),
    ],
)
def test_keras_weight_file_names(backbone: dict, expected: str) -> None:
    cfg = OmegaConf.create(backbone)
    assert BACKBONES[backbone["name"]].weights_file(cfg) == expected


def test_shared_weights_carry_the_names_the_registry_expects() -> None:
    shared = {path.name for path in SHARED_WEIGHTS.glob("*.h5")}
    assert "mobilenet_2_5_224_tf_no_top.h5" in shared
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5" in shared
