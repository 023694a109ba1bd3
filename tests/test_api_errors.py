"""Mistakes made through the Python API get one clear line saying what was wrong."""

from __future__ import annotations

import re

import numpy
import pytest

from cnn_backend import Sequential, seed_cnn
from cnn_backend.data import BatchLoader
from cnn_backend.layers import Convolution, Dropout, Flatten, FullyConnected, MaxPool, ReLU, ShapeError, SoftmaxCrossEntropy
from cnn_backend.model import default_cnn, plain_cnn
from cnn_backend.serialization import ModelFileError
from cnn_backend.training import evaluate


@pytest.fixture(scope="module")
def model():
    return seed_cnn("cpu")


def test_an_empty_batch_is_refused(model):
    with pytest.raises(ShapeError, match=r"expected a batch of at least one sample, got shape \(0, 1, 28, 28\)"):
        model.forward(numpy.zeros((0, 1, 28, 28), numpy.float32))
    with pytest.raises(ShapeError, match="no samples to predict"):
        model.predict(numpy.zeros((0, 1, 28, 28), numpy.float32))


def test_labels_may_be_a_list(model):
    logits = model.forward(numpy.zeros((2, 1, 28, 28), numpy.float32))
    loss_fn = SoftmaxCrossEntropy("cpu")
    assert numpy.isclose(float(loss_fn.forward(logits, [1, 2])), float(loss_fn.forward(logits, numpy.array([1, 2]))))
    with pytest.raises(ShapeError, match="labels must be integer class indices"):
        loss_fn.forward(logits, [0.5, 1.5])


@pytest.mark.parametrize(
    "layer, gradient",
    [
        (FullyConnected(4, 3), numpy.zeros((2, 3), numpy.float32)),
        (Convolution(1, 2, 3), numpy.zeros((2, 2, 4, 4), numpy.float32)),
        (ReLU(), numpy.zeros((2, 3), numpy.float32)),
        (Flatten(), numpy.zeros((2, 3), numpy.float32)),
    ],
    ids=lambda value: type(value).__name__,
)
def test_backward_before_forward_says_so(layer, gradient):
    with pytest.raises(RuntimeError, match=r"backward needs a forward pass first"):
        layer.backward(gradient)


def _layers_used_on_their_own():
    from cnn_backend.layers import GELU, AvgPool, BatchNorm, GlobalAvgPool, LeakyReLU, Residual, Sigmoid, Tanh

    images = (2, 3, 8, 8)
    return [
        (ReLU(), images), (LeakyReLU(), images), (Tanh(), images), (Sigmoid(), images), (GELU(), images),
        (Dropout(0.5, rng=0), images), (MaxPool(2), images), (AvgPool(2), images), (GlobalAvgPool(), images),
        (BatchNorm(), images), (Convolution(out_channels=4, kernel_size=3), images), (Flatten(), images),
        (FullyConnected(out_features=5), (2, 7)), (Residual([Convolution(out_channels=3, kernel_size=3, padding=1)]), images),
    ]  # fmt: skip


@pytest.mark.parametrize("layer, input_shape", _layers_used_on_their_own(), ids=lambda value: type(value).__name__)
@pytest.mark.parametrize("wrong", ["one sample", "one more column"])
def test_backward_refuses_a_gradient_of_another_shape_and_takes_the_right_one_after(layer, input_shape, wrong):
    # A gradient of a batch of one would broadcast against a batch of two in element-wise layers:
    # refused by its shape, before the cache is consumed.
    layer.build(input_shape[1:], rng=0)
    x = numpy.random.default_rng(0).random(input_shape).astype(numpy.float32)
    y = layer(x)
    bad_shape = (1, *y.shape[1:]) if wrong == "one sample" else (*y.shape[:-1], y.shape[-1] + 1)
    message = rf"backward needs a gradient of the forward pass's output shape {re.escape(str(tuple(y.shape)))}, got shape {re.escape(str(bad_shape))}$"
    with pytest.raises(ShapeError, match=message):
        layer.backward(numpy.ones(bad_shape, numpy.float32))
    dx = layer.backward(numpy.ones(y.shape, numpy.float32))
    assert dx.shape == x.shape


def test_backward_of_a_model_before_forward_says_so():
    message = r"^Sequential.backward: no complete forward pass to backpropagate through \(none yet, or the last one failed\); call the model on a batch first$"
    with pytest.raises(RuntimeError, match=message):
        seed_cnn("cpu").backward(numpy.zeros((2, 10), numpy.float32))
    # A forward pass that failed part-way replaced some layers' caches: no backward through it either.
    model = default_cnn("cpu")
    model(numpy.zeros((4, 1, 28, 28)))
    with pytest.raises(ShapeError):
        model(numpy.zeros((4, 1, 32, 32)))
    with pytest.raises(RuntimeError, match=message):
        model.backward(numpy.zeros((4, 10), numpy.float32))


