"""Shared fixtures: tiny synthetic image folders, the shared real data, and a real CLI runner."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune  # noqa: F401  (quiets TensorFlow's C++ logging before any test imports it)
from absl import logging as absl_logging

# absl's handler (TensorFlow installs it) writes to the stderr of the moment it was made, here pytest's
# capture file, and closes that file when logging is reconfigured, as a Hydra app run in process does;
# pytest then loses its stderr. Python's own stderr is one absl never closes.
absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)

PROJECT = Path(__file__).resolve().parent.parent
SHARED = PROJECT.parent / "shared"
SHARED_FLOWERS = SHARED / "data" / "flower_photos"
SHARED_WEIGHTS = SHARED / "weights"
COLORS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))
OWN_FILES = {".git", ".venv", ".pytest_cache", "__pycache__"}  # the checkout's and Python's own, not the tests'


def project_files() -> set[Path]:
    """Every file and folder of the project, except git's, the virtual environment's and Python's caches."""
    found = set()
    for folder, subfolders, files in os.walk(PROJECT):
        subfolders[:] = [name for name in subfolders if name not in OWN_FILES and not name.endswith(".egg-info")]
        found.update(Path(folder, name) for name in subfolders + files)
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_PROJECT_BEFORE] = project_files()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when a test wrote into the project folder (an MLflow store, a run folder, ...)."""
    written = sorted(project_files() - session.config.stash[_PROJECT_BEFORE])
    if written:
        print(f"\ntests wrote into the project folder: {', '.join(str(p.relative_to(PROJECT)) for p in written[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_PROJECT_BEFORE = pytest.StashKey[set]()


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """A Hydra app run in process points the root logger at this test's captured stderr: undo that after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _outside_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary folder, with MLflow's default store there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")


def write_image(path: Path, color: tuple[int, int, int], rng: np.random.Generator, mode: str = "RGB") -> None:
    """A small noisy image of one dominant colour, in the format the suffix names."""
    pixels = np.clip(rng.normal(color, 30, (36, 44, 3)), 0, 255).astype("uint8")
    Image.fromarray(pixels).convert(mode).save(path)


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 colour classes x 14 images (JPEG, PNG, BMP, GIF, grayscale, RGBA) plus 2 unusable files."""
    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    formats = [("jpg", "RGB"), ("png", "RGB"), ("bmp", "RGB"), ("gif", "P"), ("png", "L"), ("png", "RGBA"), ("jpeg", "RGB")]
    for label, color in enumerate(COLORS):
        class_dir = root / f"class_{label}"
        class_dir.mkdir()
        for index in range(14):
            suffix, mode = formats[index % len(formats)]
            write_image(class_dir / f"img_{index}.{suffix}", color, rng, mode)
    (root / "class_0" / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    (root / "class_1" / "notes.txt").write_text("not an image")
    return root


def cli(*args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m finetune ARGS` as a user would, from cwd."""
    full_env = {key: value for key, value in os.environ.items() if key != "FINETUNE_WEIGHTS_DIR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def quick_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    """A few-second training config on synthetic images with random weights."""
    return [
        "backbone=mobilenet_v3_small",
        "backbone.weights=null",
        "backbone.input_size=32",
        "data=folder",
        f"data.path={data}",
        "data.batch_size=8",
        "train.phase1.epochs=2",
        "train.phase2.epochs=2",
        "latency.warmup=2",
        "latency.runs=5",
        "export.formats=[]",  # the export is exercised where a test asks for it
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def litert_median_ms(model_file: Path, threads: int, runs: int = 200) -> float:
    """Median time of LiteRT invocations of a TFLite file at `threads` threads, timed here without finetune.cost."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(model_file), num_threads=threads)
    interpreter.allocate_tensors()
    given = interpreter.get_input_details()[0]
    interpreter.set_tensor(given["index"], np.full(given["shape"], 128, given["dtype"]))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[runs // 10:])  # the first tenth warms up
