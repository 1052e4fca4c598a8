"""Training checkpoints that survive `kill -9`: a best-weights file written whole or not at all, and Keras's
BackupAndRestore folder repaired when a kill cut its files short.

Keras's ModelCheckpoint writes the weights file in place, and BackupAndRestore falls back to its previous
backup only when loading the latest raises OSError and a previous one exists, so a kill during a phase's
first backup (or while its JSON record is written) left a folder that stopped every resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import keras

BACKUP_WEIGHTS = "latest.weights.h5"  # BackupAndRestore's file names (keras/src/callbacks/backup_and_restore.py)
BACKUP_RECORD = "training_metadata.json"
PREVIOUS = ".bkp"


class BestCheckpoint(keras.callbacks.Callback):
    """The weights of the epoch with the highest val_accuracy so far (above `best`), replaced atomically.

    `saved` is the model whose weights are written (default: the one being fitted), e.g. the whole
    classifier while only its head is fitted."""

    def __init__(self, path: Path, best: float | None, saved: keras.Model | None = None) -> None:
        super().__init__()
        self.path = path
        self.best = best
        self.saved = saved

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        value = (logs or {}).get("val_accuracy")
        if value is None or (self.best is not None and value <= self.best):
            return
        self.best = value
        partial = self.path.with_name(self.path.name.replace(".weights.h5", ".partial.weights.h5"))
        (self.saved or self.model).save_weights(partial)
        os.replace(partial, self.path)


def _readable(weights: Path, record: Path) -> bool:
    """Whether a backup's weights file reads through to its last value and its record parses."""
    try:
        with h5py.File(weights, "r") as handle:
            handle.visititems(lambda _, item: item[()] if isinstance(item, h5py.Dataset) else None)
        json.loads(record.read_text())
    except (OSError, ValueError, KeyError):
        return False
    return True


def repair_backup(backup_dir: Path) -> None:
    """Before a phase resumes: keep a readable latest backup, else fall back to the previous one, else start
    the phase over (the model still holds the weights the phase started from)."""
    latest, record = backup_dir / BACKUP_WEIGHTS, backup_dir / BACKUP_RECORD
    if not latest.exists() or _readable(latest, record):
        return
    previous, previous_record = Path(f"{latest}{PREVIOUS}"), Path(f"{record}{PREVIOUS}")
    if previous.exists() and _readable(previous, previous_record):
        shutil.copyfile(previous, latest)
        shutil.copyfile(previous_record, record)
        return
    shutil.rmtree(backup_dir)
