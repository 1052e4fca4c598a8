"""Config validation in process: each bad value is refused with a message naming it and what is allowed."""

from __future__ import annotations

import re

import pytest

from conftest import SHARED_FLOWERS
from finetune.config import UsageError, compose, validate

FLOWERS = f"data.path={SHARED_FLOWERS}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.augment.flip=sometimes", "data.augment.flip=sometimes must be true or false"),
        ("data.augment.rotation=1.5", "data.augment.rotation=1.5 must be a number in [0, 1)"),
        ("data.augment.zoom=-0.1", "data.augment.zoom=-0.1 must be a number in [0, 1)"),
        ("data.augment.zoom=wide", "data.augment.zoom=wide must be a number in [0, 1)"),
        ("data.augment.mixup=-1", "data.augment.mixup=-1 must be a number >= 0"),
        ("data.augment.mixup=true", "data.augment.mixup=True must be a number >= 0"),
        ("head.dropout=half", "head.dropout=half must be a number in [0, 1)"),
        ("head.hidden_units=[true]", "head.hidden_units=[True] must be a list of whole numbers >= 1"),
        ("backbone.input_size=true", "backbone.input_size=True is too small"),
        ("backbone.unfreeze_blocks=false", "backbone.unfreeze_blocks=False is out of range"),
        ("train.label_smoothing=1", "train.label_smoothing=1 must be a number in [0, 1)"),
        ("train.phase2.momentum=high", "train.phase2.momentum=high must be a number in [0, 1)"),
        ("train.phase2.warmup_fraction=1", "train.phase2.warmup_fraction=1 must be a number in [0, 1)"),
        ("train.phase1.learning_rate=fast", "train.phase1.learning_rate=fast must be a number > 0"),
        ("data.val_fraction=some", "data.val_fraction=some and data.test_fraction=0.15 must each be in (0, 1)"),
        ("data.batch_size=true", "data.batch_size=True must be a whole number >= 1"),
        ("train.phase2.clipvalue=0", "train.phase2.clipvalue=0 must be null or a number > 0"),
        ("backbone=mobilenet backbone.depth_multiplier=0", "backbone.depth_multiplier=0 must be a whole number >= 1"),
        ("mode=tune tuner.dropout.min=abc", "tuner.dropout.min=abc must be a number in [0, 1)"),
        ("mode=tune tuner.dropout={min:0.4,max:0.3,step:0.1}", "tuner.dropout min=0.4 max=0.3 must satisfy min <= max"),
        ("mode=tune tuner.dropout.step=0", "tuner.dropout.step=0 must be null or a number > 0"),
        ("mode=tune tuner.learning_rate=0.01", "tuner.learning_rate=0.01 must be null or a list of values to try, e.g. [0.01]"),
        ("mode=tune tuner.learning_rate=[0.01,-1]", "tuner.learning_rate=[0.01, -1] must be a list of numbers > 0"),
        ("mode=tune tuner.unfreeze_blocks=2", "tuner.unfreeze_blocks=2 must be null or a list of values to try"),
        ("mode=tune tuner.phase2_epochs=-1", "tuner.phase2_epochs=-1 must be a whole number >= 0"),
        ("mode=tune tuner.max_latency_ms=fast", "tuner.max_latency_ms=fast must be null or a number > 0"),
    ],
)
def test_bad_value_is_refused(override: str, expected: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(expected)):
        validate(compose([FLOWERS, *override.split()]))


def test_default_config_and_augmentation_switched_off_are_valid() -> None:
    validate(compose([FLOWERS]))
    validate(compose([FLOWERS, "data.augment.flip=false", "data.augment.rotation=0", "data.augment.zoom=0"]))
