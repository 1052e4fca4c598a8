"""Where a backbone's weights come from: ImageNet (Keras cache or download), a local folder, or a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from finetune.backbones import BackboneSpec


def keras_cache_dir() -> Path:
    """Keras's own cache of downloaded weight files ($KERAS_HOME/models, default ~/.keras/models)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve(spec: BackboneSpec, backbone_cfg: Any, weights_dir: str | None) -> str | None:
    """The weights to build with: None, "imagenet" (Keras's cache or download) or a file path.

    `imagenet` becomes the path of Keras's own file in `weights_dir` when it is there; otherwise
    Keras uses its cache or downloads it. A file path is built as Keras's imagenet model (finetune.model).
    """
    weights = backbone_cfg.weights
    if weights is None:
        return None
    if weights != "imagenet":
        return str(Path(weights).expanduser())
    if weights_dir:
        local = Path(weights_dir).expanduser() / spec.weights_file(backbone_cfg)
        if local.is_file():
            return str(local)
    return "imagenet"


def missing_weights_message(spec: BackboneSpec, backbone_cfg: Any, weights_dir: str | None, error: Exception) -> str:
    """One line telling the user which file to put where when ImageNet weights cannot be had."""
    file_name = spec.weights_file(backbone_cfg)
    folder = weights_dir or keras_cache_dir()
    reason = " ".join(str(error).split())[:160]
    return (
        f"ImageNet weights for {spec.name} could not be loaded or downloaded ({reason}); "
        f"put Keras's file {file_name} in {folder} (or pass weights_dir=/folder/with/it, "
        f"or backbone.weights=/path/to/file.h5)"
    )
