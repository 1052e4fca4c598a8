"""A bad config: one line naming the bad value and what is allowed, exit 2, nothing written (in process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SHARED_FLOWERS
from finetune.cli import main

FLOWERS = f"data.path={SHARED_FLOWERS}"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`finetune ARGV` in this process: exit status, stdout, stderr."""
    status = 0
    try:
        main(list(argv))
    except SystemExit as stopped:
        status = stopped.code or 0
    captured = capsys.readouterr()
    return status, captured.out, captured.err


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
        (["-m", "seed=1,abc", FLOWERS], ["seed=abc", "whole number"]),  # a sweep: every job composed first
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: list[str]
) -> None:
    status, out, err = run_cli(capsys, *overrides)
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("finetune: error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in err + out
    assert list(tmp_path.iterdir()) == []  # the test's working folder: no run directory, no MLflow database


def test_cfg_job_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_cli(capsys, "backbone=mobilenet_v2", "backbone.alpha=0.35", "--cfg", "job")
    assert status == 0, err
    assert "name: mobilenet_v2" in out
    assert "alpha: 0.35" in out
    assert "unfreeze_blocks:" in out


def test_help_names_the_subcommands_and_groups(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run_cli(capsys, "--help")
    assert status == 0
    assert "powered by Hydra" not in out
    for text in ("finetune summary", "finetune export", "finetune predict", "finetune report", "backbone:", "tuner:"):
        assert text in out
