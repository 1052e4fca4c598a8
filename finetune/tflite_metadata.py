"""TFLite metadata in every exported TFLite file, written with MediaPipe's metadata writer (the `mediapipe` package).

What a client needs to run the file without the bundle around it: an RGB image input of the model's size with a
normalization of mean 0 / std 1 (every artifact normalizes inside, so clients feed raw 0..255 pixels and must not
normalize again), the labels in output order as an associated file, and the model's name, version and description.
MediaPipe Tasks' ImageClassifier refuses a float model without the normalization, and returns no class names
without the labels.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

import flatbuffers

# At import time, not in a function: `mediapipe` keeps the traceback of an optional import of its own (sounddevice),
# and with it every frame that was on the stack when it was first imported, locals included.
from mediapipe.tasks.metadata import metadata_schema_py_generated as metadata_fb

RAW_PIXELS_MEAN, RAW_PIXELS_STD = [0.0], [1.0]  # the artifacts take 0..255 pixel values as they are
_MISSING_MODULE = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"


def add_metadata(model_file: Path, labels_file: Path, export_metadata: dict[str, Any]) -> None:
    """Rewrite a TFLite classifier file with its metadata and `labels_file` packed in."""
    metadata = _mediapipe_writer()[0]
    model = model_file.read_bytes()
    populator = metadata.MetadataPopulator.with_model_buffer(model)
    populator.load_metadata_buffer(metadata_buffer(model, labels_file, export_metadata))
    populator.load_associated_files([str(labels_file)])
    populator.populate()
    model_file.write_bytes(populator.get_model_buffer())


def metadata_buffer(model: bytes, labels_file: Path, export_metadata: dict[str, Any]) -> bytes:
    """The metadata flatbuffer of a classifier: raw RGB pixels in, probabilities named by `labels_file` out.

    Built from the parts MediaPipe's `image_classifier.MetadataWriter` is made of (metadata_info's containers):
    that writer names every model "ImageClassifier" and has no version.
    """
    metadata, metadata_info, writer_utils = _mediapipe_writer()
    image = metadata_info.InputImageTensorMd(
        name="image",
        description="RGB image, raw 0..255 pixel values (the model normalizes inside)",
        norm_mean=RAW_PIXELS_MEAN,
        norm_std=RAW_PIXELS_STD,
        color_space_type=metadata_fb.ColorSpaceType.RGB,
        tensor_type=writer_utils.get_input_tensor_types(model)[0],
    )
    probabilities = metadata_info.ClassificationTensorMd(
        name="probability",
        description="Probability of each class, in the order of the labels file",
        label_files=[metadata_info.LabelFileMd(str(labels_file))],
        tensor_type=writer_utils.get_output_tensor_types(model)[0],
    )
    subgraph = metadata_fb.SubGraphMetadataT()
    subgraph.inputTensorMetadata = [image.create_metadata()]
    subgraph.outputTensorMetadata = [probabilities.create_metadata()]
    model_metadata = metadata_info.GeneralMd(
        name=model_name(export_metadata),
        version=export_metadata.get("mlflow_run_id"),
        description=model_description(export_metadata),
    ).create_metadata()
    model_metadata.subgraphMetadata = [subgraph]
    builder = flatbuffers.Builder(0)
    builder.Finish(model_metadata.Pack(builder), metadata.MetadataPopulator.METADATA_FILE_IDENTIFIER)
    return bytes(builder.Output())


def model_name(export_metadata: dict[str, Any]) -> str:
    """E.g. "mobilenet_v3_small fine-tuned on flower_photos"."""
    return f"{export_metadata['backbone']['name']} fine-tuned on {dataset_name(export_metadata['dataset'])}"


def dataset_name(dataset: dict[str, Any]) -> str:
    """The dataset as people name it: a folder of images (`data=folder`) by its folder's name."""
    return Path(dataset["root"]).name if dataset["name"] == "folder" else dataset["name"]


def model_description(export_metadata: dict[str, Any]) -> str:
    """Backbone, dataset and MLflow run, in one paragraph."""
    backbone, dataset, size = export_metadata["backbone"], export_metadata["dataset"], export_metadata["input_size"]
    settings = ", ".join(f"{key} {value}" for key, value in backbone.items() if key in ("alpha", "minimalistic"))
    run = export_metadata.get("mlflow_run_id")
    return (
        f"Image classifier: {backbone['name']}{f' ({settings})' if settings else ''} fine-tuned by finetune on "
        f"{dataset_name(dataset)} (split fingerprint {dataset['fingerprint']}); "
        f"{f'MLflow run {run}' if run else 'no MLflow run'}. "
        f"Input: {size}x{size} RGB, raw 0..255 pixel values. Output: class probabilities in the order of labels.txt."
    )


