"""A search times each inference graph once: trials whose exported model is the same graph share its latency.

Trials that differ only in what training uses (dropout, learning rates, unfrozen blocks, the schedule) export
the same graph: dropout is the identity at inference and trainability is not in the file. Converting such a
trial to TFLite and timing it again (20-40 s for MobileNetV2 at 224 px on 2 cores) would measure the same
thing, so the first trial of a graph in this process is timed and later ones take its figures, tagged with
the trial they come from. The key is what `build_classifier` puts into the graph (backbone settings, weights
source, head pooling and hidden layers, classes) and how it is timed (`latency.*`). A resumed search times
each graph once again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from finetune.cost import Latency

TRAINING_ONLY_BACKBONE_KEYS = ("unfreeze_blocks",)  # backbone settings that never reach the exported graph


def graph_key(cfg: DictConfig, num_classes: int) -> str:
    """A digest of everything that decides the exported inference graph and how its latency is measured."""
    backbone = {key: value for key, value in OmegaConf.to_container(cfg.backbone, resolve=True).items()
                if key not in TRAINING_ONLY_BACKBONE_KEYS}
    graph = {
        "backbone": backbone, "weights_dir": cfg.get("weights_dir"),  # a file found there builds as imagenet
        "pooling": cfg.head.pooling, "hidden_units": list(cfg.head.hidden_units), "classes": num_classes,
        "latency": OmegaConf.to_container(cfg.latency, resolve=True),
    }
    return hashlib.sha256(json.dumps(graph, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TimedGraph:
    """A graph's latency figures and the trial that measured them."""

    trial_id: str
    shipped: Latency
    keras_figure: Latency


class TrialLatencies:
    """The latencies a search measured in this process, by inference graph."""

    def __init__(self) -> None:
        self._timed: dict[str, TimedGraph] = {}

    def measure(self, key: str, trial_id: str, timing: Callable[[], tuple[Latency, Latency]]) -> TimedGraph:
        """The graph's figures: measured by `timing` for the graph's first trial, later trials get the same."""
        if key not in self._timed:
            shipped, keras_figure = timing()
            self._timed[key] = TimedGraph(trial_id, shipped, keras_figure)
        return self._timed[key]


def reuse_tag(timed: TimedGraph, trial_id: str) -> dict[str, str]:
    """Trial `trial_id`'s MLflow tag: `latency_reused` = "no", or "from trial <id>" (the same inference graph)."""
    return {"latency_reused": "no" if timed.trial_id == trial_id else f"from trial {timed.trial_id}"}
