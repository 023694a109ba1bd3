"""Fashion-MNIST names kept for existing callers, host-side preparation, and device batching.

The readers, downloads and loaders of every dataset live in :mod:`cnn_backend.datasets`; this
module keeps the Fashion-MNIST entry points (:func:`load_fashion_mnist`, :func:`download`,
:func:`resolve_source`) and what prepares host arrays for a model:

* :func:`split_train_validation` and :func:`stratified_holdout` choose training and validation
  images;
* :func:`prepare_images` scales (and optionally normalises) host images as model input;
* :class:`BatchLoader` is the only place that touches the device: it sends uint8 images once
  (when they fit) and converts them to the backend's float dtype there.

Slicing conventions for the training split (see :func:`split_train_validation`): the seed experiment
trains on ``train[:5000]`` and validates on ``train[5000:10000]`` (:data:`SEED_SPLIT`); the full
recipe trains on ``train[:50000]`` and validates on ``train[50000:]`` (:data:`FULL_SPLIT`). The test
split (``t10k``) is kept for the final report only.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from .backend import float_dtype, get_backend
from .datasets.base import DATA_DIR_ENV, DataError, check_labels
from .datasets.download import download_files
from .datasets.idx import read_idx, read_labels, write_idx
from .datasets.idx import read_images as _read_idx_images
from .datasets.registry import FASHION_MNIST
from .init import as_integer, is_flag
from .datasets.sources import (
    BUNDLED_COUNT,
    BUNDLED_DIR,
    BUNDLED_SHA256,
    SPLITS,
    DataSource,
    default_data_dir,
    load_fashion_source,
    resolve_source,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_COUNT", "BUNDLED_DIR", "BUNDLED_SHA256", "CLASS_NAMES", "DATA_DIR_ENV", "DataError", "DataSource",
    "FASHION_MNIST_SHAPE", "FULL_SPLIT", "IMAGE_SIZE", "NUM_CLASSES", "OFFICIAL_BASE_URL", "OFFICIAL_MD5", "SEED_SPLIT", "SPLITS",
    "BatchLoader", "default_data_dir", "describe_source", "download", "load_fashion_mnist", "prepare_images",
    "Normalization", "read_idx", "read_images", "read_labels", "resolve_source", "split_ranges", "split_train_validation",
    "stratified_holdout", "write_idx",
]

CLASS_NAMES = FASHION_MNIST.class_names
NUM_CLASSES = len(CLASS_NAMES)
#: the per-sample shape (C, H, W) the built-in networks take: a Fashion-MNIST image
FASHION_MNIST_SHAPE = FASHION_MNIST.image_shape
#: (height, width) of a Fashion-MNIST image, as its IDX files store it
IMAGE_SIZE = FASHION_MNIST_SHAPE[1:]

#: (n_train, n_val) of the seed experiment: train[:5000], validation train[5000:10000].
SEED_SPLIT = (5000, 5000)
#: (n_train, n_val) of the full recipe: train[:50000], validation train[50000:60000].
FULL_SPLIT = (50000, 10000)

OFFICIAL_BASE_URL = FASHION_MNIST.mirrors[0]
#: MD5 of the four official files, as published by Zalando Research.
OFFICIAL_MD5 = FASHION_MNIST.files

DEFAULT_MAX_DEVICE_BYTES = 1 << 30


def split_ranges(n_train: int, n_val: int | None = None) -> tuple[str, str]:
    """The ``START:STOP`` texts (as ``--train-split`` and ``--val-split`` take them) of
    :func:`split_train_validation`'s split: ``(":n_train", "n_train:n_train + n_val")``, the
    validation range open-ended when ``n_val`` is None."""
    return f":{n_train}", f"{n_train}:{'' if n_val is None else n_train + n_val}"


def read_images(path: str | os.PathLike, image_shape: tuple[int, int] | None = IMAGE_SIZE) -> numpy.ndarray:
    """Read an IDX image file: uint8, shape ``(N, H, W)``; ``image_shape`` (if given) must match."""
    return _read_idx_images(path, image_shape)


def download(
    data_dir: str | os.PathLike | None = None,
    *,
    base_url: str = OFFICIAL_BASE_URL,
    checksums: Mapping[str, str] | None = None,
    retries: int = 3,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: bool = True,
) -> Path:
    """Fetch the four official Fashion-MNIST files into ``data_dir`` and verify each one.

    ``data_dir`` defaults to :func:`default_data_dir`. ``checksums`` maps file name to its hex digest
    (32 digits: MD5, 64: sha256) and defaults to the published MD5s; its keys are the files fetched
    from ``base_url``. See :func:`cnn_backend.datasets.download.download_files` for how files are
    verified, retried and never left half-written. Returns the directory.
    """
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return download_files(
        directory, dict(OFFICIAL_MD5 if checksums is None else checksums), [base_url],
        retries=retries, backoff=backoff, timeout=timeout, progress=progress,
    )


def describe_source(split: str = "train", source: str | os.PathLike = "auto") -> str:
    """One line saying which data :func:`load_fashion_mnist` would use for these arguments."""
    return resolve_source(split, source).describe()


def load_fashion_mnist(split: str = "train", source: str | os.PathLike = "auto") -> tuple[numpy.ndarray, numpy.ndarray]:
    """Load one split on the host: images uint8 ``(N, 28, 28)`` and labels int64 ``(N,)``.

    See :func:`resolve_source` for ``source``. The choice is logged at INFO on the
    ``cnn_backend.data`` logger. The bundled files are checked against their recorded sha256.
    (:func:`cnn_backend.datasets.load_dataset` loads any dataset, with a channel axis.)
    """
    loaded = load_fashion_source(resolve_source(split, source))
    logger.info("%s (%s images)", loaded.source, f"{len(loaded):,}")
    return loaded.images[:, 0], loaded.labels


def split_train_validation(
    images: numpy.ndarray, labels: numpy.ndarray, n_train: int, n_val: int | None = None
) -> tuple[tuple[numpy.ndarray, numpy.ndarray], tuple[numpy.ndarray, numpy.ndarray]]:
    """Split the training set in order: ``[:n_train]`` to train, ``[n_train:n_train + n_val]`` to validate.

    ``n_val=None`` takes everything after the training part. Use :data:`SEED_SPLIT` (5000, 5000) for
    the seed experiment (the same images whether the source is bundled or full) and
    :data:`FULL_SPLIT` (50000, 10000) for the full recipe. Returns views, not copies.
    """
    total = len(images)
    if len(labels) != total:
        raise ValueError(f"{total} images but {len(labels)} labels")
    if n_val is None:
        n_val = total - n_train
    if n_train <= 0 or n_val < 0 or n_train + n_val > total:
        raise DataError(
            f"cannot split {total:,} images into {n_train:,} train + {n_val:,} validation"
            + ("; the bundled subset has 10,000 images, run `cnn-backend download` for 60,000" if total == BUNDLED_COUNT else "")
        )
    stop = n_train + n_val
    return (images[:n_train], labels[:n_train]), (images[n_train:stop], labels[n_train:stop])


def stratified_holdout(labels, fraction: float, seed: int = 0) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Indices ``(train, validation)`` holding out ``fraction`` of every class, chosen by ``seed``.

    Each class with at least two images keeps at least one for training and gives at least one
    to validation; both index arrays are sorted, so the images keep their order.
    """
    labels = numpy.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    rng = numpy.random.default_rng(seed)
    held_out = []
    for label in numpy.unique(labels):  # a loop over classes, on the host
        members = numpy.flatnonzero(labels == label)
        count = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        held_out.append(rng.permutation(members)[:count])
    validation = numpy.sort(numpy.concatenate(held_out)) if held_out else numpy.zeros(0, dtype=numpy.int64)
    if not len(validation):
        raise DataError(
            f"a validation fraction of {fraction:g} leaves no validation images (every class has one image): "
            f"add images to the classes, or choose the validation images yourself (--train-split and --val-split)"
        )
    train = numpy.setdiff1d(numpy.arange(len(labels)), validation)
    return train, validation


