"""InputSpec: what a model expects as input, as recorded in checkpoints and assumed for older files."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend.data import Normalization
from cnn_backend.datasets import DataError, LabelledImages
from cnn_backend.inputs import InputSpec


def test_config_round_trip_and_malformed_configs():
    spec = InputSpec(("cat", "dog"), 3, (32, 24), Normalization([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]))
    again = InputSpec.from_config(spec.config())
    assert again.config() == spec.config() and again.input_shape == (3, 32, 24) and again.recorded
    assert "normalised per channel" in again.describe()
    for broken in ({}, {**spec.config(), "channels": 2}, {**spec.config(), "image_size": [32]}, {**spec.config(), "class_names": []}):
        with pytest.raises(ValueError, match="malformed input description"):
            InputSpec.from_config(broken)


def test_legacy_files_are_read_as_fashion_mnist():
    legacy = InputSpec.legacy()
    assert legacy.input_shape == (1, 28, 28) and legacy.class_names[9] == "Ankle boot" and not legacy.recorded
    assert "assumed" in legacy.describe()
    assert InputSpec.legacy(3).class_names == ("class 0", "class 1", "class 2")
    assert InputSpec.legacy(10, [3, 32, 32]).input_shape == (3, 32, 32)  # a model config that names its input shape


def test_check_refuses_other_shapes_and_class_counts():
    spec = InputSpec(("a", "b"), 1, (4, 4))
    data = LabelledImages(numpy.zeros((2, 3, 4, 4), dtype=numpy.uint8), numpy.array([0, 1]), ("a", "b"))
    with pytest.raises(DataError, match=r"the model was trained on 1x4x4 images but this data has 3x4x4 ones"):
        spec.check(data, "this data")
    three = LabelledImages(numpy.zeros((2, 1, 4, 4), dtype=numpy.uint8), numpy.array([0, 1]), ("a", "b", "c"))
    with pytest.raises(DataError, match="the model knows 2 classes but this data has 3"):
        spec.check(three, "this data")


def test_names_that_differ_where_one_side_is_assumed_are_paired_by_index_with_a_note():
    spec = InputSpec(("cat", "dog"), 1, (4, 4))
    images = numpy.zeros((2, 1, 4, 4), dtype=numpy.uint8)
    assumed = LabelledImages(images, numpy.array([0, 1]), ("T-shirt/top", "Trouser"), names_assumed=True)
    note = spec.check(assumed, "--data idx")
    assert note == ("--data idx names its classes T-shirt/top, Trouser and the model cat, dog, one of them assumed "
                    "(IDX files store no names): its labels are paired with the model's classes by index")
    assert spec.check(LabelledImages(images, numpy.array([0, 1]), ("cat", "dog")), "--data same") is None
