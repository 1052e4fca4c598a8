"""The config schema: one typed dataclass per config node, with each leaf's allowed values as data.

Hydra's ConfigStore holds these classes under the group `schema`: conf/config.yaml and each
conf/backbone/*.yaml and conf/data/*.yaml name theirs in their defaults list, so OmegaConf checks
types while the config is composed. Types say what a leaf is (a whole number, a number, true/false,
text, a list of them, or null); the `Rule` in each field's metadata says which values of that type
are allowed, and `finetune.config` checks every leaf against it. The values themselves live in the
YAML files, so fields have no defaults here.

Pure Python (no TensorFlow import), so config validation stays fast.
"""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from finetune.artifacts import FORMATS, TFLITE_FORMATS
from finetune.backbones import BACKBONES, MIN_INPUT_SIZE

RULE = "rule"  # dataclass field metadata key of a leaf's Rule
SCHEMA_GROUP = "schema"
SEED_MAX = 2**32 - 1  # NumPy's and scikit-learn's seeds are unsigned 32-bit
_NOUNS = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), str: ("text", "texts")}


@dataclass(frozen=True)
class Rule:
    """Which values of its type a leaf allows: a range, a set of choices, non-empty text, or anything (free)."""

    low: float | None = None  # range bounds; `bounds` says whether each end is included
    high: float | None = None
    bounds: str = "[]"  # "[]", "[)", "(]" or "()"
    choices: tuple[str, ...] = ()
    non_empty: bool = False
    free: str = ""  # free-form text (paths, URIs); says what it holds. Paths are checked in finetune.config

    def admits(self, value: Any) -> bool:
        """Whether a value (already of the leaf's type, not null) is allowed."""
        if self.choices:
            return value in self.choices
        if self.non_empty:
            return bool(str(value).strip())
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value) and self._in_range(value)
        return True

    def _in_range(self, value: float) -> bool:
        above_low = self.low is None or (value >= self.low if self.bounds[0] == "[" else value > self.low)
        below_high = self.high is None or (value <= self.high if self.bounds[1] == "]" else value < self.high)
        return above_low and below_high

    def describe(self, hint: Any) -> str:
        """What the leaf allows, for error messages: "a whole number >= 1", "null or a list of numbers > 0"."""
        item, nullable, is_list = unwrap(hint)
        text = f"a list of {self._describe_item(item, plural=True)}" if is_list else self._describe_item(item, plural=False)
        return f"null or {text}" if nullable else text

    def _describe_item(self, item: Any, plural: bool) -> str:
        if self.free:
            return self.free
        if self.choices:
            return f"values among {', '.join(self.choices)}" if plural else _either(self.choices)
        if item is bool:
            return "true/false values" if plural else "true or false"
        if dataclasses.is_dataclass(item):
            return f"settings {', '.join(f.name for f in dataclasses.fields(item))}"
        if self.non_empty:
            return "non-empty names" if plural else "a non-empty name"
        return _NOUNS.get(item, ("a value", "values"))[plural] + self._describe_range()

    def _describe_range(self) -> str:
        if self.low is not None and self.high is not None:
            return f" in {self.bounds[0]}{self.low}, {self.high}{self.bounds[1]}"
        if self.low is not None:
            return f" {'>=' if self.bounds[0] == '[' else '>'} {self.low}"
        if self.high is not None:
            return f" {'<=' if self.bounds[1] == ']' else '<'} {self.high}"
        return ""


def _either(choices: tuple[str, ...]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def unwrap(hint: Any) -> tuple[Any, bool, bool]:
    """(item type, null allowed, is a list) of a field's type: Optional[List[int]] -> (int, True, True)."""
    nullable = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if nullable:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], nullable, True
    return hint, nullable, False


def leaf(rule: Rule) -> Any:
    """A schema field: no default (the YAML gives the value), its Rule in the metadata."""
    return field(default=MISSING, metadata={RULE: rule})


def at_least(low: float) -> Rule:
    return Rule(low=low)


FLAG = Rule()  # true/false: the type is the whole rule
POSITIVE = Rule(low=0, bounds="(]")
FRACTION = Rule(low=0, high=1, bounds="[)")  # dropout, momentum, zoom ...
SEED = Rule(low=0, high=SEED_MAX)
NAME = Rule(non_empty=True)


def _family(*knobs: str) -> Rule:
    """The backbone names whose constructor takes exactly these config keys (BackboneSpec.extra_kwargs)."""
    return Rule(choices=tuple(name for name, spec in BACKBONES.items() if spec.extra_kwargs == knobs))


