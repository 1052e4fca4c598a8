"""The search over backbones: `tuner.backbone=[mobilenet_v3_small,efficientnet_v2_b0]` (null: the configured one).

Each trial picks a backbone, then only the alphas and input sizes that backbone has ImageNet weights for
(any of `tuner.alpha` / `tuner.input_size` with backbone.weights=null). A candidate's settings are its own
conf/backbone/<name>.yaml (the configured backbone keeps its command-line settings), with the configured
`weights` (imagenet or null), so each trial loads its weights as a single run of that backbone would.
Pure Python (no TensorFlow import), so config validation stays fast.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from finetune.backbones import BACKBONES, imagenet_alphas

BACKBONE_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "backbone"
BACKBONE_HP = "backbone"


def search_backbones(cfg: DictConfig) -> list[str]:
    """The backbones the search tries: tuner.backbone, or the configured one."""
    return list(cfg.tuner.backbone or [cfg.backbone.name])


def candidate(cfg: DictConfig, name: str) -> DictConfig:
    """The backbone config a trial of `name` starts from (before alpha and input size are chosen)."""
    if name == cfg.backbone.name:
        return cfg.backbone.copy()
    shipped = OmegaConf.load(BACKBONE_CONF_DIR / f"{name}.yaml")
    own = OmegaConf.create({key: value for key, value in shipped.items() if key != "defaults"})
    own.weights = cfg.backbone.weights
    return own


def search_alphas(cfg: DictConfig, backbone: DictConfig) -> list[float]:
    """The alphas a backbone tries: tuner.alpha (those with ImageNet weights, unless weights=null), or every
    alpha with ImageNet weights for the family; [] for families without alpha."""
    spec = BACKBONES[backbone.name]
    if "alpha" not in spec.extra_kwargs:
        return []
    with_weights = imagenet_alphas(spec, backbone)
    if not cfg.tuner.alpha:
        return list(with_weights)
    return [float(a) for a in cfg.tuner.alpha if backbone.weights != "imagenet" or a in with_weights]


def search_sizes(cfg: DictConfig, backbone: DictConfig) -> list[int]:
    """The input sizes a backbone tries: those of tuner.input_size it takes (with ImageNet weights, unless
    weights=null); [] when tuner.input_size is null (the backbone's own size)."""
    spec = BACKBONES[backbone.name]
    imagenet_only = backbone.weights == "imagenet" and spec.imagenet_sizes is not None
    return [int(size) for size in cfg.tuner.input_size or []
            if size >= spec.min_input_size and (not imagenet_only or size in spec.imagenet_sizes)]


def trial_backbone(cfg: DictConfig, hp: Any) -> DictConfig:
    """A trial's backbone config; declares `backbone` (when several) and each backbone's alpha and input size.

    With several backbones, every backbone's choices are declared in every trial, each in its conditional
    scope, so the oracle samples all of them from the first trial on; hyperparameter names then carry the
    backbone (`alpha.mobilenet_v2`). One backbone keeps the plain names `alpha` and `input_size`.
    """
    names = search_backbones(cfg)
    several = len(names) > 1
    chosen = hp.Choice(BACKBONE_HP, names) if several else names[0]
    choices = {name: _declare_choices(cfg, hp, name, several) for name in names}  # inactive ones hold None
    return OmegaConf.merge(candidate(cfg, chosen), choices[chosen])


def _declare_choices(cfg: DictConfig, hp: Any, name: str, several: bool) -> dict[str, Any]:
    """One backbone's alpha and input size choices (those it has values for), in its conditional scope."""
    backbone = candidate(cfg, name)
    with hp.conditional_scope(BACKBONE_HP, [name]) if several else contextlib.nullcontext():
        return {key: hp.Choice(key + (f".{name}" if several else ""), values) for key, values in
                (("alpha", search_alphas(cfg, backbone)), ("input_size", search_sizes(cfg, backbone))) if values}


def check_candidates(cfg: DictConfig, check_backbone: Callable[[DictConfig], None], error: type[Exception]) -> None:
    """Each backbone to try has something to try, and is valid with each value it will try (`check_backbone`
    raises `error`)."""
    names = search_backbones(cfg)
    if len(names) > 1 and cfg.backbone.weights not in (None, "imagenet"):
        raise error(f"tuner.backbone tries {len(names)} backbones but backbone.weights={cfg.backbone.weights} fits one; "
                    f"use imagenet or null")
    for name in names:
        backbone = candidate(cfg, name)
        if cfg.tuner.alpha and not search_alphas(cfg, backbone) and "alpha" in BACKBONES[name].extra_kwargs:
            raise error(f"tuner.alpha has no value with ImageNet weights for {name} (or backbone.weights=null)")
        if cfg.tuner.input_size and not search_sizes(cfg, backbone):
            raise error(f"tuner.input_size has no size {name} takes with backbone.weights={backbone.weights or 'null'}; "
                        f"{input_sizes(name)}")
        tried = (("alpha", search_alphas(cfg, backbone)), ("input_size", search_sizes(cfg, backbone)),
                 ("unfreeze_blocks", list(cfg.tuner.unfreeze_blocks or [])))
        for variant in [backbone, *(_with(backbone, key, value) for key, values in tried for value in values)]:
            try:
                check_backbone(variant)
            except error as problem:
                raise error(f"tuner.backbone has {name}: {problem}") from None


def _with(backbone: DictConfig, key: str, value: Any) -> DictConfig:
    changed = backbone.copy()
    changed[key] = value
    return changed


def input_sizes(name: str) -> str:
    """The sizes a backbone takes, in words."""
    spec = BACKBONES[name]
    if spec.imagenet_sizes:
        return f"ImageNet weights at {', '.join(map(str, spec.imagenet_sizes))}, any >= {spec.min_input_size} with null"
    return f"any size >= {spec.min_input_size}"
