"""Config validation in process: each bad value is refused with one line naming it and what is allowed."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import SHARED_FLOWERS
from finetune.backbones import BACKBONES
from finetune.config import CONF_DIR, UsageError, compose, validate, validate_export
from finetune.schema import RULE, Backbone, Rule

FLOWERS = f"data.path={SHARED_FLOWERS}"
GROUP_OPTIONS = [f"{group}={path.stem}" for group in ("backbone", "data", "tuner")
                 for path in sorted((CONF_DIR / group).glob("*.yaml"))]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.augment.flip=sometimes", "data.augment.flip=sometimes must be true or false"),
        ("data.augment.rotation=1.5", "data.augment.rotation=1.5 must be a number in [0, 1)"),
        ("data.augment.zoom=-0.1", "data.augment.zoom=-0.1 must be a number in [0, 1)"),
        ("data.augment.zoom=wide", "data.augment.zoom=wide must be a number in [0, 1)"),
        ("data.augment.mixup=-1", "data.augment.mixup=-1.0 must be a number >= 0"),
        ("data.augment.mixup=true", "data.augment.mixup=true must be a number >= 0"),
        ("head.dropout=half", "head.dropout=half must be a number in [0, 1)"),
        ("head.hidden_units=[true]", "head.hidden_units[0]=true must be a whole number >= 1"),
        ("head.hidden_units=[64,0]", "head.hidden_units[1]=0 must be a whole number >= 1"),
        ("head.hidden_units=256", "head.hidden_units=256 must be a list of whole numbers >= 1, e.g. [256]"),
        ("backbone.input_size=true", "backbone.input_size=true must be a whole number >= 32"),
        ("backbone.unfreeze_blocks=false", "backbone.unfreeze_blocks=false must be a whole number >= 0"),
        ("train.label_smoothing=1", "train.label_smoothing=1.0 must be a number in [0, 1)"),
        ("train.phase2.momentum=high", "train.phase2.momentum=high must be a number in [0, 1)"),
        ("train.phase2.warmup_fraction=1", "train.phase2.warmup_fraction=1.0 must be a number in [0, 1)"),
        ("train.phase1.learning_rate=fast", "train.phase1.learning_rate=fast must be a number > 0"),
        ("train.phase1.learning_rate=inf", "train.phase1.learning_rate=inf must be a number > 0"),
        ("data.val_fraction=some", "data.val_fraction=some must be a number in (0, 1)"),
        ("data.val_fraction=0.5 data.test_fraction=0.5",
         "data.val_fraction=0.5 and data.test_fraction=0.5 must sum to less than 1"),
        ("data.batch_size=true", "data.batch_size=true must be a whole number >= 1"),
        ("train.feature_cache=sometimes", "train.feature_cache=sometimes must be true or false"),
        ("train.feature_views=0", "train.feature_views=0 must be a whole number >= 1"),
        ("data.cache=sometimes", "data.cache=sometimes must be auto, memory, disk or none"),
        ("memory_budget_gb=0", "memory_budget_gb=0.0 must be a number > 0"),
        ("data.cache_disk_gb=0", "data.cache_disk_gb=0.0 must be a number > 0"),
        ("train.phase2.clipvalue=0", "train.phase2.clipvalue=0.0 must be null or a number > 0"),
        ("backbone=mobilenet backbone.depth_multiplier=0", "backbone.depth_multiplier=0 must be a whole number >= 1"),
        ("mode=tune tuner.dropout.min=abc", "tuner.dropout.min=abc must be a number in [0, 1)"),
        ("mode=tune tuner.dropout={min:0.4,max:0.3,step:0.1}", "tuner.dropout min=0.4 max=0.3 must satisfy min <= max"),
        ("mode=tune tuner.dropout.step=0", "tuner.dropout.step=0.0 must be null or a number > 0"),
        ("mode=tune tuner.learning_rate=0.01", "tuner.learning_rate=0.01 must be null or a list of numbers > 0, e.g. [0.01]"),
        ("mode=tune tuner.learning_rate=[0.01,-1]", "tuner.learning_rate[1]=-1.0 must be a number > 0"),
        ("mode=tune tuner.unfreeze_blocks=2", "tuner.unfreeze_blocks=2 must be null or a list of whole numbers >= 0, e.g. [2]"),
        ("mode=tune tuner.phase2_epochs=-1", "tuner.phase2_epochs=-1 must be a whole number >= 0"),
        ("mode=tune tuner.max_latency_ms=fast", "tuner.max_latency_ms=fast must be null or a number > 0"),
        # keys the per-key checks left out
        ("seed=abc", "seed=abc must be a whole number in [0, 4294967295]"),
        ("seed=-1", "seed=-1 must be a whole number in [0, 4294967295]"),
        ("data.split_seed=4294967296", "data.split_seed=4294967296 must be a whole number in [0, 4294967295]"),
        ("evaluate.top_k=0", "evaluate.top_k=0 must be a whole number >= 1"),
        ("latency.warmup=-1", "latency.warmup=-1 must be a whole number >= 0"),
        ("latency.runs=0", "latency.runs=0 must be a whole number >= 1"),
        ("export.tolerance.float32=0", "export.tolerance.float32=0.0 must be a number > 0"),
        ("export.tolerance.float16=loose", "export.tolerance.float16=loose must be a number > 0"),
        ("export.int8.max_drop=-0.01", "export.int8.max_drop=-0.01 must be a number in [0, 1]"),
        ("export.int8.max_drop=1.5", "export.int8.max_drop=1.5 must be a number in [0, 1]"),
        ("export.int8.max_slowdown=0.5", "export.int8.max_slowdown=0.5 must be null or a number >= 1"),
        ("export.int8.integer_only=maybe", "export.int8.integer_only=maybe must be true or false"),
        ("latency.format=keras",
         "latency.format=keras must be tflite_float32, tflite_float16, tflite_dynamic or tflite_int8"),
        ("latency.format=[tflite_int8]", "latency.format=[tflite_int8] must be tflite_float32, tflite_float16,"),
        ("latency.threads=0", "latency.threads=0 must be a whole number >= 1"),
        ("latency.threads=null", "latency.threads=null must be a whole number >= 1"),
        ("latency.keras_threads=0", "latency.keras_threads=0 must be null or a whole number >= 1"),
        ("latency.keras_threads=all", "latency.keras_threads=all must be null or a whole number >= 1"),
        ("export.tflite_threads=1", "export.tflite_threads is not a known key; export has: formats,"),
        ("export.register_model=''", "export.register_model='' must be null or a non-empty name"),
        ("export.formats=[keras,onnx]", "export.formats[1]=onnx must be keras, saved_model, tflite_float32,"),
        ("mlflow.experiment=''", "mlflow.experiment='' must be a non-empty name"),
        ("mlflow.run_name=''", "mlflow.run_name='' must be null or a non-empty name"),
        ("tuner.max_trials=0", "tuner.max_trials=0 must be a whole number >= 1"),  # checked in mode=train too
        ("tuner.input_size=[16]", "tuner.input_size[0]=16 must be a whole number >= 32"),
        ("backbone=mobilenet_v2 backbone.name=efficientnet_b0", "backbone.name=efficientnet_b0 must be mobilenet_v2"),
        ("backbone=efficientnet_b0 backbone.alpha=0.5",
         "backbone.alpha is not a known key; backbone has: name, input_size, weights, unfreeze_blocks"),
        ("backbone=efficientnet_b0 +backbone.alpha=0.5",
         "backbone.alpha is not a known key; backbone has: name, input_size, weights, unfreeze_blocks"),
        ("+colour=red", "colour is not a known key; the config has: backbone, data, head,"),
    ],
)
def test_bad_value_is_refused(override: str, expected: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(expected)) as refused:
        validate(compose([FLOWERS, *override.split()]))
    assert "\n" not in str(refused.value)


def test_default_config_and_augmentation_switched_off_are_valid() -> None:
    validate(compose([FLOWERS]))
    validate(compose([FLOWERS, "data.augment.flip=false", "data.augment.rotation=0", "data.augment.zoom=0"]))


def test_alpha_is_a_float_whatever_is_typed() -> None:
    """Keras writes str(alpha) into the weights file name: an int 1 looks up `large_224_1_float`, which does not exist."""
    cfg = compose([FLOWERS, "backbone=mobilenet_v3_large", "backbone.alpha=1", "mode=tune", "tuner.alpha=[1]"])
    validate(cfg)
    assert str(cfg.backbone.alpha) == "1.0"
    assert [str(alpha) for alpha in cfg.tuner.alpha] == ["1.0"]


def test_saved_run_export_config_is_checked_like_a_composed_one() -> None:
    """`finetune export` checks the plain config.yaml of a finished run against the same schema."""
    saved = OmegaConf.create(OmegaConf.to_container(compose([FLOWERS]).export))
    validate_export(saved)
    saved.representative_images = "many"
    with pytest.raises(UsageError, match=re.escape("export.representative_images=many must be a whole number >= 1")):
        validate_export(saved)


def leaves(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, Rule | None]]:
    """(key, type, Rule) of every leaf of a composed config, from the schema class of each node."""
    schema = OmegaConf.get_type(node)
    assert dataclasses.is_dataclass(schema), f"{prefix or 'the config'} has no schema class"
    fields = {field.name: field for field in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node:
        assert key in fields, f"{prefix}{key} is not in {schema.__name__}"
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            yield from leaves(child, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", hints[key], fields[key].metadata.get(RULE)


@pytest.mark.parametrize("option", [None, *GROUP_OPTIONS])
def test_every_key_has_a_type_and_a_rule(option: str | None) -> None:
    """A key added to conf/ or finetune/schema.py without a type and a Rule fails here."""
    data = ["data.dataset=beans"] if option == "data=tfds" else [FLOWERS]  # a TFDS dataset has no path
    cfg = compose([*([option] if option else []), *data])
    for key, hint, rule in leaves(cfg):
        assert hint is not Any, f"{key} has no type in finetune/schema.py"
        assert rule is not None, f"{key} has no Rule in finetune/schema.py"
        assert rule != Rule() or hint is bool, f"{key}: an empty Rule is for true/false only; give a range, choices or free=..."
    validate(cfg)  # every shipped option is valid as it is


@pytest.mark.parametrize("option", sorted(path.stem for path in (CONF_DIR / "backbone").glob("*.yaml")))
def test_backbone_schema_has_the_constructor_keys_of_its_family(option: str) -> None:
    backbone = compose([f"backbone={option}"]).backbone
    common = {field.name for field in dataclasses.fields(Backbone)}
    assert set(backbone) - common == set(BACKBONES[backbone.name].extra_kwargs)
