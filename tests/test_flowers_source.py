"""data=flowers: tf_flowers through TensorFlow Datasets, unpacked once into class folders.

The end-to-end tests run TFDS's own download (over HTTP from a server on 127.0.0.1), checksum check,
extraction and preparation of a miniature flower_photos.tgz; only network failures become the one-line
"could not be downloaded" error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.core.download import downloader
from tensorflow_datasets.core.download.checksums import UrlInfo
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError
from tensorflow_datasets.datasets.tf_flowers import tf_flowers_dataset_builder

from finetune.config import UsageError
from finetune.dataset import scan_folder
from finetune.sources import tf_flowers_folder

CLASSES = ("dandelion", "daisy", "tulips", "sunflowers", "roses")
ARCHIVE = "flower_photos.tgz"
NOT_AN_ARCHIVE = b"\x1f\x8b this is not a gzip file"


def test_tf_flowers_is_unpacked_into_class_folders(tmp_path: Path) -> None:
    with tfds.testing.mock_data(num_examples=12):
        root = tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")
    assert root == tmp_path / "cache" / "flower_photos"
    folder = scan_folder(root)
    assert set(folder.class_names) <= set(CLASSES)
    assert len(folder.paths) + len(folder.skipped) == 12
    # a second call reuses the unpacked copy without touching TFDS
    assert tf_flowers_folder(tmp_path / "nowhere", tmp_path / "cache") == root


def tiny_jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_flower_photos(path: Path, images_per_class: int = 2) -> dict[str, set[bytes]]:
    """A miniature of the real archive: flower_photos/LICENSE.txt and flower_photos/<class>/*.jpg; the JPEGs by class."""
    photos = {name: {tiny_jpeg(40 * label + 10 * index) for index in range(images_per_class)}
              for label, name in enumerate(CLASSES)}
    with tarfile.open(path, "w:gz") as archive:
        members = {"flower_photos/LICENSE.txt": b"Photos by their photographers, CC-BY 2.0\n"}
        for name, jpegs in photos.items():
            members.update({f"flower_photos/{name}/{index}.jpg": jpeg for index, jpeg in enumerate(sorted(jpegs))})
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return photos


class QuietHandler(SimpleHTTPRequestHandler):
    timeout = 10  # seconds a connection may stay idle, so no request thread outlives a test for long

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(folder: Path) -> Iterator[str]:
    """Serve folder over HTTP on 127.0.0.1 from a thread; yields the base URL; the server is shut down on exit."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def point_tf_flowers_at(url: str, registered: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tf_flowers builder downloads url, and TFDS checks it against registered's size and sha256."""
    monkeypatch.setattr(tf_flowers_dataset_builder, "_URL", url)
    checksum = UrlInfo(size=len(registered), checksum=hashlib.sha256(registered).hexdigest(), filename=ARCHIVE)
    monkeypatch.setattr(tf_flowers_dataset_builder.Builder, "url_infos", {url: checksum})


def test_tfds_downloads_prepares_and_unpacks_tf_flowers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = tmp_path / "served"
    served.mkdir()
    photos = write_flower_photos(served / ARCHIVE)
    with serving(served) as base_url:
        point_tf_flowers_at(f"{base_url}/{ARCHIVE}", (served / ARCHIVE).read_bytes(), monkeypatch)
        root = tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")
    assert root == tmp_path / "cache" / "flower_photos"
    unpacked = {class_dir.name: {path.read_bytes() for path in class_dir.iterdir()}
                for class_dir in root.iterdir() if class_dir.is_dir()}
    assert unpacked == photos  # every JPEG in its class's folder, byte for byte, and nothing else
    assert sorted(scan_folder(root).class_names) == sorted(CLASSES)
    # the server is gone: a second call reuses the unpacked copy
    assert tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache") == root


def test_a_refused_connection_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(tmp_path) as base_url:
        pass  # stopped: its port on 127.0.0.1 now refuses connections
    point_tf_flowers_at(f"{base_url}/{ARCHIVE}", b"", monkeypatch)
    monkeypatch.setattr(downloader, "MAX_RETRIES", 0)  # TFDS's 10 retries with back-off take minutes
    with pytest.raises(UsageError) as raised:
        tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")
    message = str(raised.value)
    assert message.startswith("tf_flowers could not be downloaded (ConnectionRefusedError: ") and "refused" in message
    assert message.endswith("offline, pass data.path=/path/to/flower_photos") and "\n" not in message
    assert not (tmp_path / "cache").exists()


def test_an_archive_missing_on_the_server_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(tmp_path) as base_url:  # an empty folder: HTTP 404
        point_tf_flowers_at(f"{base_url}/{ARCHIVE}", b"", monkeypatch)
        with pytest.raises(UsageError, match=r"^tf_flowers could not be downloaded \(DownloadError: .* HTTP code: 404"):
            tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")


@pytest.mark.parametrize(
    ("registered", "error"),
    [
        (NOT_AN_ARCHIVE, tarfile.ReadError),  # downloaded intact, but not an archive: TFDS's extraction fails
        (b"the archive the dataset's authors published", NonMatchingChecksumError),  # TFDS's checksum check fails
    ],
)
def test_a_corrupt_archive_is_not_dressed_up_as_a_download_failure(
    registered: bytes, error: type[Exception], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ARCHIVE).write_bytes(NOT_AN_ARCHIVE)
    with serving(tmp_path) as base_url:
        point_tf_flowers_at(f"{base_url}/{ARCHIVE}", registered, monkeypatch)
        with pytest.raises(error):
            tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")


def test_a_missing_module_propagates_as_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What TFDS 4.9 did without importlib_resources: an install bug, not a download failure."""

    def missing_module(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'importlib_resources'")

    monkeypatch.setattr(tf_flowers_dataset_builder.Builder, "download_and_prepare", missing_module)
    with pytest.raises(ModuleNotFoundError, match="importlib_resources"):
        tf_flowers_folder(tmp_path / "tfds", tmp_path / "cache")
