"""Real ImageNet weights through the offline options, on real flower photos, via the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED_FLOWERS, SHARED_WEIGHTS, cli

pytestmark = pytest.mark.slow
PER_CLASS = 24


@pytest.fixture(scope="module")
def flower_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 24 shared photos of each of the 5 classes."""
    root = tmp_path_factory.mktemp("flowers")
    for class_dir in sorted(p for p in SHARED_FLOWERS.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir()
        for photo in sorted(class_dir.glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(photo, root / class_dir.name / photo.name)
    return root


def test_weights_dir_supplies_keras_file_and_model_learns(tmp_path: Path, flower_subset: Path) -> None:
    run_dir = tmp_path / "run"
    result = cli(
        "backbone=mobilenet_v2",
        "backbone.alpha=0.35",
        "backbone.unfreeze_blocks=1",
        f"weights_dir={SHARED_WEIGHTS}",
        f"data.path={flower_subset}",
        "data.batch_size=16",
        "train.phase1.epochs=4",
        "train.phase2.epochs=1",
        "latency.runs=5",
        "export.formats=[]",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"KERAS_HOME": str(tmp_path / "empty_keras_home")},  # no cache, no network: only weights_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    keras_file = SHARED_WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    assert f"with weights: {keras_file}" in result.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.5  # 5 classes: chance is 0.2; random weights stay near it
    best = max(metrics["phase1_best_val_accuracy"], metrics["phase2_best_val_accuracy"])
    assert metrics["final_val_accuracy"] == pytest.approx(best)  # phase 2 never leaves it worse than phase 1


def test_weights_file_path_loads_the_approximate_v3_small(tmp_path: Path, flower_subset: Path) -> None:
    weights = SHARED_WEIGHTS / "mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5"
    result = cli(
        "backbone=mobilenet_v3_small",
        f"backbone.weights={weights}",
        "backbone.input_size=160",  # a V3 weights file fits any input size
        f"data.path={flower_subset}",
        "data.batch_size=8",
        "train.phase1.epochs=10",
        "train.phase2.epochs=0",
        "latency.runs=5",
        "export.formats=[]",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"] >= 0.5


def test_a_weights_file_for_another_backbone_is_one_line(tmp_path: Path, flower_subset: Path) -> None:
    weights = SHARED_WEIGHTS / "mobilenet_2_5_224_tf_no_top.h5"  # MobileNet V1 weights
    result = cli("backbone=mobilenet_v3_small", f"backbone.weights={weights}", f"data.path={flower_subset}",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"finetune: error: backbone.weights={weights} does not fit mobilenet_v3_small")
    assert not (tmp_path / "run").exists()


def test_summary_prints_costs_and_block_map(tmp_path: Path) -> None:
    result = cli("summary", "backbone=mobilenet_v2", "backbone.alpha=0.35", "backbone.unfreeze_blocks=3",
                 "--classes", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "MACs: 58.0 M per image" in result.stdout
    assert "backbone 410,208" in result.stdout  # Keras's count for MobileNetV2 0.35 without top
    trainable = [line.split()[0] for line in lines if line.endswith("trainable")]
    assert trainable == ["block_14", "block_15", "block_16", "final"]
    assert list(tmp_path.iterdir()) == []


def test_deterministic_runs_repeat_exactly(tmp_path: Path, flower_subset: Path) -> None:
    weights = SHARED_WEIGHTS / "mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5"
    histories = []
    for name in ("first", "second"):
        result = cli(
            "backbone=mobilenet_v3_small", f"backbone.weights={weights}", "backbone.input_size=64",
            f"data.path={flower_subset}", "data.batch_size=16", "train.phase1.epochs=1", "train.phase2.epochs=1",
            "latency.runs=2", "export.formats=[]", "deterministic=true", f"hydra.run.dir={tmp_path / name}",
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        histories.append(json.loads((tmp_path / name / "state.json").read_text())["epochs"])
    assert len(histories[0]) == 2
    assert histories[0] == histories[1]  # every loss and accuracy of every epoch, to the last bit
