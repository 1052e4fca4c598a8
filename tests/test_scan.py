"""The fast scan: parallel decode check (same verdicts as decoding each file), its cache, and `finetune scan`."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import COLORS, write_image
from finetune import decode_check, image_cache, scan
from finetune.dataset import load_images, make_dataset, scan_folder, split_folder


def jpeg_bytes(seed: int, size: tuple[int, int] = (120, 90), progressive: bool = False) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def damaged_files(folder: Path) -> list[Path]:
    """Images cut short or with bytes overwritten at many places, in JPEG and PNG, plus empty and foreign files."""
    folder.mkdir()
    whole = jpeg_bytes(0)
    progressive = jpeg_bytes(1, progressive=True)
    png = io.BytesIO()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(png, "PNG")
    files = {"whole.jpg": whole, "progressive.jpg": progressive, "whole.png": png.getvalue(), "empty.jpg": b"",
             "text.jpg": b"not an image", "notes.txt": b"a note", "png_cut.png": png.getvalue()[:60]}
    for fraction in (0.02, 0.1, 0.5, 0.9, 0.99):
        files[f"cut_{fraction}.jpg"] = whole[:int(len(whole) * fraction)]
        files[f"progressive_cut_{fraction}.jpg"] = progressive[:int(len(progressive) * fraction)]
    rng = np.random.default_rng(3)
    for index in range(12):  # overwritten bytes: in the headers, the tables, the entropy-coded data
        damaged = bytearray(whole)
        start = int(rng.integers(2, len(whole) - 16))
        damaged[start:start + 8] = rng.integers(0, 255, 8, dtype=np.uint8).tobytes()
        files[f"overwritten_{index}.jpg"] = bytes(damaged)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def test_the_parallel_check_gives_each_file_the_verdict_of_decoding_it_alone(tmp_path: Path) -> None:
    files = damaged_files(tmp_path / "files")
    checked = decode_check.check_files(decode_check.file_stats([str(path) for path in files]), cache_file=None)
    alone = {str(path): decode_check.file_reason(path) for path in files}
    assert {Path(p).name: r is None for p, r in checked.items()} == {Path(p).name: r is None for p, r in alone.items()}
    assert checked == alone  # the same reasons, word for word
    assert checked[str(tmp_path / "files" / "whole.jpg")] is None and checked[str(tmp_path / "files" / "whole.png")] is None
    assert sum(reason is not None for reason in checked.values()) >= 10  # the damage is seen, not waved through


def image_tree(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for label in range(2):
        (root / f"c{label}").mkdir(parents=True)
        for index in range(per_class):
            write_image(root / f"c{label}" / f"{index}.png", COLORS[label], rng)
    (root / "c0" / "broken.jpg").write_bytes(b"broken")
    return root


def checked_files(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Records the names of the files each scan decodes (rather than takes from the cache)."""
    calls: list[list[str]] = []
    original = decode_check._check_fresh

    def spy(files: list[str]) -> dict[str, str | None]:
        calls.append(sorted(Path(path).name for path in files))
        return original(files)

    monkeypatch.setattr(decode_check, "_check_fresh", spy)
    return calls


def test_a_second_scan_checks_only_new_and_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    calls = checked_files(monkeypatch)
    first = scan_folder(root, cache_dir)
    assert len(calls[0]) == 13
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == before  # nothing written among the images
    again = scan_folder(root, cache_dir)
    assert calls[1:] == [[]] and again.paths == first.paths and again.skipped == first.skipped
    (root / "c1" / "0.png").write_bytes(b"now broken")  # a changed size and time
    shutil.copy(root / "c1" / "1.png", root / "c1" / "new.png")
    os.utime(root / "c1" / "2.png", ns=(1, 1))  # the same bytes at another time: checked again too
    changed = scan_folder(root, cache_dir)
    assert calls[2] == ["0.png", "2.png", "new.png"]
    assert {Path(p).name for p, _ in changed.skipped} == {"broken.jpg", "0.png"}
    assert len(changed.paths) == len(first.paths)  # one lost, one new


