"""train.feature_cache: cached features and activations give the model the uncached path gives.

Tiny synthetic images at 32 px; the MobileNetV3Small file of ../shared/weights where phase 2 must move
weights (random weights in inference-mode BatchNorm give it vanishing gradients)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf

from conftest import SHARED_WEIGHTS, quick_overrides
from finetune import feature_cache, interrupts, trainer
from finetune.cli import main
from finetune.backbones import BACKBONES
from finetune.config import compose
from finetune.dataset import load_images, make_dataset
from finetune.feature_cache import (BOUNDARY, DISK_HEADROOM_BYTES, POOLED, CachedFeeds, cache_key, cached_batches,
                                    cut_classifier, phase2_cut)
from finetune.model import build_classifier, layer_blocks, model_backbone, top_blocks
from finetune.run import PreparedData, prepare_data, seed_everything
from finetune.trainer import ImageFeeds, RunState, train_two_phases

V3_SMALL = SHARED_WEIGHTS / "mobilenet_v3_small_1.0_224_no_top__dequant_slim_uint8_tflite.h5"
NO_AUGMENTATION = ("data.augment.flip=false", "data.augment.rotation=0", "data.augment.zoom=0")


def tiny_cfg(data: Path, *extra: str):
    return compose(["backbone=mobilenet_v3_small", f"backbone.weights={V3_SMALL}", "backbone.input_size=32",
                    "data=folder", f"data.path={data}", "data.batch_size=8", "train.phase1.epochs=2",
                    "train.phase2.epochs=2", "train.feature_views=2", "train.early_stopping_patience=100",
                    f"data.cache_dir={data.parent / 'cache'}", *extra])


@pytest.fixture(autouse=True)
def _fresh_process_caches() -> None:
    feature_cache._IN_PROCESS.clear()


def train(cfg, run_dir: Path, data: PreparedData | None = None) -> tuple[keras.Model, object]:
    """One two-phase training as `run_job` does it, in its own MLflow run; the model and its feeds."""
    seed_everything(cfg.seed, False)
    data = data or prepare_data(cfg)
    model = build_classifier(cfg, data.num_classes)
    feeds = data.feeds(cfg, model, run_dir)
    with mlflow.start_run():
        train_two_phases(model, cfg, feeds, run_dir, RunState(run_dir / "state.json"))
    return model, feeds


def all_weights(model: keras.Model) -> dict[str, np.ndarray]:
    return {variable.path: keras.ops.convert_to_numpy(variable) for variable in model.weights}


def test_unaugmented_one_view_training_equals_the_image_path(tmp_path: Path, tiny_images: Path) -> None:
    """Same batches in the same order: the cached path trains the classifier to the same weights, both phases."""
    settings = (*NO_AUGMENTATION, "head.dropout=0", "train.feature_views=1")
    images_model, image_feeds = train(tiny_cfg(tiny_images, *settings, "train.feature_cache=false"), tmp_path / "a")
    cached_model, cached_feeds = train(tiny_cfg(tiny_images, *settings, "train.feature_cache=true"), tmp_path / "b")
    assert isinstance(image_feeds, ImageFeeds) and isinstance(cached_feeds, CachedFeeds)
    image_run, cached_run = RunState(tmp_path / "a" / "state.json"), RunState(tmp_path / "b" / "state.json")
    assert [e["phase"] for e in cached_run.history()] == [1, 1, 2, 2]
    for image_epoch, cached_epoch in zip(image_run.history(), cached_run.history()):
        assert cached_epoch["loss"] == pytest.approx(image_epoch["loss"], abs=1e-4)
        assert cached_epoch["val_loss"] == pytest.approx(image_epoch["val_loss"], abs=1e-4)
    expected, trained = all_weights(images_model), all_weights(cached_model)
    assert trained.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_allclose(trained[path], value, atol=1e-4, err_msg=path)
    moved = [p for p in expected if "expanded_conv_10" in p and "kernel" in p]
    assert moved and not np.allclose(expected[moved[0]], build_weights(tiny_images)[moved[0]])  # phase 2 trained


def build_weights(tiny_images: Path) -> dict[str, np.ndarray]:
    """The weights the classifier starts from."""
    seed_everything(42, False)
    return all_weights(build_classifier(tiny_cfg(tiny_images), 3))


def test_trained_weights_are_the_full_models_and_batchnorm_statistics_never_move(
        tmp_path: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true")
    before = build_weights(tiny_images)
    fitted = []  # the weights each phase's fit left, before the best checkpoint is loaded back
    load_best = trainer._load_best
    monkeypatch.setattr(trainer, "_load_best", lambda model, path: (fitted.append(all_weights(model)),
                                                                     load_best(model, path)))
    model, feeds = train(cfg, tmp_path)
    after = fitted[1]
    backbone, spec = model_backbone(model), BACKBONES["mobilenet_v3_small"]
    unfrozen = set(top_blocks(backbone, spec, cfg.backbone.unfreeze_blocks))
    batchnorm = {v.path for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
                 for v in layer.weights}
    trainable = {v.path for layer in backbone.layers if spec.block_of(layer.name) in unfrozen for v in layer.weights}
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    assert not changed & batchnorm  # gamma, beta and the moving statistics
    head = {v.path for v in model.get_layer("probabilities").weights}
    assert sorted(changed - head) == sorted(trainable - batchnorm), (sorted((changed - head) ^ (trainable - batchnorm)))

    # the head and top trained on the caches are the full model's: it predicts what they predict. The cached
    # boundary is still the frozen bottom's output; the cached pooled features are phase 1's (phase 2 moved the
    # top blocks), so the head is checked on the pooled features the trained top gives now.
    tensors = feeds.tensors()
    val_images = np.stack([x for batch, _ in make_dataset(prepare_data(cfg).splits["val"], 3, 32, 8) for x in batch])
    full = model.predict(val_images, verbose=0)
    boundary, pooled = feeds.cut.extractor.predict(val_images, verbose=0)
    np.testing.assert_allclose(boundary, tensors.val[BOUNDARY], atol=1e-5)
    np.testing.assert_allclose(feeds.cut.top.predict(tensors.val[BOUNDARY], verbose=0), full, atol=1e-5)
    np.testing.assert_allclose(feeds.cut.head.predict(pooled, verbose=0), full, atol=1e-5)


FAMILIES = {
    "mobilenet": {"alpha": 0.25, "depth_multiplier": 1},
    "mobilenet_v2": {"alpha": 0.35},
    "mobilenet_v3_small": {"alpha": 1.0, "minimalistic": False},
    "mobilenet_v3_large": {"alpha": 0.75, "minimalistic": False},
    "efficientnet_b0": {},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_top_on_bottom_is_the_whole_backbone_and_one_tensor_crosses_below_each_block(name: str) -> None:
    from omegaconf import OmegaConf

    spec = BACKBONES[name]
    cfg = OmegaConf.create({"backbone": {"name": name, "input_size": 32, "weights": None, "unfreeze_blocks": 4,
                                         **FAMILIES[name]},
                            "head": {"pooling": "avg", "dropout": 0.0, "hidden_units": [], "class_weight": None}})
    keras.utils.set_random_seed(0)
    model = build_classifier(cfg, num_classes=3)
    backbone = model_backbone(model)
    placed = layer_blocks(backbone, spec)
    for count in range(1, spec.num_blocks + 1):  # the cut sits at the first layer of the lowest unfrozen block
        lowest = top_blocks(backbone, spec, count)[0]
        assert placed[phase2_cut(backbone, spec, count).name] == lowest
    cut = cut_classifier(model, phase2_cut(backbone, spec, 4))
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    boundary, pooled = cut.extractor.predict_on_batch(images)
    full = model.predict_on_batch(images)
    np.testing.assert_allclose(cut.top.predict_on_batch(boundary), full, atol=1e-6)
    np.testing.assert_allclose(cut.head.predict_on_batch(pooled), full, atol=1e-6)


def test_each_image_is_drawn_once_an_epoch_from_one_of_its_views() -> None:
    count, views = 10, 3
    arrays = [np.full((count, 2), 0, "float32") + np.arange(count)[:, None] + 100 * view for view in range(views)]
    labels = np.eye(2, dtype="float32")[np.arange(count) % 2]
    ds = cached_batches(arrays, labels, batch_size=4, shuffle_seed=7)
    drawn_views = set()
    for _ in range(4):
        values = np.concatenate([x for x, _ in ds.as_numpy_iterator()])[:, 0].astype(int)
        assert sorted(values % 100) == list(range(count))
        drawn_views |= set(values // 100)
    assert drawn_views == set(range(views))


def test_shuffled_cache_batches_come_in_the_image_pipelines_order(tiny_images: Path) -> None:
    train = prepare_data(tiny_cfg(tiny_images)).splits["train"]
    keras.utils.set_random_seed(3)
    shuffled = np.concatenate([x for x, _ in make_dataset(train, 3, 32, 8, lambda x, y: (x, y), seed=5)])
    keras.utils.set_random_seed(3)
    one_hot = np.eye(3, dtype="float32")[train.labels]
    positions = np.arange(len(train.labels), dtype="float32")[:, None]
    order = np.concatenate([x for x, _ in cached_batches([positions], one_hot, 8, shuffle_seed=5)])[:, 0].astype(int)
    assert list(order) != sorted(order)
    np.testing.assert_array_equal(shuffled, load_images(train, 32)[order])


def feeds(cfg, data: PreparedData, folder: Path) -> CachedFeeds:
    seed_everything(cfg.seed, False)
    model = build_classifier(cfg, data.num_classes)
    made = data.feeds(cfg, model, folder)
    assert isinstance(made, CachedFeeds)
    return made


def test_the_cache_key_is_everything_upstream_of_the_cached_tensors(tiny_images: Path) -> None:
    cfg = tiny_cfg(tiny_images)
    backbone = model_backbone(build_classifier(cfg, 3))

    def key(*overrides: str, views: int = 2, boundary: str | None = "expanded_conv_7_expand") -> str:
        return cache_key(tiny_cfg(tiny_images, *overrides), backbone, "split0", views, boundary)

    downstream = ("head.dropout=0.5", "head.hidden_units=[8]", "train.phase1.learning_rate=0.1", "train.phase2.epochs=5",
                  "backbone.unfreeze_blocks=2", "memory_budget_gb=1")  # unfreeze_blocks enters as the boundary
    assert all(key(override) == key() for override in downstream)
    upstream = ("data.augment.zoom=0.2", "data.augment.flip=false", "seed=1", "backbone.input_size=48",
                "data.batch_size=4", "head.pooling=max", "backbone.alpha=0.75")
    keys = {key(override) for override in upstream} | {key(views=3), key(boundary="expanded_conv_6_expand"), key()}
    assert len(keys) == len(upstream) + 3
    other_weights = model_backbone(build_classifier(tiny_cfg(tiny_images, "backbone.weights=null"), 3))
    assert cache_key(cfg, other_weights, "split0", 2, "expanded_conv_7_expand") != key()
    assert cache_key(cfg, backbone, "split1", 2, "expanded_conv_7_expand") != key()


def test_a_cache_is_reused_in_process_and_from_its_files(tmp_path: Path, tiny_images: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true")
    data = prepare_data(cfg)
    with mlflow.start_run():
        first = feeds(cfg, data, tmp_path)
        views = first.tensors().train[POOLED]
        assert first.record["feature_cache_reused"] == "no"
        assert len(views) == 2 and not np.allclose(views[0], views[1])  # two different augmentations

        trial = feeds(tiny_cfg(tiny_images, "train.feature_cache=true", "head.dropout=0.5"), data, tmp_path)
        assert trial.key == first.key and trial.tensors() is first.tensors()
        assert trial.record["feature_cache_reused"] == "in process"

        feature_cache._IN_PROCESS.clear()  # a new process, after a kill while view 1 was written
        (first.folder / "train_view1_boundary.npy").unlink()
        again = feeds(cfg, data, tmp_path)
        rewritten = again.tensors()
        assert again.record["feature_cache_reused"] == "1 of 2 views"
        np.testing.assert_array_equal(rewritten.train[POOLED][0], views[0])
        assert not np.allclose(rewritten.train[POOLED][1], views[0])  # view 1 has its own augmentation
        feature_cache._IN_PROCESS.clear()
        feeds(cfg, data, tmp_path).tensors()
        assert "reused: from files" in capsys.readouterr().out
        assert not list(first.folder.glob("*.partial.npy"))
        tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    assert tags["feature_cache_reused"] == "from files" and tags["feature_cache_storage"] == "memory"


def test_the_fill_and_the_cached_epochs_run_without_tf_datas_autotuning(tmp_path: Path, tiny_images: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting an autotuned iterator waits for its tuning thread: seconds after most passes on 2 cores."""
    autotuned, write = [], feature_cache._write_outputs

    def watched(extractor: keras.Model, batches: tf.data.Dataset, *rest: object) -> None:
        autotuned.append(batches.options().autotune.enabled)
        write(extractor, batches, *rest)

    monkeypatch.setattr(feature_cache, "_write_outputs", watched)
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true")
    with mlflow.start_run():
        made = feeds(cfg, prepare_data(cfg), tmp_path)
        phases = [made.phase1(), made.phase2()]
    assert autotuned == [False] * 3  # the validation images and the two views
    assert [ds.options().autotune.enabled for phase in phases for ds in (phase.train, phase.val)] == [False] * 4


