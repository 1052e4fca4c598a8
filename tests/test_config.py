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
        ("train.label_smoothing=1", "train.label_smoothing=1 must be a number in [0, 1)"),
        ("train.phase2.momentum=high", "train.phase2.momentum=high must be a number in [0, 1)"),
        ("train.phase1.learning_rate=fast", "train.phase1.learning_rate=fast must be > 0"),
    ],
)
def test_bad_number_is_refused(override: str, expected: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(expected)):
        validate(compose([FLOWERS, override]))


def test_default_config_and_augmentation_switched_off_are_valid() -> None:
    validate(compose([FLOWERS]))
    validate(compose([FLOWERS, "data.augment.flip=false", "data.augment.rotation=0", "data.augment.zoom=0"]))
