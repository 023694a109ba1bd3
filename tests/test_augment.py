"""Random crop + flip: every output is a shifted (and maybe mirrored) copy of its input, seeded."""

from __future__ import annotations

import numpy
import pytest

from cnn_backend import get_backend
from cnn_backend.augment import RandomCropFlip, make_augmentation


def reference(image, top, left, flip, padding):
    padded = numpy.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    h, w = image.shape[1:]
    crop = padded[:, top : top + h, left : left + w]
    return crop[:, :, ::-1] if flip else crop


@pytest.mark.parametrize("name, padding, flips", [("crop1-flip", 1, True), ("crop-flip", 2, True), ("crop1", 1, False), ("crop", 2, False)])
def test_each_sample_is_a_crop_of_the_padded_input_or_its_mirror(name, padding, flips):
    x = numpy.random.default_rng(0).random((1024, 2, 6, 5), dtype=numpy.float32)
    y = make_augmentation(name, get_backend("cpu"), seed=3)(x, epoch=1, step=1)
    assert y.shape == x.shape and y.dtype == numpy.float32
    offsets = range(2 * padding + 1)
    seen = set()
    for n in range(len(x)):
        matches = [
            (top, left, flip)
            for top in offsets
            for left in offsets
            for flip in (False, True)
            if numpy.array_equal(y[n], reference(x[n], top, left, flip, padding))
        ]
        assert len(matches) == 1, f"sample {n} is not one crop of its input padded by {padding}"
        seen.add(matches[0])
    # every shift of up to `padding` pixels each way occurs, mirrored or not where the name flips
    assert seen == {(top, left, flip) for top in offsets for left in offsets for flip in ((False, True) if flips else (False,))}


def test_same_seed_epoch_step_same_batch_otherwise_different():
    be = get_backend("cpu")
    x = numpy.random.default_rng(1).random((16, 1, 8, 8), dtype=numpy.float32)
    aug = RandomCropFlip(be, padding=2, seed=5)
    numpy.testing.assert_array_equal(aug(x, 2, 7), RandomCropFlip(be, padding=2, seed=5)(x, 2, 7))
    assert not numpy.array_equal(aug(x, 2, 7), aug(x, 2, 8))
    assert not numpy.array_equal(aug(x, 2, 7), aug(x, 3, 7))


def test_no_padding_no_flip_is_the_identity():
    be = get_backend("cpu")
    x = numpy.random.default_rng(2).random((4, 1, 5, 5), dtype=numpy.float32)
    numpy.testing.assert_array_equal(RandomCropFlip(be, padding=0, flip_probability=0.0)(x, 1, 1), x)


def test_always_flip_mirrors_every_sample():
    be = get_backend("cpu")
    x = numpy.random.default_rng(3).random((4, 1, 5, 5), dtype=numpy.float32)
    numpy.testing.assert_array_equal(RandomCropFlip(be, padding=0, flip_probability=1.0)(x, 1, 1), x[..., ::-1])


@pytest.mark.parametrize("kwargs, message", [({"padding": -1}, "padding must be >= 0"), ({"flip_probability": 2.0}, r"flip_probability must be in \[0, 1\]")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomCropFlip(get_backend("cpu"), **kwargs)


def test_augmentations_by_name():
    be = get_backend("cpu")
    assert make_augmentation("none", be) is None
    assert [(a.padding, a.flip_probability, a.seed) for a in (make_augmentation(name, be, seed=4) for name in ("flip", "crop1-flip", "crop-flip"))] == [
        (0, 0.5, 4), (1, 0.5, 4), (2, 0.5, 4)]
    with pytest.raises(ValueError, match=r"unknown augmentation 'mixup'; choose one of none, flip, crop1-flip, crop-flip"):
        make_augmentation("mixup", be)


def test_flip_mirrors_some_samples_and_shifts_none():
    x = numpy.random.default_rng(4).random((32, 1, 6, 5), dtype=numpy.float32)
    y = make_augmentation("flip", get_backend("cpu"), seed=2)(x, epoch=1, step=3)
    mirrored = [bool(numpy.array_equal(y[n], x[n, :, :, ::-1])) for n in range(len(x))]
    unchanged = [bool(numpy.array_equal(y[n], x[n])) for n in range(len(x))]
    assert all(m != u for m, u in zip(mirrored, unchanged)), "each sample is its input or its mirror, nothing else"
    assert 0 < sum(mirrored) < len(x)


@pytest.mark.parametrize("backend", ["cpu", "standin"])
def test_normalised_images_are_padded_with_black_as_normalised(backend):
    # Cropping normalised images equals normalising cropped ones: the shifted-in border is black
    # either way (torchvision's RandomCrop before Normalize), not the mean colour that 0 would be.
    from cnn_backend.data import Normalization
    from cnn_backend.testing import standin_backend

    be = standin_backend("float64") if backend == "standin" else get_backend("cpu", "float64")
    rng = numpy.random.default_rng(0)
    images = rng.random((6, 3, 8, 8))
    norm = Normalization(mean=(0.2, 0.5, 0.7), std=(0.3, 0.25, 0.1))
    mean, std = numpy.array(norm.mean)[None, :, None, None], numpy.array(norm.std)[None, :, None, None]
    plain = RandomCropFlip(be, padding=2, seed=3)
    normalised = make_augmentation("crop-flip", be, seed=3, normalization=norm)
    expected = (be.to_numpy(plain(be.to_device(images), 1, 1)) - mean) / std
    got = be.to_numpy(normalised(be.to_device((images - mean) / std), 1, 1))
    numpy.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert normalised.config()["fill"] == pytest.approx([-0.2 / 0.3, -0.5 / 0.25, -0.7 / 0.1])


def test_a_fill_that_is_not_one_number_per_channel_is_refused_in_one_line():
    be = get_backend("cpu", "float32")
    with pytest.raises(ValueError, match=r"^RandomCropFlip: fill must be a finite number or one per channel, got \[nan\]$"):
        RandomCropFlip(be, fill=float("nan"))
    with pytest.raises(ValueError, match=r"^RandomCropFlip: fill has 2 values for images of 3 channels$"):
        RandomCropFlip(be, fill=(0.1, 0.2))(numpy.zeros((2, 3, 4, 4), dtype=numpy.float32), 1, 1)


def test_the_fill_of_normalised_images_is_sent_to_the_device_once():
    from cnn_backend.data import Normalization
    from cnn_backend.testing import standin_backend

    be = standin_backend("float32")
    augment = make_augmentation("crop-flip", be, normalization=Normalization(mean=(0.5,), std=(0.25,)))
    x = be.to_device(numpy.zeros((4, 1, 6, 6), dtype=numpy.float32))
    transfers = []
    for step in (1, 2, 3):
        be.usage.reset_counters()
        augment(x, 1, step)
        transfers.append(be.usage.transfers_to_device)
    assert transfers[0] == transfers[1] + 1 and transfers[1] == transfers[2]  # the crop and flip choices, per step
