"""Run folders: a folder of other files is refused untouched, a resume must match the run's identity, a failed
start removes only what it created, and each stage reruns only when what it depends on changed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_FLOWERS, SHARED_WEIGHTS, write_image
from finetune.cli import main
from finetune.config import UsageError, compose
from finetune.runfolder import STAGES, Manifest, check, identity, stage_key

FLOWERS = f"data.path={SHARED_FLOWERS}"
QUICK = ["backbone=mobilenet_v3_small", "backbone.weights=null", "backbone.input_size=32"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`finetune ARGV` in this process: exit status and stderr."""
    status = 0
    try:
        main(list(argv))
    except SystemExit as stopped:
        status = stopped.code or 0
    return status, capsys.readouterr().err


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"" for p in sorted(folder.rglob("*"))}


def started_run(run_dir: Path, *overrides: str) -> Manifest:
    """A run folder whose manifest says it started with these settings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.start("train", compose([FLOWERS, *QUICK, *overrides]))
    return manifest


@pytest.mark.parametrize("run_dir", ["mine", "."])
def test_a_folder_of_other_files_is_refused_and_left_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dir: str
) -> None:
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my own work")
    (folder / "sub" / "data.csv").write_text("1,2")
    before = tree(tmp_path)

    status, err = run_cli(capsys, FLOWERS, *QUICK, f"hydra.run.dir={run_dir}")
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "holds files that are not a finetune run" in lines[0], err
    assert tree(tmp_path) == before  # not even Hydra's .hydra/ was written


def test_resuming_with_other_settings_is_refused_naming_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    started_run(run_dir, "train.phase1.epochs=2")
    before = tree(run_dir)

    status, err = run_cli(capsys, FLOWERS, *QUICK, "train.phase1.epochs=3", "head.dropout=0.5", f"hydra.run.dir={run_dir}")
    assert status == 2
    line = err.strip()
    assert "holds a run with other settings" in line
    assert "train.phase1.epochs=3 (was 2)" in line and "head.dropout=0.5 (was 0.2)" in line
    assert tree(run_dir) == before


def test_settings_that_act_after_training_may_change_on_a_resume(tmp_path: Path) -> None:
    started_run(tmp_path / "run")
    later = compose([FLOWERS, *QUICK, "export.formats=[keras]", "latency.runs=7", "evaluate.top_k=2",
                     "mlflow.experiment=other", "weights_dir=" + str(SHARED_WEIGHTS), "data.cache_disk_gb=3"])
    check(tmp_path / "run", later)  # no error


def test_a_search_with_another_search_space_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "search"
    run_dir.mkdir()
    Manifest(run_dir).start("tune", compose([FLOWERS, *QUICK, "mode=tune", "tuner.max_trials=2"]))
    with pytest.raises(UsageError, match=r"tuner.max_trials=3 \(was 2\)"):
        check(run_dir, compose([FLOWERS, *QUICK, "mode=tune", "tuner.max_trials=3"]))


def test_the_weights_file_counts_by_its_content(tmp_path: Path) -> None:
    first, copy, other = tmp_path / "a.h5", tmp_path / "moved" / "b.h5", tmp_path / "c.h5"
    copy.parent.mkdir()
    first.write_bytes(b"weights one")
    copy.write_bytes(b"weights one")
    other.write_bytes(b"weights two")
    ident = {path: identity(compose([FLOWERS, *QUICK, f"backbone.weights={path}"]))["backbone.weights"]
             for path in (first, copy, other)}
    assert ident[first] == ident[copy] != ident[other]


def test_changed_images_are_refused_on_resume(tmp_path: Path) -> None:
    manifest = started_run(tmp_path / "run")
    manifest.check_fingerprint("aaaa", tmp_path)  # the first attempt records the split
    manifest.check_fingerprint("aaaa", tmp_path)  # the same images: fine
    with pytest.raises(UsageError, match="changed since this run started"):
        manifest.check_fingerprint("bbbb", tmp_path)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["split_fingerprint"] == "aaaa"


@pytest.mark.parametrize(
    ("override", "stale"),
    [
        ("export.formats=[keras]", {"export"}),
        ("latency.runs=7", {"time", "record", "export"}),
        ("latency.format=tflite_int8", {"time", "record", "export"}),
        ("latency.threads=2", {"time", "record", "export"}),
        ("evaluate.top_k=2", {"evaluate", "record", "export"}),
        ("mlflow.experiment=other", {"record", "log_model", "export"}),
        ("export.register_model=flowers", {"log_model", "export"}),
    ],
)
def test_a_changed_setting_reruns_only_the_stages_that_use_it(tmp_path: Path, override: str, stale: set[str]) -> None:
    manifest = started_run(tmp_path / "run")
    cfg = compose([FLOWERS, *QUICK])
    for stage in STAGES:
        manifest.mark(stage, stage_key(cfg, stage, manifest))
    changed = compose([FLOWERS, *QUICK, override])
    assert {stage for stage in STAGES if not manifest.done(stage, stage_key(changed, stage, manifest))} == stale


def one_class_folder(root: Path) -> Path:
    (root / "only").mkdir(parents=True)
    write_image(root / "only" / "a.png", (200, 0, 0), np.random.default_rng(0))
    return root


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_start_removes_only_what_it_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: bool
) -> None:
    data = one_class_folder(tmp_path / "data")  # found only once the job scans it: after Hydra made the folder
    run_dir = tmp_path / "runs" / "day" / "job"
    if existing:
        run_dir.mkdir(parents=True)

    status, err = run_cli(capsys, "data=folder", f"data.path={data}", *QUICK, f"hydra.run.dir={run_dir}")
    assert status == 2
    assert err.strip().splitlines()[-1].startswith("finetune: error:") and "class folder" in err
    if existing:
        assert list(run_dir.iterdir()) == []  # the user's empty folder stays, empty
    else:
        assert not (tmp_path / "runs").exists()  # the folders this run made for itself are gone
