"""`finetune predict BUNDLE PATH...`: top-k labels for image files and folders with any artifact of a bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finetune.artifacts import FORMATS, artifact_path
from finetune.bundle_folder import find_bundle
from finetune.config import UsageError

PREFERRED_FORMATS = ("tflite_float32", "tflite_float16", "tflite_dynamic", "tflite_int8", "saved_model", "keras")


def choose_format(bundle: Path, requested: str | None) -> str:
    """The requested format, or the first TFLite (then other) artifact the bundle has."""
    for name in ("labels.txt", "metadata.json"):
        if not (bundle / name).is_file():
            raise UsageError(f"{bundle} is not a complete export bundle (no {name}); export a run with `finetune export RUN`")
    if requested:
        if not artifact_path(bundle, requested).exists():
            raise UsageError(f"bundle {bundle} has no {requested} artifact; it has: {', '.join(available(bundle))}")
        return requested
    formats = available(bundle)
    if not formats:
        raise UsageError(f"bundle {bundle} has no model artifact")
    return formats[0]


def available(bundle: Path) -> list[str]:
    """Formats present in the bundle, most preferred first."""
    return [fmt for fmt in PREFERRED_FORMATS if artifact_path(bundle, fmt).exists()]


def image_files(paths: list[str]) -> list[Path]:
    """Named files as given, and the image files inside named folders (recursively, sorted)."""
    from finetune.dataset import IMAGE_EXTENSIONS

    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(path)
    return files


def predict_files(bundle: Path, fmt: str, files: list[Path], top_k: int) -> list[dict[str, Any]]:
    """One record per file: its top-k predictions, or the reason it could not be read."""
    import tensorflow as tf

    from finetune.artifacts import load_predictor
    from finetune.dataset import load_image
    from finetune.decode_check import DECODE_ERRORS, decode_error_reason

    labels = (bundle / "labels.txt").read_text().splitlines()
    size = json.loads((bundle / "metadata.json").read_text())["input_size"]
    predictor = load_predictor(bundle, fmt)
    records = []
    for path in files:
        try:
            image = load_image(tf.constant(str(path)), size).numpy()
        except DECODE_ERRORS as error:
            records.append({"path": str(path), "error": f"not a readable image ({decode_error_reason(error)})"})
            continue
        probabilities = predictor(image[None])[0]
        best = (-probabilities).argsort(kind="stable")[: min(top_k, len(labels))]  # ties: lower index first, as argmax
        records.append({
            "path": str(path),
            "predictions": [{"label": labels[i], "probability": round(float(probabilities[i]), 4)} for i in best],
        })
    return records


def main(argv: list[str] | None = None) -> None:
    """Command line of `python -m finetune.predict` / `finetune predict`; exit 1 when a file failed."""
    from finetune.cli import fail

    parser = argparse.ArgumentParser(prog="finetune predict", description=__doc__)
    parser.add_argument("bundle", help="an export bundle folder (<run dir>/export)")
    parser.add_argument("paths", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--format", choices=FORMATS, help="artifact to run (default: the bundle's first TFLite model)")
    parser.add_argument("--top-k", type=int, default=3, help="labels to show per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    bundle = find_bundle(Path(args.bundle).expanduser())  # `.old` if an export crashed mid-swap
    try:
        if not bundle.is_dir():
            raise UsageError(f"bundle {bundle} is not a folder; give an export bundle (<run dir>/export)")
        fmt = choose_format(bundle, args.format)
        files = image_files(args.paths)
        if not files:
            raise UsageError(f"no image files found in {', '.join(args.paths)}")
    except UsageError as error:
        fail(error)
    records = predict_files(bundle, fmt, files, args.top_k)
    if args.json:
        print(json.dumps({"bundle": str(bundle), "format": fmt, "results": records}, indent=1))
    for record in records:
        if "error" in record:
            print(f"{record['path']}: error: {record['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{record['path']}: " + ", ".join(f"{p['label']} {p['probability']:.3f}" for p in record["predictions"]))
    sys.exit(1 if any("error" in record for record in records) else 0)


if __name__ == "__main__":
    main()
