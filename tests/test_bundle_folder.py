"""The bundle swap: a crash at any step leaves a complete bundle findable; folders that are not bundles are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune.artifacts import ExportError
from finetune.bundle_folder import LABELS_FILE, METADATA_FILE, building, find_bundle


class Crash(BaseException):
    """The process dies here: nothing after it runs, no cleanup either."""


def export(bundle: Path, name: str) -> None:
    """A stand-in export: the files a complete bundle ends with, labelled with the export's name."""
    with building(bundle) as partial:
        (partial / LABELS_FILE).write_text(name)
        (partial / METADATA_FILE).write_text("{}")


def failed_export(bundle: Path) -> None:
    with pytest.raises(RuntimeError), building(bundle):
        raise RuntimeError("converter failed")


def crash_at_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int) -> None:
    """Make the call-th call of owner.name crash the process."""
    real = getattr(owner, name)
    calls = []

    def crashing(*args: object, **kwargs: object) -> object:
        calls.append(args)
        if len(calls) == call:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, crashing)


@pytest.mark.parametrize(
    ("owner", "name", "call", "survivor"),
    [
        (Path, "rename", 1, "first"),  # moving the current bundle aside
        (Path, "rename", 2, "first"),  # moving the new bundle into place: the gap between the renames
        (shutil, "rmtree", 1, "second"),  # removing the replaced bundle
    ],
    ids=["first rename", "second rename", "removal of the old bundle"],
)
def test_a_crash_during_the_swap_leaves_a_complete_bundle_and_later_exports_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int, survivor: str
) -> None:
    bundle = tmp_path / "export"
    export(bundle, "first")
    crash_at_call(monkeypatch, owner, name, call)
    with pytest.raises(Crash):
        export(bundle, "second")
    monkeypatch.undo()

    assert (find_bundle(bundle) / LABELS_FILE).read_text() == survivor  # where `finetune predict` looks
    failed_export(bundle)  # the next export fails: the surviving bundle is back in place, not deleted
    assert (bundle / LABELS_FILE).read_text() == survivor
    export(bundle, "third")
    assert (bundle / LABELS_FILE).read_text() == "third"
    assert [path.name for path in tmp_path.iterdir()] == ["export"]


def test_a_failed_export_keeps_the_previous_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "export"
    export(bundle, "first")
    failed_export(bundle)
    assert (bundle / LABELS_FILE).read_text() == "first"
    assert [path.name for path in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("name", ["export", "export.partial", "export.old"])
def test_a_folder_that_is_not_a_bundle_is_refused_and_left_untouched(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thesis.tex").write_text("the user's own work")
    with pytest.raises(ExportError, match=f"{name} holds thesis.tex"):
        export(tmp_path / "export", "new")
    assert (folder / "thesis.tex").read_text() == "the user's own work"
    assert [path.name for path in tmp_path.iterdir()] == [name]


def test_a_file_in_the_bundle_s_place_is_refused_and_left_untouched(tmp_path: Path) -> None:
    (tmp_path / "export").write_text("notes")
    with pytest.raises(ExportError, match="is in the way"):
        export(tmp_path / "export", "new")
    assert (tmp_path / "export").read_text() == "notes"