def test_an_unreadable_cache_is_checked_afresh_and_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    cache_file = decode_check.cache_file_for(root, cache_dir)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text('{"format": ')  # cut short, as by a crash of a writer that did not rename
    calls = checked_files(monkeypatch)
    folder = scan_folder(root, cache_dir)
    assert len(calls[0]) == 13 and len(folder.skipped) == 1
    assert [path.name for path in cache_file.parent.iterdir()] == [cache_file.name]  # no temporary file left
    scan_folder(root, cache_dir)
    assert calls[1] == []


def test_scan_command_reports_classes_splits_and_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = image_tree(tmp_path / "images", per_class=10)
    scan.main(["data=folder", f"data.path={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    out = capsys.readouterr().out
    assert f"{root.resolve()}: 20 usable images in 2 classes, 1 skipped" in out
    assert "  c0  10\n  c1  10\n" in out
    assert "Splits (data.split_seed=0): train 14, val 3, test 3; fingerprint " in out
    assert f"  {root / 'c0' / 'broken.jpg'}\tcannot be decoded: " in out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "images"]  # no experiments/, no run folder


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=folder", "data.path={one_class}"], "has 1 class folder(s); at least 2 are needed"),
        (["data=folder", "data.path={missing}"], "data.path={missing} is not a folder"),
        (["data=folder", "data.path={one_class}", "data.cache=sometimes"],
         "data.cache=sometimes must be auto, memory, disk or none"),
    ],
)
def test_scan_command_data_errors_are_one_line_and_exit_2(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    one_class = tmp_path / "one_class"
    (one_class / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one_class / "only" / "a.png")
    names = {"one_class": one_class, "missing": tmp_path / "missing"}
    with pytest.raises(SystemExit) as stopped:
        scan.main([item.format(**names) for item in overrides] + [f"data.cache_dir={tmp_path / 'cache'}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: error: ") and expected.format(**names) in err and err.count("\n") == 1


def test_auto_keeps_decoded_images_in_memory_only_while_they_fit_the_budget(tmp_path: Path) -> None:
    one_image = image_cache.decoded_bytes(1, 32)
    assert one_image == 32 * 32 * 3
    assert image_cache.choose("auto", tmp_path, 100 * one_image / 1e9, 100, 32) == image_cache.ImageCache("memory")
    assert image_cache.choose("auto", tmp_path, 99 * one_image / 1e9, 100, 32) == image_cache.ImageCache("disk", tmp_path)
    assert image_cache.choose("none", tmp_path, 1.0, 100, 32).mode == "none"
    # off memory, a shuffle holds a bounded number of images however many there are
    assert image_cache.ImageCache("disk", tmp_path).shuffle_buffer(10**6, 224) == 256 * 2**20 // (224 * 224 * 3)
    assert image_cache.ImageCache("memory").shuffle_buffer(10**6, 224) == 10**6


@pytest.mark.parametrize("mode", ["disk", "none"])
def test_a_disk_cache_serves_later_passes_from_data_cache_dir(mode: str, tmp_path: Path) -> None:
    root = image_tree(tmp_path / "images")
    split = split_folder(scan_folder(root, tmp_path / "cache"), 0.2, 0.2, seed=0)["train"]
    expected = load_images(split, 24).astype(np.float32)
    dataset = make_dataset(split, 2, 24, batch_size=4, cache=image_cache.ImageCache(mode, tmp_path / "cache"))
    first = np.concatenate([images for images, _ in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(first, expected)
    for path in split.paths:  # the images are gone: only the cache can still give them
        Path(path).unlink()
    if mode == "none":
        with pytest.raises(tf.errors.NotFoundError):
            list(dataset.as_numpy_iterator())
        return
    again = np.concatenate([images for images, _ in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(again, expected)
    assert list((tmp_path / "cache" / "decoded").iterdir())  # the snapshot, beside the scan results
    assert all(path.suffix == ".png" or path.name == "broken.jpg" for path in root.rglob("*") if path.is_file())