def test_over_the_memory_budget_the_cache_is_read_from_disk_and_the_run_says_so(
        tmp_path: Path, tiny_images: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true", "memory_budget_gb=1e-6", "data.cache=memory")  # 1 kB
    model, made = train(cfg, tmp_path)
    assert made.record["feature_cache_storage"] == "disk"
    assert all(isinstance(a, np.memmap) for a in made.tensors().train[BOUNDARY])
    assert "read from disk" in capsys.readouterr().out
    assert [e["phase"] for e in RunState(tmp_path / "state.json").history()] == [1, 1, 2, 2]


@pytest.mark.parametrize("data_cache", ["auto", "memory", "disk", "none"])
def test_the_feature_cache_gets_the_budget_the_decoded_images_leave(tmp_path: Path, tiny_images: Path,
                                                                    data_cache: str) -> None:
    """One memory_budget_gb for every cache: decoded images held in memory come off the feature cache's share,
    and the fill pass keeps its decoded images where the run keeps them."""
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true", "memory_budget_gb=0.5", f"data.cache={data_cache}")
    data = prepare_data(cfg)
    with mlflow.start_run():
        made = data.feeds(cfg, build_classifier(cfg, data.num_classes), tmp_path)
    decoded = len(data.folder.paths) * 32 * 32 * 3 if data_cache in ("auto", "memory") else 0
    assert made.budget_bytes == 0.5e9 - decoded
    assert made.decoded.mode == ("memory" if data_cache == "auto" else data_cache)


def free_space(monkeypatch: pytest.MonkeyPatch, free: float) -> None:
    """The disk of the run folder has `free` bytes free."""
    usage = shutil.disk_usage(".")
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda path: usage._replace(free=int(free)))