class Normalization:
    """Per-channel ``(x - mean) / std`` on images already scaled to [0, 1].

    ``mean`` and ``std`` have one value per channel; :meth:`from_images` measures them on the
    training images, and :meth:`config` / :meth:`from_config` store them in checkpoints.
    """

    def __init__(self, mean, std) -> None:
        self.mean = tuple(float(value) for value in mean)
        self.std = tuple(float(value) for value in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel, got {len(self.mean)} and {len(self.std)}")
        if not all(math.isfinite(value) and value > 0 for value in self.std) or not all(map(math.isfinite, self.mean)):
            raise ValueError(f"std must be positive and finite, and mean finite; got mean {self.mean}, std {self.std}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Normalization) and (self.mean, self.std) == (other.mean, other.std)

    def __hash__(self) -> int:
        return hash((self.mean, self.std))

    @classmethod
    def from_images(cls, images, chunk: int = 4096) -> "Normalization":
        """Mean and standard deviation of each channel of uint8 ``(N, C, H, W)`` images (or ``(N, H, W)``,
        one channel), in [0, 1] units. Other dtypes are refused: float images may already be scaled,
        and dividing them by 255 again would give statistics near 0 without a word."""
        images = numpy.asarray(images) if not isinstance(images, numpy.ndarray) else images
        if images.dtype != numpy.uint8:
            raise ValueError(
                f"Normalization.from_images: expected uint8 pixels (0-255), got {images.dtype}; pass the raw images "
                f"(statistics are taken in [0, 1] units from them)"
            )
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or not images.size:
            raise ValueError(f"Normalization.from_images: expected images of shape (N, C, H, W) or (N, H, W), got {images.shape}")
        refuse_channels_last(images, "Normalization.from_images")
        channels = images.shape[1]
        total = numpy.zeros(channels)
        squares = numpy.zeros(channels)
        for start in range(0, len(images), chunk):  # chunks bound the float64 copy of a memory-mapped set
            part = images[start:start + chunk].astype(numpy.float64) / 255.0
            total += part.sum(axis=(0, 2, 3))
            squares += numpy.square(part).sum(axis=(0, 2, 3))
        count = len(images) * images.shape[2] * images.shape[3]
        mean = total / count
        std = numpy.sqrt(numpy.maximum(squares / count - mean * mean, 0.0))
        return cls(mean, numpy.where(std > 1e-6, std, 1.0))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def config(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_config(cls, config: dict | None) -> "Normalization | None":
        return None if not config else cls(config["mean"], config["std"])

    def shaped(self, dtype) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Host arrays ``mean`` and ``1 / std`` of shape ``(1, C, 1, 1)`` in ``dtype``."""
        mean = numpy.asarray(self.mean, dtype=dtype).reshape(1, -1, 1, 1)
        inverse_std = (1.0 / numpy.asarray(self.std, dtype=numpy.float64)).astype(dtype).reshape(1, -1, 1, 1)
        return mean, inverse_std

    def __repr__(self) -> str:
        return f"Normalization(mean={self.mean}, std={self.std})"


#: samples per slice when host images are checked for NaN and infinity (bounds the mask's memory)
HOST_CHECK_SAMPLES = 4096


def count_non_finite_samples(images, backend) -> int:
    """How many samples (first axis) of ``images`` hold NaN or infinity.

    Host (NumPy) images are checked on the host, a slice at a time; device images of ``backend``
    cost one read back from the device, and a second only when something is wrong.
    """
    if images.dtype.kind not in "fc":
        return 0
    on_host = isinstance(images, numpy.ndarray)
    xp, step = (numpy, HOST_CHECK_SAMPLES) if on_host else (backend.xp, len(images))
    bad = 0
    for start in range(0, len(images), step):
        part = images[start : start + step].reshape(min(step, len(images) - start), -1)
        if not bool(xp.isfinite(part).all()):
            bad += int(xp.count_nonzero(~xp.isfinite(part).all(axis=1)))
    return bad


def count_samples_not_finite_in_dtype(images, backend) -> int:
    """How many samples of ``images`` hold NaN or infinity once in ``backend.dtype``: NaN and
    infinity, and finite values the cast to a narrower float makes infinite (1e39 in float32).
    A wider input is cast a slice at a time, which bounds the memory (on a device, a read per slice)."""
    dtype = backend.dtype
    if images.dtype.kind != "f" or images.dtype.itemsize <= dtype.itemsize:
        return count_non_finite_samples(images, backend)
    with warnings.catch_warnings():  # NumPy's overflow warning for the cast: what is counted here
        warnings.simplefilter("ignore", RuntimeWarning)
        return sum(
            count_non_finite_samples(images[start : start + HOST_CHECK_SAMPLES].astype(dtype), backend)
            for start in range(0, len(images), HOST_CHECK_SAMPLES)
        )


#: channel counts of images: a 4-D array with one of them last and none second is channels-last
IMAGE_CHANNEL_COUNTS = (1, 3, 4)


def refuse_channels_last(images, who: str) -> None:
    """ValueError for uint8 ``images`` laid out ``(N, H, W, C)`` (as Pillow, Keras and OpenCV give
    pixels), which would otherwise be read as ``C = H`` channels of ``H = W`` by ``W = C`` pixels:
    taken so when the last axis is a channel count (at most 4 pixels wide as a width, which no
    image trained on is) and the two before it are 8 or more (image sides, too many channels).
    Float input is any data, as it is given (signals of shape ``(N, C, L, 1)``, say)."""
    shape = images.shape
    if images.dtype == numpy.uint8 and len(shape) == 4 and shape[-1] in IMAGE_CHANNEL_COUNTS and min(shape[1], shape[2]) >= 8:
        raise ValueError(
            f"{who}: images of shape {shape} look like (N, H, W, C), {shape[-1]} channels last; "
            f"pass images.transpose(0, 3, 1, 2), of shape (N, C, H, W)"
        )


def prepare_images(images, dtype="float32", normalization: Normalization | None = None) -> numpy.ndarray:
    """Host uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` as model input on the host: ``(N, C, H, W)``
    in [0, 1], then normalised per channel when ``normalization`` is given (what :class:`BatchLoader`
    does on the device, for evaluation sets and predictions)."""
    images = numpy.asarray(images)
    if images.dtype != numpy.uint8:
        # Float images are scaled already (or not meant to be): dividing them by 255 again is silent harm.
        raise ValueError(
            f"prepare_images takes uint8 images (0-255), got {images.dtype}: images already scaled to [0, 1] "
            "are model input as they are"
        )
    if images.ndim not in (3, 4):
        raise ValueError(f"prepare_images takes images of shape (N, H, W) or (N, C, H, W), got {images.shape}")
    refuse_channels_last(images, "prepare_images")
    dtype = float_dtype(dtype)
    if images.ndim == 3:
        images = images[:, None]
    if normalization is None:
        return _scale_and_normalize(images, dtype)
    _check_normalization(normalization, images.shape[1])
    return _scale_and_normalize(images, dtype, *normalization.shaped(dtype))


def _scale_and_normalize(images, dtype, mean=None, inverse_std=None):
    """uint8 ``images`` as ``dtype`` in [0, 1], then ``(x - mean) * inverse_std`` when ``mean`` is
    given: the one input transform of training, evaluation and prediction. It uses array methods
    and in-place operators alone, so NumPy and CuPy arrays (with ``mean`` and ``inverse_std`` on the
    same device, as :meth:`Normalization.shaped` gives them) go through the same steps."""
    x = images.astype(dtype)
    x *= 1.0 / 255.0  # a Python float keeps the array's dtype
    if mean is not None:
        x -= mean
        x *= inverse_std
    return x


def _check_normalization(normalization: Normalization, channels: int) -> None:
    if normalization.channels != channels:
        raise ValueError(f"the normalisation has {normalization.channels} channels, the images have {channels}")


# ---------------------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class BatchShare:
    """One process's part of a global batch: samples ``[start, stop)`` of the ``total`` in it."""

    start: int
    stop: int
    total: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def _nearby_multiples(value: int, factor: int) -> list[int]:
    below = value // factor
    return [k for k in (below, below + 1) if k >= 1]


class BatchLoader:
    """Minibatches ``(x, y)`` on the backend's device, in a seeded order that any epoch reproduces.

    ``x`` has shape ``(B, C, H, W)`` (NCHW) in ``backend.dtype``: uint8 ``images`` (pixels) scaled
    to [0, 1] (then normalised per channel when ``normalization`` is given), float ``images`` (data
    already prepared: spectrograms, normalised images) as they are; ``y`` is int64, each label below
    ``num_classes``. Pixels go to the device as uint8 (4x less traffic than float32) and are
    converted there. When
    the split needs at most ``max_device_bytes`` on the device it is sent once, and each epoch sends
    only its permutation; otherwise each batch is gathered on the host and sent on its own.

    The order of epoch ``e`` is ``numpy.random.default_rng((seed, e)).permutation(N)``, so resuming
    at epoch ``e`` needs no saved generator state.

    Data-parallel training: with ``size`` processes, ``batch_size`` is the global batch and process
    ``rank`` receives its contiguous share of every global batch (the same global batches, in the same
    order, as one process); :meth:`share` says which part of batch ``index`` that is. A batch size
    that ``size`` does not divide is refused; a smaller last batch is shared as evenly as it can be.
    """

    def __init__(
        self,
        images: numpy.ndarray,
        labels: numpy.ndarray,
        backend,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES,
        num_classes: int = NUM_CLASSES,
        normalization: Normalization | None = None,
        rank: int = 0,
        size: int = 1,
    ):
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not is_flag(flag):  # "False" would be true
                raise ValueError(f"BatchLoader: {name} must be true or false, got {flag!r}")
        num_classes = as_integer(num_classes, "BatchLoader: num_classes", 1)
        images = numpy.asarray(images)
        labels = numpy.asarray(labels)
        if images.dtype != numpy.uint8 and images.dtype.kind != "f":
            raise ValueError(
                f"images must be uint8 pixels (0-255, scaled to [0, 1] on the device) or floats (used as they are), got {images.dtype}"
            )
        if images.dtype.kind == "f" and normalization is not None:  # its mean and std are those of pixels scaled to [0, 1]
            raise ValueError("normalization applies to uint8 pixels; normalise float images before giving them to the loader")
        if images.ndim == 3:
            images = images[:, None]  # add the channel axis: (N, H, W) -> (N, 1, H, W)
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, H, W) or (N, C, H, W), got {images.shape}")
        refuse_channels_last(images, "BatchLoader")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if not numpy.issubdtype(labels.dtype, numpy.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        problem = check_labels(labels, num_classes)
        if problem:
            raise DataError(f"{problem} (num_classes={num_classes}: give the data's class count as num_classes)")
        if normalization is not None:
            _check_normalization(normalization, images.shape[1])
        batch_size = as_integer(batch_size, "batch_size", 1)
        seed = as_integer(seed, "seed", 0)

        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank!r}")
        if batch_size % size:
            raise ValueError(
                f"the batch size {batch_size} cannot be shared by {size} processes: choose a multiple of "
                f"{size} ({', '.join(str(size * k) for k in _nearby_multiples(batch_size, size))})"
            )

        self.backend = backend = get_backend(backend)  # a Backend, or a device name as Sequential takes
        bad = count_samples_not_finite_in_dtype(images, backend)  # 0 for pixels
        if bad:  # training on them would only end in a non-finite loss
            raise DataError(
                f"{bad} of {len(images)} images contain NaN, infinity or values too large for {backend.dtype.name}; clean them first"
            )
        self.batch_size = int(batch_size)
        self.rank, self.size = int(rank), int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.num_samples = len(images)
        self._host_images = numpy.ascontiguousarray(images)
        self._host_labels = labels.astype(numpy.int64)
        last = self.num_samples - (len(self) - 1) * self.batch_size if len(self) else 0
        if 0 < last < self.size:
            raise ValueError(
                f"the last batch of an epoch would hold {last} sample{'s' if last > 1 else ''}, fewer than the "
                f"{self.size} processes: change the batch size or the number of samples, or leave the last batch "
                f"out (drop_last=True)"
            )
        device_bytes = self._host_images.nbytes + self._host_labels.nbytes
        #: True when the whole split lives on the device.
        self.resident = device_bytes <= max_device_bytes
        self._normalization = None
        if normalization is not None:
            # Sent once: (1, C, 1, 1) device arrays in the backend's dtype.
            self._normalization = tuple(backend.to_device(part) for part in normalization.shaped(backend.dtype))
        if self.resident:
            self._device_images = backend.to_device(self._host_images)
            self._device_labels = backend.to_device(self._host_labels)

    @property
    def labels(self) -> numpy.ndarray:
        """The host labels (int64 class indices, checked when the loader was made), in data order."""
        return self._host_labels

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def share(self, index: int) -> BatchShare:
        """This process's part of global batch ``index`` (0-based) of an epoch."""
        total = min(self.batch_size, self.num_samples - index * self.batch_size)
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return BatchShare(start, start + base + (self.rank < extra), total)

    def order(self, epoch_index: int) -> numpy.ndarray:
        """Host permutation of sample indices for this epoch (identity when not shuffling)."""
        epoch_index = as_integer(epoch_index, "BatchLoader: the epoch index", 0)  # seeds the order
        if not self.shuffle:
            return numpy.arange(self.num_samples)
        return numpy.random.default_rng((self.seed, int(epoch_index))).permutation(self.num_samples)

    def epoch(self, epoch_index: int = 0) -> Iterator[tuple[Any, Any]]:
        """Yield the minibatches ``(x, y)`` of epoch ``epoch_index``, all on the device."""
        # This process's [start, stop) of every global batch, as positions in the epoch's order.
        bounds = []
        for batch in range(len(self)):
            share = self.share(batch)
            bounds.append((batch * self.batch_size + share.start, batch * self.batch_size + share.stop))
        if self.resident:
            images, labels = self._device_images, self._device_labels
            # One transfer of the order per epoch; batches are then gathered with device indices.
            order = self.backend.to_device(self.order(epoch_index)) if self.shuffle else None
            for start, stop in bounds:
                if order is None:
                    x, y = images[start:stop], labels[start:stop]
                else:
                    index = order[start:stop]
                    x, y = images[index], labels[index]
                yield self._to_float(x), y
        else:
            order = self.order(epoch_index)
            for start, stop in bounds:
                index = order[start:stop]
                x = self.backend.to_device(self._host_images[index])
                y = self.backend.to_device(self._host_labels[index])
                yield self._to_float(x), y

    def _to_float(self, x):
        if x.dtype.kind == "f":  # prepared by the caller: only the model's dtype is given to it, in a copy
            return x.astype(self.backend.dtype)  # never a view of the stored images, which a step may change
        return _scale_and_normalize(x, self.backend.dtype, *(self._normalization or ()))
