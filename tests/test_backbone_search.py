"""`tuner.backbone=[...]`: each trial picks a backbone, then only the alphas and sizes that backbone has weights for."""

from __future__ import annotations

from pathlib import Path

import keras_tuner as kt
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli, quick_overrides
from finetune.backbone_search import trial_backbone
from finetune.backbones import BACKBONES
from finetune.config import UsageError, compose, validate


def tune_cfg(*overrides: str):
    cfg = compose(["mode=tune", "data=folder", f"data.path={Path.cwd()}", *overrides])
    validate(cfg)
    return cfg


def sampled_backbones(cfg, trials: int = 12) -> list:
    """The backbone configs of `trials` trials of Keras-Tuner's random search over the config's space."""
    oracle = kt.oracles.RandomSearchOracle(kt.Objective("val_accuracy", "max"), max_trials=trials, seed=1)
    oracle._set_project_dir(str(Path.cwd()), "search")
    hp = kt.HyperParameters()
    trial_backbone(cfg, hp)  # declares the space, as the tuner's first build does
    oracle.hyperparameters = hp
    picked = []
    for index in range(trials):
        trial = oracle.create_trial(str(index))
        if trial.status != "RUNNING":  # the oracle found no new combination: the space is exhausted
            break
        picked.append(trial_backbone(cfg, trial.hyperparameters))
        oracle.end_trial(trial)  # no metrics: nothing is trained here
    return picked


def test_each_trial_tries_only_what_its_backbone_has_imagenet_weights_for() -> None:
    cfg = tune_cfg("tuner.backbone=[mobilenet_v3_small,mobilenet_v2,efficientnet_v2_b0]", "tuner.input_size=[96,224]",
                   "tuner.alpha=[0.35,0.75,1.0]")
    picked = sampled_backbones(cfg)
    assert {backbone.name for backbone in picked} == {"mobilenet_v3_small", "mobilenet_v2", "efficientnet_v2_b0"}
    for backbone in picked:
        assert backbone.weights == "imagenet" and backbone.input_size in (96, 224)
        if "alpha" in backbone:
            assert backbone.alpha in BACKBONES[backbone.name].imagenet_alphas  # 0.35 only for mobilenet_v2
    assert any(b.name == "mobilenet_v2" and b.alpha == 0.35 for b in picked)
    assert all(b.alpha != 0.35 for b in picked if b.name == "mobilenet_v3_small")
    assert "alpha" not in next(b for b in picked if b.name == "efficientnet_v2_b0")


def test_the_configured_backbone_keeps_its_settings_and_the_others_their_own() -> None:
    cfg = tune_cfg("backbone=mobilenet_v3_small", "backbone.input_size=96", "backbone.unfreeze_blocks=2",
                   "tuner.backbone=[mobilenet_v3_small,resnet50]")
    by_name = {backbone.name: backbone for backbone in sampled_backbones(cfg, trials=8)}
    assert (by_name["mobilenet_v3_small"].input_size, by_name["mobilenet_v3_small"].unfreeze_blocks) == (96, 2)
    assert (by_name["resnet50"].input_size, by_name["resnet50"].unfreeze_blocks) == (224, 3)  # conf/backbone/resnet50


def test_weights_null_tries_any_size_the_family_takes() -> None:
    cfg = tune_cfg("backbone.weights=null", "tuner.backbone=[nasnet_mobile,mobilenet_v3_small]", "tuner.input_size=[64,96]")
    nasnets = [backbone for backbone in sampled_backbones(cfg) if backbone.name == "nasnet_mobile"]
    assert nasnets and all(b.weights is None and b.input_size in (64, 96) for b in nasnets)


@pytest.mark.parametrize(("overrides", "message"), [
    (["tuner.backbone=[mobilenet_v3_small,nasnet_mobile]", "tuner.input_size=[96,160]"],
     "tuner.input_size has no size nasnet_mobile takes with backbone.weights=imagenet; ImageNet weights at 224"),
    (["backbone.weights=null", "tuner.backbone=[inception_v3]", "tuner.input_size=[64]"],
     "tuner.input_size has no size inception_v3 takes with backbone.weights=null; any size >= 75"),
    (["tuner.backbone=[mobilenet_v3_small,vgg16]", "tuner.unfreeze_blocks=[2,6]"],
     "tuner.backbone has vgg16: backbone.unfreeze_blocks=6 is out of range; vgg16 has 5 blocks (0..5)"),
    (["tuner.backbone=[mobilenet_v2,mobilenet_v3_small]", "tuner.alpha=[0.35]"],
     "tuner.alpha has no value with ImageNet weights for mobilenet_v3_small"),
    (["tuner.backbone=[resnet50,convnext]"], "tuner.backbone[1]=convnext must be mobilenet, "),
])
def test_a_search_that_cannot_run_is_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(UsageError) as refused:
        tune_cfg(*overrides)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


@pytest.mark.slow
def test_a_search_over_backbones_records_each_trials_backbone(tmp_path: Path, tiny_images: Path) -> None:
    run_dir = tmp_path / "search"
    result = cli(*quick_overrides(tiny_images, run_dir, "mode=tune", "tuner.backbone=[mobilenet_v3_small,efficientnet_v2_b0]",
                                  "tuner.input_size=[32]",  # else EfficientNetV2B0 trains at its own 224 px
                                  "tuner.max_trials=2", "tuner.phase1_epochs=1", "tuner.phase2_epochs=0",
                                  "train.phase1.epochs=1", "train.phase2.epochs=0"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'experiments' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("finetune")
    trials = [run for run in client.search_runs([experiment.experiment_id]) if run.data.tags.get("kind") == "trial"]
    assert len(trials) == 2
    assert {run.data.params["backbone.name"] for run in trials} == {"mobilenet_v3_small", "efficientnet_v2_b0"}
    for run in trials:
        assert run.data.params["backbone.name"] == run.data.params["hp.backbone"]
        assert run.info.run_name.startswith(run.data.params["backbone.name"])  # the report's row names
