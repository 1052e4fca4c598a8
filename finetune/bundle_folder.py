"""The bundle's folder: what a bundle holds, and replacing it so that a complete bundle can always be found.

A new bundle is built in `<bundle>.partial`. The swap renames the current bundle to `<bundle>.old`, renames
the new one into place, then removes `.old`. Every step is one rename or one removal, so a crash at any
point leaves a complete bundle at `<bundle>` or, between the two renames, only at `<bundle>.old`: the next
export moves it back (`recover`) and `finetune predict` reads it there (`find_bundle`). A folder is only
ever renamed or removed when it holds nothing but bundle files.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from finetune.artifacts import FORMATS, ExportError, artifact_path

LABELS_FILE = "labels.txt"
METADATA_FILE = "metadata.json"  # written last: a bundle that has it is complete
CARD_FILE = "model_card.md"
BUNDLE_NAMES = frozenset({LABELS_FILE, METADATA_FILE, CARD_FILE, *(artifact_path(Path(), fmt).name for fmt in FORMATS)})
PARTIAL, OLD = ".partial", ".old"


def sibling(bundle: Path, suffix: str) -> Path:
    """The `.partial` or `.old` folder beside a bundle (given as any path, `.` included)."""
    bundle = bundle.absolute()
    return bundle.with_name(bundle.name + suffix)


def find_bundle(bundle: Path) -> Path:
    """The bundle, or its complete `.old` sibling when a crash between the swap's renames left only that."""
    old = sibling(bundle, OLD)
    if not bundle.exists() and (old / METADATA_FILE).is_file() and not _foreign_names(old):
        return old
    return bundle


def recover(bundle: Path) -> None:
    """Move a `.old` bundle back into place when a crash left no bundle."""
    found = find_bundle(bundle)
    if found != bundle:
        found.rename(bundle)


@contextlib.contextmanager
def building(bundle: Path) -> Iterator[Path]:
    """A fresh `.partial` folder that replaces the bundle only when the block succeeds, and is removed otherwise.

    Refuses with ExportError, before any work, when the bundle, `.partial` or `.old` path is not a bundle folder.
    """
    partial, old = sibling(bundle, PARTIAL), sibling(bundle, OLD)
    recover(bundle)
    for folder in (bundle, partial, old):
        _require_bundle_folder(folder)
    _discard(partial)  # left by a crash during an earlier build
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:  # failed or interrupted: no half bundle is left behind
        _discard(partial)
        raise
    _discard(old)  # already replaced, left by a crash after an earlier swap's second rename
    if bundle.exists():
        bundle.rename(old)
    partial.rename(bundle)
    _discard(old)


def _require_bundle_folder(folder: Path) -> None:
    """Refuse a path that this project did not write: a file, a link, or a folder holding other files."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ExportError(f"{folder} is in the way and is not an export bundle folder; move it away and export again")
    foreign = _foreign_names(folder)
    if foreign:
        raise ExportError(f"{folder} holds {', '.join(foreign)}, which no export bundle holds; move it away and export again")


def _foreign_names(folder: Path) -> list[str]:
    """Names in the folder that no bundle holds (none for a missing folder)."""
    return sorted(path.name for path in folder.iterdir() if path.name not in BUNDLE_NAMES) if folder.is_dir() else []


def _discard(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
