"""A bad config: one line naming the bad value and what is allowed, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_FLOWERS, cli

FLOWERS = f"data.path={SHARED_FLOWERS}"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backbone=resnet_9000", FLOWERS], ["backbone/resnet_9000", "mobilenet_v2", "efficientnet_b0"]),
        (["backbone=mobilenet_v2", "backbone.alpha=0.4", FLOWERS], ["backbone.alpha=0.4", "0.35", "weights=null"]),
        (["backbone=mobilenet_v2", "backbone.input_size=100", FLOWERS], ["input_size=100", "96, 128, 160, 192, 224"]),
        (["backbone=mobilenet_v3_small", "backbone.weights=null", "backbone.input_size=16", FLOWERS], ["input_size=16", ">= 32"]),
        (["backbone=mobilenet_v3_small", "backbone.unfreeze_blocks=12", FLOWERS], ["unfreeze_blocks=12", "11 blocks", "0..11"]),
        (["backbone=mobilenet", "backbone.depth_multiplier=2", FLOWERS], ["depth_multiplier=2", "weights=null"]),
        (["data=folder"], ["data.path"]),
        (["data=folder", "data.path=/no/such/folder"], ["data.path=/no/such/folder", "not a folder"]),
        (["backbone.alpah=0.5", FLOWERS], ["alpah"]),
        (["head.pooling=median", FLOWERS], ["head.pooling=median", "avg or max"]),
        (["train.phase1.optimizer=lion", FLOWERS], ["lion", "adam"]),
        (["train.phase2.clipvalue=0", FLOWERS], ["clipvalue=0", "null or a number > 0"]),
        (["deterministic=maybe", FLOWERS], ["deterministic=maybe", "true or false"]),
        (["mode=tune", "backbone=mobilenet_v2", "tuner.alpha=[0.35,0.4]", FLOWERS], ["tuner.alpha has 0.4", "0.35, 0.5"]),
        (["mode=tune", "backbone=mobilenet_v2", "tuner.input_size=[100]", FLOWERS], ["tuner.input_size has 100", "96, 128"]),
        (["mode=tune", "tuner.unfreeze_blocks=[2,99]", FLOWERS], ["tuner.unfreeze_blocks has 99", "0..15"]),
        (["mode=tune", "backbone=efficientnet_b0", "tuner.alpha=[1.0]", FLOWERS], ["tuner.alpha is set", "no alpha"]),
        (["backbone.weights=/no/such/file.h5", FLOWERS], ["/no/such/file.h5", "imagenet, null"]),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, overrides: list[str], expected: list[str]) -> None:
    result = cli(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("finetune: error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []  # no run directory, no MLflow database


def test_cfg_job_prints_resolved_config(tmp_path: Path) -> None:
    result = cli("backbone=mobilenet_v2", "backbone.alpha=0.35", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: mobilenet_v2" in result.stdout
    assert "alpha: 0.35" in result.stdout
    assert "unfreeze_blocks:" in result.stdout