@pytest.mark.parametrize("short", [0, 1, "all but 1000"])
def test_cache_files_that_would_not_leave_the_headroom_free_are_not_written(
        tmp_path: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        short: int | str) -> None:
    """Exactly enough room: both caches. A byte short: phase 2 on images. Room for neither: images throughout."""
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true")
    data = prepare_data(cfg)
    with mlflow.start_run():
        needed = feeds(cfg, data, tmp_path / "probe").bytes_to_write()
        free_space(monkeypatch, DISK_HEADROOM_BYTES + (1000 if short == "all but 1000" else needed - short))
        capsys.readouterr()
        made = data.feeds(cfg, build_classifier(cfg, data.num_classes), tmp_path / "run")
        tags = mlflow.get_run(mlflow.active_run().info.run_id).data.tags
    out = capsys.readouterr().out
    if short == 0:
        assert made.cut.boundary is not None and "trains on images" not in out
    elif short == 1:
        assert made.cut.top is None and made.record["feature_cache_boundary"] == "none (disk)"
        assert made.bytes_to_write() < needed
    else:
        assert isinstance(made, ImageFeeds) and tags["feature_cache_storage"] == "off (disk)"
        assert "Feature cache: off, as its files" in out and "less than 1 GB free" in out


def test_without_room_for_phase_2s_activations_phase_2_trains_on_images_and_says_why(
        tmp_path: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true")
    data = prepare_data(cfg)
    with mlflow.start_run():
        needed = feeds(cfg, data, tmp_path / "probe").bytes_to_write()
    free_space(monkeypatch, DISK_HEADROOM_BYTES + needed - 1)
    _, made = train(cfg, tmp_path / "run", data)
    out = capsys.readouterr().out
    assert "phase 2's activations" in out and "phase 2 trains on images" in out
    assert {p.name for p in made.folder.iterdir()} == {"val_pooled.npy", "train_view0_pooled.npy",
                                                       "train_view1_pooled.npy"}
    assert [e["phase"] for e in RunState(tmp_path / "run" / "state.json").history()] == [1, 1, 2, 2]


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSPC], ids=errno.errorcode.get)
def test_a_filesystem_that_cannot_allocate_ahead_gets_its_cache_and_a_full_one_stops_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: int) -> None:
    """posix_fallocate refuses: on a filesystem without it (musl's answers) the cache is written unreserved;
    ENOSPC stops the write before any memory-mapped write can meet the full disk (SIGBUS), and nothing is renamed in."""
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr(feature_cache.os, "posix_fallocate", refuse, raising=False)
    inputs = keras.Input((3,))
    extractor = keras.Model(inputs, [keras.layers.Dense(2)(inputs)])
    images = np.arange(15, dtype="float32").reshape(5, 3)
    batches = tf.data.Dataset.from_tensor_slices((images, np.zeros(5))).batch(2)
    path = tmp_path / "train_view0_pooled.npy"
    if refusal == errno.ENOSPC:
        with pytest.raises(OSError) as raised:
            feature_cache._write_outputs(extractor, batches, 5, {POOLED: path})
        assert raised.value.errno == errno.ENOSPC and not path.exists()
    else:
        feature_cache._write_outputs(extractor, batches, 5, {POOLED: path})
        np.testing.assert_allclose(np.load(path), extractor.predict_on_batch(images), rtol=1e-6)


