"""The export measures the test split (and chooses int8 on the validation split) batch by batch: however large a
split is, no model or artifact is ever given more than one batch of its decoded images."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import keras
import numpy as np
import pytest
from omegaconf import open_dict

from conftest import COLORS, write_image
from finetune import artifacts
from finetune.config import compose
from finetune.dataset import FileSource, ImageBatches, Split, load_images
from finetune.export import bundle_files, export_run
from finetune.model import build_classifier

SIZE = 32
COUNTS = {"train": 12, "val": 70, "test": 80}  # one full batch of 64 and a short one in each measured split


def split_of(root: Path, name: str) -> Split:
    rng = np.random.default_rng(len(name))
    paths, labels = [], []
    for index in range(COUNTS[name]):
        label = index % 2
        path = root / f"c{label}" / f"{name}_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, COLORS[label], rng)
        paths.append(str(path))
        labels.append(label)
    return Split(paths, labels, FileSource(root))


def images_per_call(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Records how many images every call of a model or an artifact's predictor is given, by who was called."""
    calls: dict[str, list[int]] = defaultdict(list)

    def spy(owner: type, name: str, label: str) -> None:
        original = getattr(owner, name)

        def counted(self, images, *args, **kwargs):
            calls[label].append(len(images))
            return original(self, images, *args, **kwargs)

        monkeypatch.setattr(owner, name, counted)

    spy(keras.Model, "predict", "keras model")
    for predictor in (artifacts.KerasPredictor, artifacts.TFLitePredictor):
        spy(predictor, "__call__", predictor.__name__)
    return calls


def test_the_export_reads_each_split_one_batch_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = {name: split_of(tmp_path / "images", name) for name in COUNTS}
    cfg = compose(["backbone=mobilenet_v3_small", "backbone.weights=null", f"backbone.input_size={SIZE}",
                   "export.formats=[keras,tflite_int8]", "export.representative_images=8",
                   "export.int8.max_drop=1.0", "latency.warmup=1", "latency.runs=2"], hydra_node=True)
    with open_dict(cfg):
        del cfg["hydra"]
    keras.utils.set_random_seed(0)
    model = build_classifier(cfg, 2)
    dataset = {"name": "synthetic", "root": str(tmp_path), "fingerprint": "f",
               **{f"{name}_images": count for name, count in COUNTS.items()}}
    calls = images_per_call(monkeypatch)
    with bundle_files(cfg, model, splits, None) as files:
        reports = export_run(cfg, files, ["c0", "c1"], splits, dataset, tmp_path / "export")

    batch = ImageBatches(splits["test"], SIZE).batch_size
    assert max(size for sizes in calls.values() for size in sizes) <= batch  # never a whole split at once
    assert calls["KerasPredictor"] == [64, 16]  # the 80 test images, in two batches
    assert calls["keras model"] == [64, 6, 64, 16]  # float predictions on val (int8's choice), the test reference
    assert calls["TFLitePredictor"] == [64, 6, 64, 16]  # the int8 candidate on val, the int8 file on test
    expected = model.predict(load_images(splits["test"], SIZE).astype("float32"), verbose=0).argmax(-1)
    by_format = {report.format: report for report in reports}
    assert by_format["keras"].accuracy == pytest.approx(np.mean(expected == np.asarray(splits["test"].labels)))
