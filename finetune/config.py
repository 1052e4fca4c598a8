"""Config composition and validation: every mistake becomes one line saying what is wrong and what is allowed.

Types and allowed values come from finetune.schema: OmegaConf checks the types while Hydra composes, and
`check_rules` checks every key against its schema field. The few checks that span keys (ImageNet weights
per family, block counts, split fractions, tuner values, paths that must exist) follow as functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from finetune import schema
from finetune.backbone_search import check_candidates
from finetune.backbones import BACKBONES, BackboneSpec, imagenet_alphas

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
schema.register()  # before anything composes: conf/*.yaml name their schemas in their defaults lists


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
        raise UsageError(one_line(error)) from None


def one_line(error: Exception, prefix: str = "") -> str:
    """An error of composing or merging as one line: a bad type or an unknown key in the schema's words.

    prefix: the path of the node that was merged (e.g. "export."), when OmegaConf's key starts below it.
    """
    cause = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__  # Hydra re-raises some without `from`
    message = None
    if isinstance(cause, ValidationError):
        message = _type_error(cause, prefix)
    elif isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and _is_schema(cause.object_type):
        message = _unknown_key(prefix + cause.full_key, cause.object_type)
    return message or " ".join(str(error).split())


def _type_error(error: ValidationError, prefix: str) -> str | None:
    """"seed=abc must be a whole number ..." for a value OmegaConf could not convert to its field's type."""
    found = _list_item_rule(error) if isinstance(error.key, int) else _rule_of(error.object_type, error.key)
    if found is None:
        return None
    hint, rule = found
    value = error.value
    example = f", e.g. [{_show(value)}]" if schema.unwrap(hint)[2] and not isinstance(value, (list, tuple)) else ""
    return f"{prefix}{error.full_key}={_show(value)} must be {rule.describe(hint)}{example}"


def _list_item_rule(error: ValidationError) -> tuple[Any, schema.Rule] | None:
    """(item type, Rule) for a bad list item: the Rule is the list field's, in the schema of the list's parent."""
    list_node = error.parent_node
    container = list_node._get_parent() if list_node is not None else None
    found = _rule_of(OmegaConf.get_type(container), list_node._key()) if container is not None else None
    return (schema.unwrap(found[0])[0], found[1]) if found else None


def _rule_of(node_schema: Any, key: Any) -> tuple[Any, schema.Rule] | None:
    return schema.field_rule(node_schema, key) if _is_schema(node_schema) else None