@dataclass
class Backbone:
    """Keys every family has; each family's class adds its own knobs and narrows `name`."""

    name: str = leaf(Rule(choices=tuple(BACKBONES)))
    input_size: int = leaf(at_least(MIN_INPUT_SIZE))
    weights: Optional[str] = leaf(Rule(free="imagenet, null or a path to a Keras weights file"))
    unfreeze_blocks: int = leaf(at_least(0))


@dataclass
class MobileNetBackbone(Backbone):
    name: str = leaf(_family("alpha", "depth_multiplier"))
    alpha: float = leaf(POSITIVE)
    depth_multiplier: int = leaf(at_least(1))


@dataclass
class MobileNetV2Backbone(Backbone):
    name: str = leaf(_family("alpha"))
    alpha: float = leaf(POSITIVE)


@dataclass
class MobileNetV3Backbone(Backbone):
    name: str = leaf(_family("alpha", "minimalistic"))
    alpha: float = leaf(POSITIVE)
    minimalistic: bool = leaf(FLAG)


@dataclass
class PlainBackbone(Backbone):
    """Families whose constructor takes no knob of ours: EfficientNet (V2), ResNet (V2), VGG, Xception,
    Inception, DenseNet, NASNet, ConvNeXt."""

    name: str = leaf(_family())


@dataclass
class Augment:
    flip: bool = leaf(FLAG)
    rotation: float = leaf(FRACTION)
    zoom: float = leaf(FRACTION)
    mixup: float = leaf(at_least(0))


@dataclass
class Data:
    """Keys every data source has; each source's class adds where its images are."""

    name: str = leaf(NAME)
    val_fraction: float = leaf(Rule(low=0, high=1, bounds="()"))
    test_fraction: float = leaf(Rule(low=0, high=1, bounds="()"))
    split_seed: int = leaf(SEED)
    batch_size: int = leaf(at_least(1))
    cache: str = leaf(Rule(choices=("auto", "memory", "disk", "none")))  # decoded images: finetune/image_cache.py
    cache_dir: str = leaf(Rule(free="a folder for scan results and decoded images (never the image folder)"))
    cache_disk_gb: float = leaf(POSITIVE)  # the decoded-image snapshots in cache_dir, pruned to it: image_cache.prune_snapshots
    augment: Augment = field(default_factory=Augment)


@dataclass
class FolderData(Data):
    path: str = leaf(Rule(free="a folder with one subfolder per class"))


@dataclass
class FlowersData(FolderData):
    path: Optional[str] = leaf(Rule(free="a local copy of the flower_photos folder"))
    tfds_dir: str = leaf(Rule(free="a folder for TensorFlow Datasets' files"))
    cache_dir: str = leaf(Rule(free="a folder for the unpacked images, scan results and decoded images"))


@dataclass
class TfdsData(Data):
    dataset: str = leaf(Rule(free="the name of a TensorFlow Datasets image classification dataset, e.g. beans"))
    tfds_dir: str = leaf(Rule(free="TensorFlow Datasets' data folder (an already prepared one, offline)"))


@dataclass
class Head:
    pooling: str = leaf(Rule(choices=("avg", "max")))
    dropout: float = leaf(FRACTION)
    hidden_units: List[int] = leaf(at_least(1))
    class_weight: Optional[str] = leaf(Rule(choices=("auto",)))


@dataclass
class Phase:
    """What both training phases have."""

    epochs: int = leaf(at_least(0))
    learning_rate: float = leaf(POSITIVE)
    schedule: str = leaf(Rule(choices=("constant", "cosine")))
    warmup_fraction: float = leaf(FRACTION)


@dataclass
class Phase1(Phase):
    epochs: int = leaf(at_least(1))
    optimizer: str = leaf(Rule(choices=("adam", "adamw", "sgd", "rmsprop")))


@dataclass
class Phase2(Phase):
    momentum: float = leaf(FRACTION)
    clipvalue: Optional[float] = leaf(POSITIVE)


@dataclass
class Train:
    label_smoothing: float = leaf(FRACTION)
    early_stopping_patience: int = leaf(at_least(1))
    feature_cache: bool = leaf(FLAG)
    feature_views: int = leaf(at_least(1))
    phase1: Phase1 = field(default_factory=Phase1)
    phase2: Phase2 = field(default_factory=Phase2)


@dataclass
class Tolerance:
    float32: float = leaf(POSITIVE)
    float16: float = leaf(POSITIVE)