@pytest.mark.slow  # two CLI runs in process
def test_a_full_disk_stops_the_run_with_the_resume_command_and_the_resume_finishes(
        tmp_path: Path, tiny_images: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The disk fills up between the check and the write of the second view: no traceback, and nothing lost."""
    run_dir = tmp_path / "run"
    argv = quick_overrides(tiny_images, run_dir, "train.feature_cache=true", "train.feature_views=2")
    reserve = feature_cache._reserve

    def full_at_view_1(path: Path) -> None:
        if path.name.startswith("train_view1"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        reserve(path)

    monkeypatch.setattr(feature_cache, "_reserve", full_at_view_1)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in err
    assert "the disk is full" in err and f"hydra.run.dir={run_dir}" in err.splitlines()[-1]

    monkeypatch.setattr(feature_cache, "_reserve", reserve)
    feature_cache._IN_PROCESS.clear()  # a new process
    main(argv)
    assert "reused: 1 of 2 views" in capsys.readouterr().out  # the view written before the disk filled up
    assert (run_dir / "metrics.json").is_file()
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FINISHED"]  # the same MLflow run, re-opened and finished


def test_mixup_trains_on_images_and_says_why(tmp_path: Path, tiny_images: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_cfg(tiny_images, "train.feature_cache=true", "data.augment.mixup=0.2")
    data = prepare_data(cfg)
    with mlflow.start_run():
        made = data.feeds(cfg, build_classifier(cfg, data.num_classes), tmp_path)
    assert isinstance(made, ImageFeeds)
    assert "data.augment.mixup > 0" in capsys.readouterr().out


@pytest.mark.slow  # two trainings per mode; the CLI's kill -9 resume (test_cli_run) is slow too
@pytest.mark.parametrize("cached", ["false", "true"])
def test_a_run_stopped_in_phase_2_resumes_there(tmp_path: Path, tiny_images: Path, cached: str,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_cfg(tiny_images, f"train.feature_cache={cached}", "train.phase2.epochs=3")
    record_epoch = trainer.EpochRecorder.on_epoch_end

    def stop_after_first_phase2_epoch(self, epoch: int, logs: dict | None = None) -> None:
        record_epoch(self, epoch, logs)
        if epoch + 1 == 3:
            monkeypatch.setattr(interrupts, "_pending", True)  # as a Ctrl-C: StopOnSignal stops after this epoch

    monkeypatch.setattr(trainer.EpochRecorder, "on_epoch_end", stop_after_first_phase2_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path)
    state = RunState(tmp_path / "state.json")
    assert "phase1" in state.data and "phase2" not in state.data and len(state.history()) == 3

    monkeypatch.setattr(interrupts, "_pending", False)
    monkeypatch.setattr(trainer.EpochRecorder, "on_epoch_end", record_epoch)
    feature_cache._IN_PROCESS.clear()  # a new process
    capsys.readouterr()
    _, made = train(cfg, tmp_path)
    out = capsys.readouterr().out
    assert "Phase 1:" not in out and "Epoch 3/5" not in out and "Epoch 4/5" in out  # on from the backup
    final = RunState(tmp_path / "state.json")
    assert [e["epoch"] for e in final.history()] == [1, 2, 3, 4, 5] and "phase2" in final.data
    if cached == "true":
        assert made.record["feature_cache_reused"] == "from files"
