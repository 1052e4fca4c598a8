"""The fast scan: parallel decode check (same verdicts as decoding each file), its cache, and `finetune scan`."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import COLORS, write_image
from finetune import decode_check, image_cache, scan
from finetune.config import compose
from finetune.dataset import load_image, load_images, make_dataset, scan_folder, split_folder
from finetune.run import prepare_data


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    """Smooth random colours (closer to a photo than noise is): 8 px blocks, bilinearly enlarged."""
    coarse = np.random.default_rng(seed).integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BILINEAR)


def flat_jpeg(width: int, height: int) -> bytes:
    """A baseline grayscale JPEG of any size, every 8x8 block flat grey: with one-symbol Huffman tables a block is
    two zero bits, so even an image over TensorFlow's size limit takes only width * height / 256 bytes."""
    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    one_symbol = bytes([1] + [0] * 15 + [0])  # one code of length 1, for symbol 0 (DC: no change; AC: end of block)
    blocks = -(-width // 8) * -(-height // 8)
    frame = bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    return (b"\xff\xd8" + segment(0xDB, bytes([0]) + bytes([1] * 64)) + segment(0xC0, frame)
            + segment(0xC4, bytes([0x00]) + one_symbol) + segment(0xC4, bytes([0x10]) + one_symbol)
            + segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])) + bytes(-(-blocks * 2 // 8)) + b"\xff\xd9")


def jpeg_bytes(seed: int, size: tuple[int, int] = (120, 90), progressive: bool = False) -> bytes:
    return encoded(photo(seed, size), "JPEG", quality=90, progressive=progressive)


def cuts(data: bytes, name: str, suffix: str, step: int) -> dict[str, bytes]:
    """data cut short: at every offset through the headers, every step bytes through the image data, and the last
    four bytes."""
    scan_start = data.find(b"\xff\xda") + 2 if data.startswith(b"\xff\xd8") else 0
    offsets = {*range(0, scan_start + 16), *range(scan_start, len(data), step), *range(len(data) - 4, len(data))}
    return {f"{name}_cut_{offset}{suffix}": data[:offset] for offset in sorted(offsets) if offset >= 0}


def damaged_files(folder: Path) -> list[Path]:
    """Whole images of every kind training reads, and the same cut short at many places (headers, image data, the
    last bytes), with bits flipped and bytes overwritten or zeroed, with junk after the end; empty and foreign files."""
    folder.mkdir()
    rng = np.random.default_rng(3)
    jpegs = {
        "baseline": jpeg_bytes(0), "progressive": jpeg_bytes(1, progressive=True),
        "full_chroma": encoded(photo(2), "JPEG", quality=90, subsampling=0),
        "odd_size": encoded(photo(4, (37, 23)), "JPEG", quality=80),
        "grayscale": encoded(photo(5).convert("L"), "JPEG", quality=90),
        "cmyk": encoded(photo(6).convert("CMYK"), "JPEG", quality=90),
        "restart": encoded(photo(7), "JPEG", quality=90, restart_marker_blocks=4),
    }
    files = {f"{name}.jpg": data for name, data in jpegs.items()}
    for name, data in jpegs.items():
        files.update(cuts(data, name, ".jpg", step=37))
        scan_start = data.find(b"\xff\xda")
        for index, position in enumerate(rng.integers(2, len(data), 12)):
            flipped = bytearray(data)
            flipped[position] ^= 1 << int(rng.integers(0, 8))
            files[f"{name}_flipped_{index}.jpg"] = bytes(flipped)
        for index, start in enumerate(rng.integers(scan_start, len(data) - 80, 6)):
            overwritten = bytearray(data)
            overwritten[start:start + 8] = rng.integers(0, 255, 8, dtype=np.uint8).tobytes()
            files[f"{name}_overwritten_{index}.jpg"] = bytes(overwritten)
            files[f"{name}_zeroed_{index}.jpg"] = data[:start] + bytes(64) + data[start + 64:]
        files[f"{name}_trailing_junk.jpg"] = data + b"junk after the end" + bytes(100)
    others = {"png": encoded(photo(8, (50, 40)), "PNG"), "gif": encoded(photo(9, (50, 40)).convert("P"), "GIF"),
              "bmp": encoded(photo(10, (50, 40)), "BMP")}
    for name, data in others.items():
        files[f"whole.{name}"] = data
        files.update(cuts(data, name, f".{name}", step=max(1, len(data) // 40)))
    files.update({"empty.jpg": b"", "text.jpg": b"not an image", "notes.txt": b"a note", "zeros.jpg": bytes(4096),
                  "signature_then_garbage.jpg": b"\xff\xd8\xff" + rng.integers(0, 255, 3000, dtype=np.uint8).tobytes(),
                  "png_named_jpg.jpg": others["png"], "grey.png": encoded(photo(11).convert("L"), "PNG"),
                  "flat_small.jpg": flat_jpeg(64, 48),
                  "over_the_size_limit.jpg": flat_jpeg(32768, 16384)})  # 2**29 values: the full decode refuses it
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(folder / name for name in files)


def training_accepts(path: Path) -> bool:
    """Whether training's own decode (read, decode, resize) takes the file."""
    try:
        load_image(tf.constant(str(path)), 8)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
        return False
    return True


def test_the_parallel_check_keeps_exactly_the_files_trainings_full_decode_takes(tmp_path: Path) -> None:
    files = damaged_files(tmp_path / "files")
    checked = decode_check.check_files(decode_check.file_stats([str(path) for path in files]), cache_file=None)
    kept = {path.name for path in files if checked[str(path)] is None}
    image_files = [path for path in files if path.suffix.lower() in decode_check.IMAGE_EXTENSIONS]
    assert kept == {path.name for path in image_files if training_accepts(path)}
    assert checked == {str(path): decode_check.file_reason(path) for path in files}  # the reasons, word for word
    assert {"baseline.jpg", "cmyk.jpg", "grayscale.jpg", "flat_small.jpg", "whole.gif", "whole.bmp"} <= kept
    assert "over_the_size_limit.jpg" not in kept and "baseline_trailing_junk.jpg" in kept
    assert len(files) - len(kept) >= 1000  # the damage is seen, not waved through


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


def test_verdicts_of_the_earlier_check_are_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Format 1's check never decoded (it kept files cut short): a cache it wrote is checked afresh."""
    root, cache_dir = image_tree(tmp_path / "images"), tmp_path / "cache"
    cache_file = decode_check.cache_file_for(root, cache_dir)
    stats = decode_check.file_stats([str(path) for path in root.rglob("*") if path.is_file()])
    decode_check.write_json_atomically(cache_file, {"format": f"1, tensorflow {tf.__version__}",
                                                    "files": {path: [*stat, None] for path, stat in stats.items()}})
    calls = checked_files(monkeypatch)
    folder = scan_folder(root, cache_dir)
    assert len(calls[0]) == 13 and [Path(path).name for path, _ in folder.skipped] == ["broken.jpg"]


def test_scan_command_reports_classes_splits_and_skipped_files(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    root = image_tree(tmp_path / "images", per_class=10)
    whole = encoded(Image.new("RGB", (160, 120), (20, 90, 160)), "JPEG")
    (root / "c1" / "cut.jpg").write_bytes(whole[: len(whole) // 2])  # libjpeg prints a line of its own for this one
    scan.main(["data=folder", f"data.path={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    out, err = capfd.readouterr()
    assert f"{root.resolve()}: 20 usable images in 2 classes, 2 skipped" in out
    assert "  c0  10\n  c1  10\n" in out
    assert "Splits (data.split_seed=0): train 14, val 3, test 3; fingerprint " in out
    assert f"  {root / 'c0' / 'broken.jpg'}\tcannot be decoded: " in out
    assert f"  {root / 'c1' / 'cut.jpg'}\tcannot be decoded: " in out
    assert "JPEG library" not in err  # the report says it once; the decoder's own lines stay off the terminal
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


def age(folder: Path, seconds: float) -> None:
    """Set the times of folder and everything in it to `seconds` ago."""
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def run_folders(snapshot: Path) -> list[str]:
    return sorted(run.name for graph in snapshot.iterdir() if graph.is_dir() for run in graph.iterdir() if run.is_dir())


def test_a_snapshot_cut_short_is_replaced_cleanly_by_the_next_run(tmp_path: Path) -> None:
    cache = image_cache.ImageCache("disk", tmp_path / "cache")
    numbers = tf.data.Dataset.range(200).map(lambda x: tf.fill([256], x))
    cut_short = iter(cache.keep(numbers, "key"))
    for _ in range(20):  # an epoch interrupted: tf.data leaves the run folder it was writing, never finalized
        next(cut_short)
    del cut_short
    snapshot = tmp_path / "cache" / "decoded" / "key"
    [partial] = run_folders(snapshot)
    busy = iter(cache.keep(numbers, "key"))  # another job writing the same snapshot right now: its folder is kept
    next(busy)
    assert len(run_folders(snapshot)) == 2
    del busy
    age(snapshot, image_cache.STALE_WRITE_SECONDS + 60)  # ... until it has written nothing for a while
    again = [int(x[0]) for x in cache.keep(numbers, "key").as_numpy_iterator()]
    assert again == list(range(200))
    [finished] = run_folders(snapshot)  # the cut ones removed, the whole one kept, and read by the next pass
    assert finished != partial and image_cache.current_run(next(p for p in snapshot.iterdir() if p.is_dir())) == finished
    assert [int(x[0]) for x in cache.keep(numbers, "key").as_numpy_iterator()] == again
    assert run_folders(snapshot) == [finished]


def test_snapshots_are_pruned_least_recently_used_first_to_the_disk_budget(tmp_path: Path, tiny_images: Path) -> None:
    decoded = tmp_path / "cache" / "decoded"
    for name, used_days_ago in (("old", 30), ("older", 60), ("recent", 2), ("in_use", 0.5)):
        folder = decoded / name
        image_cache.claim(folder)
        (folder / "data").write_bytes(bytes(1000))
        os.utime(folder / image_cache.MARKER, (time.time() - used_days_ago * 86400,) * 2)
    (decoded / "not_ours").mkdir()  # a folder without the marker: not the tool's to remove
    (decoded / "not_ours" / "data").write_bytes(bytes(5000))
    everything = sorted(path.name for path in decoded.iterdir())
    cache = image_cache.choose("disk", tmp_path / "cache", 1.0, 100, 32)
    assert cache == image_cache.ImageCache("disk", tmp_path / "cache")
    assert sorted(path.name for path in decoded.iterdir()) == everything  # choosing removes nothing
    assert image_cache.ImageCache("memory").prune(0.0) == []
    assert sorted(path.name for path in decoded.iterdir()) == everything  # nor does a cache that is not on disk
    cfg = compose(["data=folder", f"data.path={tiny_images}", f"data.cache_dir={tmp_path / 'cache'}", "data.cache=disk",
                   f"data.cache_disk_gb={2500 / 1e9}"])
    prepare_data(cfg)  # what a run does first, once
    assert sorted(path.name for path in decoded.iterdir()) == ["in_use", "not_ours", "recent"]
    assert cache.prune(1 / 1e9) == [decoded / "recent"]  # over budget: in use stays
    assert sorted(path.name for path in decoded.iterdir()) == ["in_use", "not_ours"]