def _is_schema(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _unknown_key(key: str, node_schema: type) -> str:
    parent = key.rpartition(".")[0] or "the config"
    names = ", ".join(node_schema.__dataclass_fields__)
    return f"{key} is not a known key; {parent} has: {names}"


def _show(value: Any) -> str:
    """A value as it is written in a config: null, true, [1, 2], ''."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, ListConfig)):
        return f"[{', '.join(_show(item) for item in value)}]"
    return str(value) if str(value).strip() else repr(value)


def check_rules(node: DictConfig, prefix: str = "") -> None:
    """Check every key of a typed config node: known to its schema, set, and allowed by its field's Rule."""
    node_schema = OmegaConf.get_type(node)
    for key in node:
        name = f"{prefix}{key}"
        found = schema.field_rule(node_schema, key)
        if found is None:  # `+key=value` adds keys past the schema
            raise UsageError(_unknown_key(name, node_schema))
        hint, rule = found
        if OmegaConf.is_missing(node, key):
            raise UsageError(f"{name} must be set to {rule.describe(hint)}")
        if rule.free:
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            check_rules(value, f"{name}.")
        else:
            _check_value(name, value, hint, rule)


def _check_value(key: str, value: Any, hint: Any, rule: schema.Rule) -> None:
    """One leaf (each item of a list leaf) against its Rule; null passed OmegaConf's type check already."""
    if value is None:
        return
    if isinstance(value, ListConfig):
        item_hint = schema.unwrap(hint)[0]
        for index, item in enumerate(value):
            if not rule.admits(item):
                raise UsageError(f"{key}[{index}]={_show(item)} must be {rule.describe(item_hint)}")
    elif not rule.admits(value):
        raise UsageError(f"{key}={_show(value)} must be {rule.describe(hint)}")


def validate(cfg: DictConfig) -> None:
    """Raise UsageError on the first invalid value; touches no files other than checking paths exist."""
    check_rules(cfg)
    _check_backbone(cfg.backbone)
    _check_data(cfg.data)
    if cfg.mode == "tune":
        _check_tuner(cfg)
    _check_distribution(cfg)
    if cfg.weights_dir and not Path(cfg.weights_dir).expanduser().is_dir():
        raise UsageError(f"weights_dir={cfg.weights_dir} is not a folder; give a folder of Keras weight files")


def validate_model(cfg: DictConfig) -> None:
    """Check the backbone and head settings (all that building the model needs)."""
    check_rules(cfg.backbone, "backbone.")
    check_rules(cfg.head, "head.")
    _check_backbone(cfg.backbone)


def validate_export(export: DictConfig) -> None:
    """Check the export settings; also those of a saved run's config.yaml (a plain, untyped config)."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema.Export), export)
    except OmegaConfBaseException as error:
        raise UsageError(one_line(error, "export.")) from None
    check_rules(typed, "export.")


def _check_backbone(bb: DictConfig) -> None:
    """What the schema cannot say: the family's smallest input, ImageNet weights per family, the weights file,
    the family's block count."""
    spec = BACKBONES[bb.name]
    if bb.input_size < spec.min_input_size:
        raise UsageError(f"backbone.input_size={bb.input_size} is too small for {spec.name}; allowed: {spec.min_input_size} or more")
    if bb.weights == "imagenet":
        _check_imagenet(spec, bb)
    elif bb.weights is not None and not Path(bb.weights).expanduser().is_file():
        raise UsageError(f"backbone.weights={bb.weights} is not a file; use imagenet, null, or a path to a Keras weights file")
    if bb.unfreeze_blocks > spec.num_blocks:
        raise UsageError(
            f"backbone.unfreeze_blocks={bb.unfreeze_blocks} is out of range; "
            f"{spec.name} has {spec.num_blocks} blocks (0..{spec.num_blocks})"
        )


def _check_imagenet(spec: BackboneSpec, bb: DictConfig) -> None:
    alphas = imagenet_alphas(spec, bb)
    if alphas is not None and bb.alpha not in alphas:
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


def _check_data(data: DictConfig) -> None:
    if data.get("path") is not None and not Path(data.path).expanduser().is_dir():
        raise UsageError(f"data.path={data.path} is not a folder; give a folder with one subfolder per class")
    if data.val_fraction + data.test_fraction >= 1:
        raise UsageError(
            f"data.val_fraction={data.val_fraction} and data.test_fraction={data.test_fraction} must sum to less than 1"
        )


def _check_tuner(cfg: DictConfig) -> None:
    """The search space against the backbone: dropout bounds in order, and every value to try buildable."""
    search, spec = cfg.tuner, BACKBONES[cfg.backbone.name]
    if search.dropout.min > search.dropout.max:
        raise UsageError(f"tuner.dropout min={search.dropout.min} max={search.dropout.max} must satisfy min <= max")
    if search.backbone:  # a search over backbones: each candidate with the values it will try
        check_candidates(cfg, _check_backbone, UsageError)
        return
    if search.alpha and "alpha" not in spec.extra_kwargs:
        raise UsageError(f"tuner.alpha is set but {spec.name} has no alpha; leave it null")
    for key in ("alpha", "input_size", "unfreeze_blocks"):  # each value to try must make a valid backbone
        for value in search[key] or []:
            candidate = cfg.backbone.copy()
            candidate[key] = value
            try:
                _check_backbone(candidate)
            except UsageError as error:
                raise UsageError(f"tuner.{key} has {value}: {error}") from None


def _check_distribution(cfg: DictConfig) -> None:
    """distribute= against TF_CONFIG and the mode; a search's KERASTUNER_* environment."""
    from finetune import distribute, search_cluster  # they raise this module's UsageError

    distribute.check(cfg.distribute, tune=cfg.mode == "tune")
    if cfg.mode == "tune":
        search_cluster.check_environment()


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