@dataclass
class Int8:
    max_drop: float = leaf(Rule(low=0, high=1))
    max_slowdown: Optional[float] = leaf(at_least(1))  # null: no latency budget
    integer_only: bool = leaf(FLAG)


@dataclass
class Export:
    formats: List[str] = leaf(Rule(choices=FORMATS))
    representative_images: int = leaf(at_least(1))
    int8: Int8 = field(default_factory=Int8)
    tolerance: Tolerance = field(default_factory=Tolerance)
    register_model: Optional[str] = leaf(NAME)


@dataclass
class DropoutRange:
    min: float = leaf(FRACTION)
    max: float = leaf(FRACTION)
    step: Optional[float] = leaf(POSITIVE)  # null: continuous


@dataclass
class Tuner:
    algorithm: str = leaf(Rule(choices=("random", "bayesian", "hyperband")))
    max_trials: int = leaf(at_least(1))
    max_epochs: int = leaf(at_least(1))
    max_latency_ms: Optional[float] = leaf(POSITIVE)
    backbone: Optional[List[str]] = leaf(Rule(choices=tuple(BACKBONES)))
    alpha: Optional[List[float]] = leaf(POSITIVE)
    dropout: DropoutRange = field(default_factory=DropoutRange)
    learning_rate: Optional[List[float]] = leaf(POSITIVE)
    unfreeze_blocks: Optional[List[int]] = leaf(at_least(0))
    input_size: Optional[List[int]] = leaf(at_least(MIN_INPUT_SIZE))
    phase1_epochs: int = leaf(at_least(1))
    phase2_epochs: int = leaf(at_least(0))


@dataclass
class Mlflow:
    tracking_uri: str = leaf(Rule(free="an MLflow tracking URI"))
    artifact_location: str = leaf(Rule(free="a folder or URI for new experiments' artifacts"))
    experiment: str = leaf(NAME)
    run_name: Optional[str] = leaf(NAME)


@dataclass
class Latency:
    format: str = leaf(Rule(choices=TFLITE_FORMATS))  # the artifact whose latency is the run's headline
    threads: int = leaf(at_least(1))  # LiteRT threads of every TFLite timing
    keras_threads: Optional[int] = leaf(at_least(1))  # TensorFlow's threads for the Keras figure (null: its default)
    warmup: int = leaf(at_least(0))
    runs: int = leaf(at_least(1))


@dataclass
class Evaluate:
    top_k: int = leaf(at_least(1))


@dataclass
class Config:
    """The whole config. `backbone` and `data` take their class from the chosen option's own defaults list."""

    backbone: Any = MISSING
    data: Any = MISSING
    head: Head = field(default_factory=Head)
    train: Train = field(default_factory=Train)
    export: Export = field(default_factory=Export)
    tuner: Tuner = field(default_factory=Tuner)
    mode: str = leaf(Rule(choices=("train", "tune")))
    distribute: str = leaf(Rule(choices=("none", "auto", "mirrored", "multi_worker")))  # finetune.distribute
    seed: int = leaf(SEED)
    deterministic: bool = leaf(FLAG)
    weights_dir: Optional[str] = leaf(Rule(free="a folder of Keras weight files"))
    memory_budget_gb: float = leaf(POSITIVE)  # every in-memory cache of a run (decoded images, features) together
    mlflow: Mlflow = field(default_factory=Mlflow)
    latency: Latency = field(default_factory=Latency)
    evaluate: Evaluate = field(default_factory=Evaluate)


def register() -> None:
    """Store the schemas where the YAML defaults lists find them (/schema/config, /schema/backbone/<family> ...)."""
    store = ConfigStore.instance()
    store.store(group=SCHEMA_GROUP, name="config", node=Config)
    for name, node in (("mobilenet", MobileNetBackbone), ("mobilenet_v2", MobileNetV2Backbone),
                       ("mobilenet_v3", MobileNetV3Backbone), ("plain", PlainBackbone)):
        store.store(group=f"{SCHEMA_GROUP}/backbone", name=name, node=node)
    store.store(group=f"{SCHEMA_GROUP}/data", name="folder", node=FolderData)
    store.store(group=f"{SCHEMA_GROUP}/data", name="flowers", node=FlowersData)
    store.store(group=f"{SCHEMA_GROUP}/data", name="tfds", node=TfdsData)


def field_rule(schema: type, key: str) -> tuple[Any, Rule] | None:
    """(type hint, Rule) of a schema field, or None when the class has no such field."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if key not in fields:
        return None
    return typing.get_type_hints(schema)[key], fields[key].metadata.get(RULE, Rule())
