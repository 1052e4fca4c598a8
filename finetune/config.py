"""Config composition and validation: every mistake becomes one line saying what is wrong and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.artifacts import FORMATS
from finetune.backbones import BACKBONES, MIN_INPUT_SIZE, imagenet_alphas

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine")
MODES = ("train", "tune")
ALGORITHMS = ("random", "bayesian", "hyperband")


class UsageError(Exception):
    """A problem the user can fix (config, paths, data, missing weights); shown as one line, exit 2."""


def compose(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """Compose conf/config.yaml with command-line overrides, as Hydra would, without writing anything.

    With `hydra_node`, the result also has Hydra's own `hydra` node, and `${hydra:...}` interpolations
    resolve (as they do inside the Hydra app).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=hydra_node)
        if hydra_node:
            HydraConfig.instance().set_config(cfg)
        return cfg
    except MissingConfigException as error:
        first_line = str(error).strip().splitlines()[0]
        options = ", ".join(sorted(error.options or []))
        raise UsageError(f"{first_line}; choose one of: {options}") from None
    except (HydraException, OmegaConfBaseException) as error:
        raise UsageError(" ".join(str(error).split())) from None


def validate(cfg: DictConfig) -> None:
    """Raise UsageError on the first invalid value; touches no files other than checking paths exist."""
    validate_model(cfg)
    _validate_data(cfg.data)
    _validate_train(cfg.train)
    validate_export(cfg.export)
    if not isinstance(cfg.deterministic, bool):
        raise UsageError(f"deterministic={cfg.deterministic} must be true or false")
    if cfg.mode not in MODES:
        raise UsageError(f"mode={cfg.mode} is unknown; choose one of: {', '.join(MODES)}")
    if cfg.mode == "tune":
        _validate_tuner(cfg)
    weights_dir = cfg.get("weights_dir")
    if weights_dir and not Path(weights_dir).is_dir():
        raise UsageError(f"weights_dir={weights_dir} is not a folder; give a folder of Keras weight files")


def validate_model(cfg: DictConfig) -> None:
    """Check the backbone and head settings (all that building the model needs)."""
    _validate_backbone(cfg.backbone)
    _validate_head(cfg.head)


def _validate_backbone(bb: DictConfig) -> None:
    spec = BACKBONES.get(bb.name)
    if spec is None:
        raise UsageError(f"backbone.name={bb.name} is unknown; choose one of: {', '.join(BACKBONES)}")
    size = bb.input_size
    if not _is_whole(size, MIN_INPUT_SIZE):
        raise UsageError(f"backbone.input_size={size} is too small; it must be a whole number >= {MIN_INPUT_SIZE}")
    if "alpha" in bb:
        _check_positive("backbone.alpha", bb.alpha)
    if "depth_multiplier" in bb:
        _check_whole("backbone.depth_multiplier", bb.depth_multiplier, 1)
    if bb.weights == "imagenet":
        _validate_imagenet(spec, bb)
    elif bb.weights is not None and not Path(str(bb.weights)).is_file():
        raise UsageError(f"backbone.weights={bb.weights} is not a file; use imagenet, null, or a path to a Keras weights file")
    blocks = bb.unfreeze_blocks
    if not (_is_whole(blocks, 0) and blocks <= spec.num_blocks):
        raise UsageError(
            f"backbone.unfreeze_blocks={blocks} is out of range; {spec.name} has {spec.num_blocks} blocks (0..{spec.num_blocks})"
        )


def _validate_imagenet(spec: Any, bb: DictConfig) -> None:
    alphas = imagenet_alphas(spec, bb)
    if alphas is not None and float(bb.alpha) not in alphas:
        allowed = ", ".join(str(a) for a in alphas)
        raise UsageError(
            f"backbone.alpha={bb.alpha} has no ImageNet weights for {spec.name}; allowed: {allowed} (or backbone.weights=null)"
        )
    if spec.imagenet_sizes is not None and bb.input_size not in spec.imagenet_sizes:
        allowed = ", ".join(str(s) for s in spec.imagenet_sizes)
        raise UsageError(
            f"backbone.input_size={bb.input_size} has no ImageNet weights for {spec.name}; allowed: {allowed} (or backbone.weights=null)"
        )
    if bb.get("depth_multiplier", 1) != 1:
        raise UsageError(f"backbone.depth_multiplier={bb.depth_multiplier} has no ImageNet weights; allowed: 1 (or backbone.weights=null)")


