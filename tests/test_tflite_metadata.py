"""The stand-in for MediaPipe's missing compiled helper: the minimum metadata parser version of a metadata buffer."""

from __future__ import annotations

from collections.abc import Callable

import flatbuffers
import pytest
from mediapipe.tasks.metadata import metadata_schema_py_generated as metadata_fb

from finetune.tflite_metadata import minimum_parser_version


def packed(metadata: metadata_fb.ModelMetadataT) -> bytes:
    builder = flatbuffers.Builder(0)
    builder.Finish(metadata.Pack(builder), b"M001")
    return bytes(builder.Output())


def labels_file(**fields: object) -> metadata_fb.AssociatedFileT:
    file = metadata_fb.AssociatedFileT()
    file.name, file.type = "labels.txt", metadata_fb.AssociatedFileType.TENSOR_AXIS_LABELS
    for name, value in fields.items():
        setattr(file, name, value)
    return file


def image_classifier_metadata() -> metadata_fb.ModelMetadataT:
    """An image input with a normalization and a labelled output: the base schema's tables only."""
    normalization = metadata_fb.ProcessUnitT()
    normalization.optionsType = metadata_fb.ProcessUnitOptions.NormalizationOptions
    normalization.options = metadata_fb.NormalizationOptionsT()
    normalization.options.mean, normalization.options.std = [0.0], [1.0]
    image, probabilities = metadata_fb.TensorMetadataT(), metadata_fb.TensorMetadataT()
    image.processUnits = [normalization]
    probabilities.associatedFiles = [labels_file()]
    subgraph = metadata_fb.SubGraphMetadataT()
    subgraph.inputTensorMetadata, subgraph.outputTensorMetadata = [image], [probabilities]
    metadata = metadata_fb.ModelMetadataT()
    metadata.name, metadata.subgraphMetadata = "classifier", [subgraph]
    return metadata


def test_an_image_classifier_needs_the_base_schema_only() -> None:
    assert minimum_parser_version(packed(image_classifier_metadata())) == "1.0.0"


def with_vocabulary(metadata: metadata_fb.ModelMetadataT) -> None:
    metadata.associatedFiles = [labels_file(type=metadata_fb.AssociatedFileType.VOCABULARY)]


def with_subgraph_process_units(metadata: metadata_fb.ModelMetadataT) -> None:
    metadata.subgraphMetadata[0].inputProcessUnits = [metadata_fb.ProcessUnitT()]


def with_regex_tokenizer(metadata: metadata_fb.ModelMetadataT) -> None:
    unit = metadata.subgraphMetadata[0].inputTensorMetadata[0].processUnits[0]
    unit.optionsType, unit.options = metadata_fb.ProcessUnitOptions.RegexTokenizerOptions, metadata_fb.RegexTokenizerOptionsT()


def with_labels_version(metadata: metadata_fb.ModelMetadataT) -> None:
    metadata.subgraphMetadata[0].outputTensorMetadata[0].associatedFiles = [labels_file(version="2")]


def with_custom_metadata(metadata: metadata_fb.ModelMetadataT) -> None:
    metadata.subgraphMetadata[0].customMetadata = [metadata_fb.CustomMetadataT()]


@pytest.mark.parametrize(("change", "version"), [
    (with_vocabulary, "1.0.1"),
    (with_subgraph_process_units, "1.1.0"),
    (with_regex_tokenizer, "1.2.1"),
    (with_labels_version, "1.4.1"),
    (with_custom_metadata, "1.5.0"),
])
def test_a_newer_field_or_type_anywhere_raises_the_version(change: Callable[[metadata_fb.ModelMetadataT], None],
                                                            version: str) -> None:
    metadata = image_classifier_metadata()
    change(metadata)
    assert minimum_parser_version(packed(metadata)) == version
