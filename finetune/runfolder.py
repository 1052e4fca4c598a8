"""The run folder and its manifest: what a run is, which of its stages are done, and its MLflow run.

A folder is only ever used for one run. `check` refuses, before anything is written, a folder that holds
files of something else, or a run whose identity (the settings that determine the trained weights) differs
from the command's. `Manifest` records the identity, the split fingerprint, the MLflow run and, per stage,
a key of the settings the stage's result depends on, so a rerun starts at the first stage whose key is
missing or changed. Pure Python (no TensorFlow import): the CLI checks folders before Hydra starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from finetune.backbones import BACKBONES
from finetune.config import UsageError, flatten
from finetune.weights import resolve as resolve_weights

MANIFEST_FILE = "manifest.json"
FORMAT = 1
HYDRA_ENTRIES = (".hydra",)  # Hydra's own record of the job, rewritten on every start (plus its *.log)
IDENTITY_SECTIONS = ("mode", "seed", "deterministic", "backbone", "head", "train", "data")
# where downloads and caches go, and how much disk the caches take: not what is trained on
DOWNLOAD_KEYS = ("data.tfds_dir", "data.cache_dir", "data.cache_disk_gb")

# Stages after training, in order, with the config sections their results depend on and the stages they use.
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train": ((), ()),
    "evaluate": (("evaluate",), ("train",)),
    "time": (("latency",), ("train",)),
    "record": (("mlflow",), ("evaluate", "time")),
    "log_model": (("mlflow", "export.register_model"), ("train",)),
    "export": (("export", "latency", "evaluate", "mlflow"), ("train",)),
}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader (or a kill -9) sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(cfg: DictConfig) -> str:
    """What the backbone starts from: none, Keras's ImageNet file by name, or a file by its content."""
    spec = BACKBONES[cfg.backbone.name]
    source = resolve_weights(spec, cfg.backbone, cfg.get("weights_dir"))
    if source is None:
        return "random"
    if source == "imagenet":
        return f"imagenet ({spec.weights_file(cfg.backbone)} from Keras's cache)"
    return f"file sha256 {_file_sha256(Path(source))}"


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The flattened settings that determine the trained weights (and, for a search, the search space)."""
    sections = IDENTITY_SECTIONS + (("tuner",) if cfg.mode == "tune" else ())
    flat = {key: value for key, value in flatten(cfg).items()
            if key.split(".")[0] in sections and key not in DOWNLOAD_KEYS}
    if flat.get("data.path"):
        flat["data.path"] = str(Path(flat["data.path"]).expanduser().resolve())
    flat["backbone.weights"] = weights_identity(cfg)
    return flat


def _plain(node: Any) -> Any:
    """A config node as plain data (resolved); a leaf as it is."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def stage_key(cfg: DictConfig, stage: str, manifest: Manifest) -> str:
    """A key of everything a stage's result depends on: its config sections and (the keys of) the stages it uses."""
    sections, uses = STAGES[stage]
    if stage == "train":
        return manifest.data["identity_hash"]
    settings = {section: _plain(OmegaConf.select(cfg, section)) for section in sections}
    return _digest({"settings": settings, "uses": [stage_key(cfg, used, manifest) for used in uses]})


class JsonRecord:
    """A JSON file of the run folder, read once and written whole (write_json) on every change."""

    def __init__(self, path: Path, empty: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else empty

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


class Manifest(JsonRecord):
    """manifest.json of a run folder."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / MANIFEST_FILE, {})

    def start(self, kind: str, cfg: DictConfig) -> None:
        """Record a new run's identity (a resumed run keeps the one it has)."""
        if self.data:
            return
        ident = identity(cfg)
        self.data = {"format": FORMAT, "kind": kind, "identity": ident, "identity_hash": _digest(ident),
                     "split_fingerprint": None, "mlflow": None, "stages": {}}
        self.save()

    def check_fingerprint(self, fingerprint: str, data_location: str) -> None:
        """Refuse to resume on other data: which image is in which split must not change under a run."""
        recorded = self.data.get("split_fingerprint")
        if recorded is None:
            self.update(split_fingerprint=fingerprint)
        elif recorded != fingerprint:
            raise UsageError(
                f"the images under {data_location} changed since this run started (split fingerprint {fingerprint}, "
                f"was {recorded}); resuming would mix the splits, so start a new run folder"
            )

    def stage(self, name: str) -> str | None:
        return self.data.get("stages", {}).get(name)

    def done(self, name: str, key: str) -> bool:
        return self.stage(name) == key

    def mark(self, name: str, key: str) -> None:
        self.data.setdefault("stages", {})[name] = key
        self.save()



def foreign_entries(run_dir: Path) -> list[str]:
    """Entries of a folder without a manifest that neither Hydra nor finetune put there."""
    return sorted(entry.name for entry in run_dir.iterdir()
                  if entry.name not in HYDRA_ENTRIES and not (entry.is_file() and entry.suffix == ".log"))


def check(run_dir: Path, cfg: DictConfig) -> None:
    """Refuse a folder that is not this run's: another project's files, or a run with other settings."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UsageError(f"hydra.run.dir={run_dir} is a file; give a new or empty folder")
    manifest = Manifest(run_dir)
    if not manifest.data:
        foreign = foreign_entries(run_dir)
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UsageError(
                f"hydra.run.dir={run_dir} holds files that are not a finetune run ({len(foreign)} entries: {shown}); "
                "give a new or empty folder (nothing was changed)"
            )
        return
    recorded, current = manifest.data["identity"], identity(cfg)
    changed = sorted(key for key in recorded.keys() | current.keys() if recorded.get(key) != current.get(key))
    if changed:
        shown = "; ".join(f"{key}={current.get(key)} (was {recorded.get(key)})" for key in changed[:6])
        more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise UsageError(
            f"{run_dir} holds a run with other settings: {shown}{more}; resume it with its own settings "
            "(its config.yaml) or start a new run folder"
        )