def _validate_data(data: DictConfig) -> None:
    if OmegaConf.is_missing(data, "path"):
        raise UsageError(f"data={data.name} needs data.path=/path/to/class/folders")
    if data.path is not None and not Path(os.path.expanduser(data.path)).is_dir():
        raise UsageError(f"data.path={data.path} is not a folder; give a folder with one subfolder per class")
    val, test = data.val_fraction, data.test_fraction
    if not (_is_number(val) and _is_number(test) and 0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise UsageError(
            f"data.val_fraction={val} and data.test_fraction={test} must each be in (0, 1) and sum to less than 1"
        )
    _check_whole("data.batch_size", data.batch_size, 1)
    _validate_augment(data.augment)


def _validate_augment(augment: DictConfig) -> None:
    if not isinstance(augment.flip, bool):
        raise UsageError(f"data.augment.flip={augment.flip} must be true or false")
    _check_fraction("data.augment.rotation", augment.rotation)
    _check_fraction("data.augment.zoom", augment.zoom)
    if not _is_number(augment.mixup) or augment.mixup < 0:
        raise UsageError(f"data.augment.mixup={augment.mixup} must be a number >= 0 (0: off)")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _is_whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_fraction(key: str, value: Any) -> None:
    """Knobs such as dropout, momentum and zoom: a number in [0, 1)."""
    if not (_is_number(value) and 0 <= value < 1):
        raise UsageError(f"{key}={value} must be a number in [0, 1)")


def _check_whole(key: str, value: Any, minimum: int) -> None:
    """Counts such as epochs and batch size: a whole number (not true/false) >= minimum."""
    if not _is_whole(value, minimum):
        raise UsageError(f"{key}={value} must be a whole number >= {minimum}")


def _check_positive(key: str, value: Any, optional: bool = False) -> None:
    """Rates and limits such as learning rates: a number > 0 (or null when optional)."""
    if not ((optional and value is None) or _is_positive(value)):
        raise UsageError(f"{key}={value} must be {'null or ' if optional else ''}a number > 0")


def _validate_head(head: DictConfig) -> None:
    if head.pooling not in ("avg", "max"):
        raise UsageError(f"head.pooling={head.pooling} is unknown; choose avg or max")
    _check_fraction("head.dropout", head.dropout)
    if not all(_is_whole(u, 1) for u in head.hidden_units):
        raise UsageError(f"head.hidden_units={list(head.hidden_units)} must be a list of whole numbers >= 1")
    if head.class_weight not in (None, "auto"):
        raise UsageError(f"head.class_weight={head.class_weight} is unknown; choose null or auto")


def _validate_train(train: DictConfig) -> None:
    for phase, minimum in (("phase1", 1), ("phase2", 0)):
        _check_whole(f"train.{phase}.epochs", train[phase].epochs, minimum)
        _check_positive(f"train.{phase}.learning_rate", train[phase].learning_rate)
        _check_fraction(f"train.{phase}.warmup_fraction", train[phase].warmup_fraction)
        if train[phase].schedule not in SCHEDULES:
            raise UsageError(f"train.{phase}.schedule={train[phase].schedule} is unknown; choose one of: {', '.join(SCHEDULES)}")
    if train.phase1.optimizer not in OPTIMIZERS:
        raise UsageError(f"train.phase1.optimizer={train.phase1.optimizer} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
    _check_fraction("train.phase2.momentum", train.phase2.momentum)
    _check_positive("train.phase2.clipvalue", train.phase2.clipvalue, optional=True)
    _check_whole("train.early_stopping_patience", train.early_stopping_patience, 1)
    _check_fraction("train.label_smoothing", train.label_smoothing)


def validate_export(export: DictConfig) -> None:
    """Check the export formats and calibration size."""
    unknown = [fmt for fmt in export.formats if fmt not in FORMATS]
    if unknown:
        raise UsageError(f"export.formats has unknown {', '.join(unknown)}; choose from: {', '.join(FORMATS)}")
    _check_whole("export.representative_images", export.representative_images, 1)


def _validate_tuner(cfg: DictConfig) -> None:
    search, spec = cfg.tuner, BACKBONES[cfg.backbone.name]
    if search.algorithm not in ALGORITHMS:
        raise UsageError(f"tuner.algorithm={search.algorithm} is unknown; choose one of: {', '.join(ALGORITHMS)}")
    for key in ("max_trials", "max_epochs", "phase1_epochs"):
        _check_whole(f"tuner.{key}", search[key], 1)
    _check_whole("tuner.phase2_epochs", search.phase2_epochs, 0)
    _check_positive("tuner.max_latency_ms", search.max_latency_ms, optional=True)
    _check_fraction("tuner.dropout.min", search.dropout.min)
    _check_fraction("tuner.dropout.max", search.dropout.max)
    _check_positive("tuner.dropout.step", search.dropout.step, optional=True)  # null: continuous
    if search.dropout.min > search.dropout.max:
        raise UsageError(f"tuner.dropout min={search.dropout.min} max={search.dropout.max} must satisfy min <= max")
    for key in ("alpha", "learning_rate", "input_size", "unfreeze_blocks"):
        if search[key] is not None and not OmegaConf.is_list(search[key]):
            raise UsageError(f"tuner.{key}={search[key]} must be null or a list of values to try, e.g. [{search[key]}]")
    if not all(_is_positive(rate) for rate in search.learning_rate or []):
        raise UsageError(f"tuner.learning_rate={list(search.learning_rate)} must be a list of numbers > 0")
    if search.alpha and imagenet_alphas(spec, cfg.backbone) is None:
        raise UsageError(f"tuner.alpha is set but {spec.name} has no alpha; leave it null")
    for key in ("alpha", "input_size", "unfreeze_blocks"):  # each value to try must make a valid backbone
        for value in search[key] or []:
            candidate = cfg.backbone.copy()
            candidate[key] = value
            try:
                _validate_backbone(candidate)
            except UsageError as error:
                raise UsageError(f"tuner.{key} has {value}: {error}") from None


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as flat `a.b.c` params (lists as strings)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