@pytest.mark.parametrize(
    "gradient, message",
    [(numpy.zeros((3, 10), numpy.float32), "got shape (3, 10)"), (numpy.zeros((4, 9), numpy.float32), "got shape (4, 9)"),
     (None, "got a NoneType"), ([[0.0] * 10] * 4, "got a list")],
    ids=["batch", "classes", "none", "list"],
)
def test_a_gradient_not_of_the_outputs_shape_is_refused(gradient, message):
    model = default_cnn("cpu")
    model(numpy.random.default_rng(0).random((4, 1, 28, 28)))
    with pytest.raises(ShapeError, match=r"^Sequential.backward: the gradient must be an array of the output's shape \(4, 10\), " + re.escape(message)):
        model.backward(gradient)


def test_backward_after_predict_is_refused_instead_of_using_the_predictions_caches():
    model = default_cnn("cpu")
    rng = numpy.random.default_rng(0)
    model(rng.random((4, 1, 28, 28)))
    model.predict(rng.random((4, 1, 28, 28)))  # the same batch size: the caches would fit, wrongly
    with pytest.raises(RuntimeError, match=r"predict ran after the forward pass and replaced what backward needs"):
        model.backward(numpy.ones((4, 10), numpy.float32))
    model(rng.random((4, 1, 28, 28)))
    assert model.backward(numpy.ones((4, 10), numpy.float32)) is None  # a fresh forward pass: fine again


def test_a_model_of_something_that_is_not_a_layer_is_refused():
    with pytest.raises(ValueError, match=r"^Sequential: item 1 is a str \('x'\), not a layer; pass layer objects"):
        Sequential([ReLU(), "x"])


def test_numpy_integers_are_integers():
    layer = Convolution(numpy.int64(1), numpy.int32(3), numpy.uint8(3), stride=numpy.int16(1), padding=numpy.int64(1))
    assert layer.config()["in_channels"] == 1 and type(layer.in_channels) is int and type(layer.padding) is int
    assert MaxPool(numpy.int64(2)).pool_size == 2
    assert FullyConnected(numpy.int64(4), numpy.int64(2)).params["weight"].data.shape == (4, 2)
    Dropout(0.5, rng=numpy.int64(3))
    seed_cnn("cpu", seed=numpy.int64(7))
    model = seed_cnn("cpu")
    assert model.predict(numpy.zeros((3, 1, 28, 28), numpy.float32), batch_size=numpy.int64(2)).shape == (3,)
    BatchLoader(numpy.zeros((4, 28, 28), numpy.uint8), numpy.zeros(4, numpy.int64), model.backend, numpy.int64(2))


@pytest.mark.parametrize("value", [True, 1.0, "3", 0])
def test_sizes_that_are_not_positive_integers_are_refused(value):
    with pytest.raises(ValueError, match=r"Convolution: out_channels must be an integer >= 1, got"):
        Convolution(1, value, 3)


@pytest.mark.parametrize("seed", [-1, 1.5, "0"])
def test_a_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer >= 0, got {seed!r}"):
        seed_cnn("cpu", seed=seed)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0"):
        plain_cnn("cpu", seed=seed)


@pytest.mark.parametrize("bad", [numpy.nan, numpy.inf])
def test_nan_or_infinite_input_is_refused_not_predicted(model, bad):
    images = numpy.zeros((5, 1, 28, 28), numpy.float32)
    images[[1, 3], 0, 4, 4] = bad
    with pytest.raises(ShapeError, match=r"2 of 5 samples contain NaN or infinity"):
        model.predict(images, batch_size=2)
    with pytest.raises(ShapeError, match=r"2 of 5 samples contain NaN or infinity"):
        evaluate(model, images, numpy.zeros(5, numpy.int64))


def test_loading_a_file_that_is_not_a_zip_gives_this_librarys_message(tmp_path):
    path = tmp_path / "model.npz"
    path.write_bytes(b"#!/bin/sh\necho not a model\n")
    with pytest.raises(ModelFileError) as info:
        Sequential.load(path)
    message = str(info.value)
    assert message == f"{path}: not an .npz archive (no zip structure: truncated, or another kind of file)"


