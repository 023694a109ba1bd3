"""Host-side preparation for any image shape: colour batches, per-channel normalisation (host and
device, CPU and stand-in), the stratified hold-out, and crop-flip on colour images."""

from __future__ import annotations

import re

import numpy
import pytest

from cnn_backend.augment import RandomCropFlip
from cnn_backend.backend import get_backend
from cnn_backend.data import BatchLoader, DataError, Normalization, prepare_images, stratified_holdout
from cnn_backend.testing import is_device_array, standin_backend


def colour_images(count=12, seed=0, shape=(3, 5, 7)):
    return numpy.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=numpy.uint8)


def test_normalization_measures_each_channel_in_unit_range():
    images = colour_images(20)
    norm = Normalization.from_images(images, chunk=7)  # several chunks
    scaled = images.astype(numpy.float64) / 255
    numpy.testing.assert_allclose(norm.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
    numpy.testing.assert_allclose(norm.std, scaled.std(axis=(0, 2, 3)), rtol=1e-9)
    assert Normalization.from_config(norm.config()).config() == norm.config()
    assert Normalization.from_config(None) is None
    flat = numpy.full((3, 2, 4, 4), 7, dtype=numpy.uint8)
    assert Normalization.from_images(flat).std == (1.0, 1.0)  # a constant channel is not divided by zero
    with pytest.raises(ValueError, match="std must be positive"):
        Normalization([0.5], [0.0])


def test_prepare_images_normalises_per_channel():
    images = colour_images(4)
    norm = Normalization([0.1, 0.5, 0.9], [0.2, 0.25, 0.5])
    prepared = prepare_images(images, "float64", norm)
    expected = (images / 255.0 - numpy.array([0.1, 0.5, 0.9])[:, None, None]) / numpy.array([0.2, 0.25, 0.5])[:, None, None]
    numpy.testing.assert_allclose(prepared, expected, rtol=1e-12, atol=1e-12)
    assert prepare_images(images, "float32", norm).dtype == numpy.float32
    with pytest.raises(ValueError, match="the normalisation has 3 channels, the images have 1"):
        prepare_images(images[:, :1], "float32", norm)


@pytest.mark.parametrize("where", ["cpu", "standin"])
@pytest.mark.parametrize("max_device_bytes", [1 << 30, 0], ids=["resident", "per-batch"])
def test_colour_batches_match_the_host_preparation(where, max_device_bytes):
    backend = get_backend("cpu", "float64") if where == "cpu" else standin_backend("float64")
    images, labels = colour_images(10), numpy.arange(10) % 4
    norm = Normalization.from_images(images)
    loader = BatchLoader(images, labels, backend, 4, seed=3, normalization=norm, max_device_bytes=max_device_bytes, num_classes=4)
    expected = prepare_images(images, "float64", norm)
    order = loader.order(0)
    seen = 0
    for x, y in loader.epoch(0):
        assert x.shape[1:] == (3, 5, 7) and x.dtype == numpy.float64
        if where == "standin":
            assert is_device_array(x) and is_device_array(y)
        index = order[seen:seen + len(y)]
        numpy.testing.assert_allclose(backend.to_numpy(x), expected[index], rtol=1e-12, atol=1e-12)
        numpy.testing.assert_array_equal(backend.to_numpy(y), labels[index])
        seen += len(y)
    assert seen == 10


def test_batch_loader_checks_labels_against_the_class_count():
    images = colour_images(3)
    BatchLoader(images, numpy.array([0, 11, 12]), get_backend("cpu"), 2, num_classes=13)
    with pytest.raises(DataError, match=r"labels must be class indices 0-3; found 11 at record 1"):
        BatchLoader(images, numpy.array([0, 11, 2]), get_backend("cpu"), 2, num_classes=4)
    with pytest.raises(ValueError, match="the normalisation has 1 channels, the images have 3"):
        BatchLoader(images, numpy.zeros(3, dtype=int), get_backend("cpu"), 2, normalization=Normalization([0.5], [0.5]))


def test_stratified_holdout_takes_the_fraction_of_every_class():
    labels = numpy.array([0] * 10 + [1] * 20 + [2] * 3 + [3] * 2)
    numpy.random.default_rng(0).shuffle(labels)
    train, validation = stratified_holdout(labels, 0.2, seed=5)
    assert numpy.all(numpy.diff(train) > 0) and numpy.all(numpy.diff(validation) > 0)
    assert len(numpy.intersect1d(train, validation)) == 0 and len(train) + len(validation) == len(labels)
    held = numpy.bincount(labels[validation], minlength=4).tolist()
    assert held == [2, 4, 1, 1]  # 20% rounded, at least one, never a whole class
    again = stratified_holdout(labels, 0.2, seed=5)
    numpy.testing.assert_array_equal(again[1], validation)
    assert not numpy.array_equal(stratified_holdout(labels, 0.2, seed=6)[1], validation)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_holdout(labels, 1.0)
    with pytest.raises(DataError, match=r"leaves no validation images \(every class has one image\): add images to the classes, or choose the validation images yourself \(--train-split and --val-split\)$"):
        stratified_holdout(numpy.array([0, 1, 2]), 0.5)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_crop_flip_moves_every_channel_together(channels):
    backend = standin_backend("float64")
    host = numpy.random.default_rng(1).standard_normal((6, channels, 5, 7))
    out = backend.to_numpy(RandomCropFlip(backend, padding=1, flip_probability=0.5, seed=2)(backend.to_device(host), 1, 0))
    assert out.shape == host.shape
    padded = numpy.pad(host, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for sample in range(6):  # each output is one crop (or its mirror) applied to all channels alike
        matches = [
            (top, left, flip)
            for top in range(3) for left in range(3) for flip in (False, True)
            if numpy.array_equal(out[sample], (lambda crop: crop[..., ::-1] if flip else crop)(padded[sample, :, top:top + 5, left:left + 7]))
        ]
        assert matches, sample


def test_normalised_colour_batches_and_crop_flip_match_the_cpu(device_under_test):
    """Parity: the device (stand-in, or the GPU under ``-m gpu``) gives the CPU's batches bit for bit."""
    images, labels = colour_images(10, seed=4), numpy.arange(10) % 3
    norm = Normalization.from_images(images)
    results = []
    for backend in (get_backend("cpu", "float32"), device_under_test("float32")):
        loader = BatchLoader(images, labels, backend, 4, seed=1, normalization=norm, num_classes=3)
        augment = RandomCropFlip(backend, padding=2, seed=7)
        results.append([(backend.to_numpy(augment(x, 0, step)), backend.to_numpy(y)) for step, (x, y) in enumerate(loader.epoch(2))])
    for (cpu_x, cpu_y), (device_x, device_y) in zip(*results):
        numpy.testing.assert_allclose(device_x, cpu_x, rtol=1e-6, atol=1e-6)
        numpy.testing.assert_array_equal(device_y, cpu_y)


def test_normalization_from_images_refuses_floats_and_takes_single_channel_images():
    pixels = numpy.random.default_rng(0).integers(0, 256, (5, 6, 7), dtype=numpy.uint8)
    with pytest.raises(ValueError, match=r"^Normalization.from_images: expected uint8 pixels \(0-255\), got float32; pass the raw images"):
        Normalization.from_images(pixels.astype(numpy.float32) / 255)
    single = Normalization.from_images(pixels)  # (N, H, W): one channel, as BatchLoader and prepare_images take it
    numpy.testing.assert_allclose(single.mean, [pixels.mean() / 255], rtol=1e-12)
    numpy.testing.assert_allclose(single.std, [pixels.std() / 255], rtol=1e-9)


@pytest.mark.parametrize(
    "who, call",
    [
        ("BatchLoader", lambda images: BatchLoader(images, numpy.arange(len(images)) % 2, "cpu", 2, num_classes=2)),
        ("prepare_images", prepare_images),
        ("Normalization.from_images", Normalization.from_images),
    ],
)
def test_channels_last_images_are_refused_saying_how_to_transpose_them(who, call):
    # (N, H, W, C) pixels, as Pillow, Keras and OpenCV give them, would be read as 28 channels of 28x3.
    images = numpy.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), dtype=numpy.uint8)
    with pytest.raises(ValueError, match=rf"^{re.escape(who)}: images of shape \(4, 28, 28, 3\) look like \(N, H, W, C\), 3 channels last; "
                                         r"pass images.transpose\(0, 3, 1, 2\), of shape \(N, C, H, W\)$"):
        call(images)
    call(images.transpose(0, 3, 1, 2))  # the same images, channels first


def test_float_input_shaped_like_channels_last_is_taken_as_given():
    # (N, 12, 64, 1): twelve channels of 64 x 1 signals, float: any data goes through as it is
    signals = numpy.random.default_rng(0).random((4, 12, 64, 1)).astype(numpy.float32)
    x, _ = next(iter(BatchLoader(signals, numpy.arange(4) % 2, "cpu", 4, num_classes=2).epoch(1)))
    assert x.shape == (4, 12, 64, 1)