def displayer(model_file: Path) -> Any:
    """MediaPipe's MetadataDisplayer of a TFLite file: its metadata as JSON and its packed files."""
    metadata = _mediapipe_writer()[0]
    return metadata.MetadataDisplayer.with_model_buffer(model_file.read_bytes())


def _mediapipe_writer() -> tuple[types.ModuleType, ...]:
    """MediaPipe's metadata writer modules: populator and displayer, metadata containers, model reader."""
    _provide_metadata_version()
    from mediapipe.tasks.python.metadata import metadata
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_info, writer_utils

    return metadata, metadata_info, writer_utils


def _provide_metadata_version() -> None:
    """Shim for the one compiled helper the `mediapipe` 1.x wheels lack.

    `mediapipe.tasks.python.metadata` imports `_pywrap_metadata_version` (built from C++ in MediaPipe's source tree,
    not shipped in the 1.x wheels) for one function: the minimum metadata parser version of a metadata buffer, which
    the populator writes into the file. `minimum_parser_version` computes it from the schema's history instead.
    A wheel that ships the module is used as it is.
    """
    try:
        importlib.import_module(_MISSING_MODULE)  # a wheel that ships it, or the stand-in made before
    except ImportError:
        package_name, _, module_name = _MISSING_MODULE.rpartition(".")
        module = types.ModuleType(_MISSING_MODULE, "finetune's stand-in (finetune.tflite_metadata)")
        module.GetMinimumMetadataParserVersion = minimum_parser_version
        package = types.ModuleType(package_name)
        setattr(package, module_name, module)
        sys.modules[package_name] = package
        sys.modules[_MISSING_MODULE] = module


_ADDED_IN_BY_TYPE = {  # the history in MediaPipe's metadata_schema.fbs (mediapipe/tasks/metadata/)
    metadata_fb.BertTokenizerOptionsT: "1.1.0",
    metadata_fb.SentencePieceTokenizerOptionsT: "1.1.0",
    metadata_fb.RegexTokenizerOptionsT: "1.2.1",
    metadata_fb.AudioPropertiesT: "1.3.0",
}
_ADDED_IN_BY_FIELD = {
    (metadata_fb.SubGraphMetadataT, "inputProcessUnits"): "1.1.0",
    (metadata_fb.SubGraphMetadataT, "outputProcessUnits"): "1.1.0",
    (metadata_fb.SubGraphMetadataT, "inputTensorGroups"): "1.2.0",
    (metadata_fb.SubGraphMetadataT, "outputTensorGroups"): "1.2.0",
    (metadata_fb.SubGraphMetadataT, "customMetadata"): "1.5.0",
    (metadata_fb.AssociatedFileT, "version"): "1.4.1",
}
_ADDED_IN_BY_FILE_TYPE = {
    metadata_fb.AssociatedFileType.VOCABULARY: "1.0.1",
    metadata_fb.AssociatedFileType.SCANN_INDEX_FILE: "1.4.0",
}
_BASE_VERSION = "1.0.0"


def minimum_parser_version(metadata_buffer: bytes) -> str:
    """The lowest metadata schema version that has every table, field and file type the buffer uses."""
    versions = [_BASE_VERSION]
    for table in _tables(metadata_fb.ModelMetadataT.InitFromPackedBuf(bytes(metadata_buffer))):
        versions.append(_ADDED_IN_BY_TYPE.get(type(table), _BASE_VERSION))
        versions += [added_in for (kind, field), added_in in _ADDED_IN_BY_FIELD.items()
                     if isinstance(table, kind) and getattr(table, field)]
        if isinstance(table, metadata_fb.AssociatedFileT):
            versions.append(_ADDED_IN_BY_FILE_TYPE.get(table.type, _BASE_VERSION))
    return max(versions, key=lambda version: tuple(int(part) for part in version.split(".")))


def _tables(table: Any) -> list[Any]:
    """A flatbuffers object-API table and every table inside it, depth first."""
    found = [table]
    for value in vars(table).values():
        for item in value if isinstance(value, list) else [value]:
            if hasattr(item, "__dict__"):
                found += _tables(item)
    return found