def test_loading_a_model_file_with_a_broken_config_is_one_line(tmp_path):
    path = tmp_path / "model.npz"
    numpy.savez(path, __model_config__=numpy.array("{not json"))
    with pytest.raises(ModelFileError, match=r"model.npz: the model config is not valid JSON"):
        Sequential.load(path)
    numpy.savez(path, __model_config__=numpy.array('[{"type": "Teleporter", "args": {}}]'), **{"param/0.weight": numpy.zeros(3)})
    with pytest.raises(ModelFileError, match=r"model.npz: unknown or malformed layer"):
        Sequential.load(path)


def test_nan_input_is_refused_on_a_device_for_host_and_device_input(device_under_test):
    backend = device_under_test("float32")
    model = seed_cnn(backend)
    images = numpy.zeros((5, 1, 28, 28), numpy.float32)
    images[4, 0, 0, 0] = numpy.nan
    for given in (images, backend.to_device(images)):
        with pytest.raises(ShapeError, match=r"1 of 5 samples contain NaN or infinity"):
            model.predict(given, batch_size=2)
    clean = numpy.zeros((3, 1, 28, 28), numpy.float32)
    numpy.testing.assert_allclose(model.predict(clean), seed_cnn("cpu").predict(clean))


def test_a_batch_of_another_sample_shape_is_named_beside_the_layer_that_fails():
    with pytest.raises(ShapeError, match=re.escape(
        "FullyConnected(2352->384): expected input of shape (N, 2352), got (2, 3072); the model was built for samples "
        "of shape (1, 28, 28), this batch's are (1, 32, 32)")):
        default_cnn("cpu")(numpy.zeros((2, 1, 32, 32)))


def test_a_hand_built_model_has_a_summary_once_a_batch_gave_its_input_shape():
    from cnn_backend.summary import format_summary

    model = Sequential([Flatten(), FullyConnected(16, 4), ReLU()], "cpu")
    with pytest.raises(ValueError, match="the model has no input shape yet: .* or run it on a batch first"):
        model.summary()
    model(numpy.zeros((2, 1, 4, 4)))
    assert format_summary(model.summary()).splitlines()[-1] == (
        "total: 68 parameters (272 B as float32), 0 buffer values (0 B), 64 MACs per sample")


def test_numpy_shapes_and_class_counts_are_integers_and_a_text_class_count_is_refused():
    from cnn_backend.spec import build_model

    model = build_model("default", numpy.array([1, 28, 28]), num_classes=numpy.int64(10))
    assert model.input_shape == (1, 28, 28) and all(type(size) is int for size in model.input_shape)
    with pytest.raises(ValueError, match=r"^num_classes must be an integer >= 1, got '10'$"):
        build_model("default", (1, 28, 28), num_classes="10")


@pytest.mark.parametrize("dtype", [numpy.complex64, numpy.str_, object])
def test_input_that_is_not_real_numbers_is_refused(dtype):
    with pytest.raises(ValueError, match=r"^Sequential: expected real numbers, got an array of dtype "):
        seed_cnn("cpu")(numpy.zeros((2, 1, 28, 28), dtype=dtype))


def test_evaluate_refuses_labels_that_do_not_match_the_images(model):
    images = numpy.random.default_rng(0).random((6, 1, 28, 28), dtype=numpy.float32)
    labels = numpy.arange(6) % 10
    expected = r"evaluate: expected labels of shape \(6,\), one class index per image, got "
    with pytest.raises(ValueError, match=expected + r"\(6, 1\)"):
        evaluate(model, images, labels[:, None])  # scored as 36 pairs, it gave an accuracy above 1
    with pytest.raises(ValueError, match=expected + r"\(4,\)"):
        evaluate(model, images, labels[:4])  # only the first four images were scored
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        evaluate(model, images, labels, batch_size=0)
    assert 0.0 <= evaluate(model, images, labels)["accuracy"] <= 1.0


def test_raw_pixels_are_refused_by_prediction_and_evaluation(model):
    pixels = numpy.random.default_rng(1).integers(0, 256, (3, 1, 28, 28), dtype=numpy.uint8)
    message = r"the input holds uint8 values, not floats; pass images scaled to \[0, 1\] \(images / 255\)"
    for call in (lambda: model.predict(pixels), lambda: evaluate(model, pixels, numpy.zeros(3, numpy.int64))):
        with pytest.raises(ShapeError, match=message):
            call()
    with pytest.raises(ShapeError, match=r"^Sequential: the input holds uint8 values, not floats"):
        model(pixels)
    assert model.predict(pixels / 255.0).shape == (3,)
