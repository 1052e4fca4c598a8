"""Checkpoints a kill -9 cannot leave unreadable: the best weights file and Keras's backup folder."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from finetune.checkpoints import BACKUP_RECORD, BACKUP_WEIGHTS, PREVIOUS, BestCheckpoint, repair_backup


def tiny_model(value: float) -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant(value))])
    return model


def write_backup(folder: Path, value: float, epoch: int, suffix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(value).save_weights(folder / "tmp.weights.h5")
    (folder / "tmp.weights.h5").rename(folder / (BACKUP_WEIGHTS + suffix))
    (folder / (BACKUP_RECORD + suffix)).write_text(f'{{"epoch": {epoch}, "batch": 0}}')


def cut_short(path: Path) -> None:
    """What a kill during the write leaves: the first part of the file."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def restored_kernel(folder: Path) -> float:
    model = tiny_model(0.0)
    model.load_weights(folder / BACKUP_WEIGHTS)
    return float(model.layers[0].kernel.numpy()[0, 0])


def test_a_readable_backup_is_left_as_it_is(tmp_path: Path) -> None:
    write_backup(tmp_path, 1.0, epoch=3)
    write_backup(tmp_path, 2.0, epoch=2, suffix=PREVIOUS)
    repair_backup(tmp_path)
    assert restored_kernel(tmp_path) == 1.0


@pytest.mark.parametrize("broken", [BACKUP_WEIGHTS, BACKUP_RECORD])
def test_a_backup_cut_short_falls_back_to_the_previous_one(tmp_path: Path, broken: str) -> None:
    write_backup(tmp_path, 1.0, epoch=3)
    write_backup(tmp_path, 2.0, epoch=2, suffix=PREVIOUS)
    cut_short(tmp_path / broken)
    repair_backup(tmp_path)
    assert restored_kernel(tmp_path) == 2.0
    assert (tmp_path / BACKUP_RECORD).read_text() == '{"epoch": 2, "batch": 0}'


def test_a_first_backup_cut_short_starts_the_phase_over(tmp_path: Path) -> None:
    backup = tmp_path / "backup_phase2"
    write_backup(backup, 1.0, epoch=1)
    cut_short(backup / BACKUP_WEIGHTS)
    with pytest.raises(OSError):  # what Keras's BackupAndRestore would meet (and re-raise: no previous backup)
        tiny_model(0.0).load_weights(backup / BACKUP_WEIGHTS)
    repair_backup(backup)
    assert not backup.exists()


def test_best_weights_are_replaced_whole_and_only_on_improvement(tmp_path: Path) -> None:
    best = tmp_path / "best.weights.h5"
    model = tiny_model(1.0)
    checkpoint = BestCheckpoint(best, best=0.5)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_accuracy": 0.4})
    assert not best.exists()  # not above the best recorded before a resume
    checkpoint.on_epoch_end(1, {"val_accuracy": 0.6})
    assert best.exists()

    def killed_mid_write(path: str | Path, **_: object) -> None:
        Path(path).write_bytes(b"\x89HDF half a file")
        raise KeyboardInterrupt

    model.layers[0].kernel.assign(np.full((3, 2), 7.0))
    model.save_weights = killed_mid_write
    with pytest.raises(KeyboardInterrupt):
        checkpoint.on_epoch_end(2, {"val_accuracy": 0.9})
    again = tiny_model(0.0)
    again.load_weights(best)  # the previous best is still whole
    assert float(again.layers[0].kernel.numpy()[0, 0]) == 1.0
