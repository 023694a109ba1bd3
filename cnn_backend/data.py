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
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy

from .datasets.base import DATA_DIR_ENV, DataError, check_labels
from .datasets.download import download_files
from .datasets.idx import read_idx, read_labels, write_idx
from .datasets.idx import read_images as _read_idx_images
from .datasets.registry import FASHION_MNIST
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
    "FULL_SPLIT", "IMAGE_SHAPE", "NUM_CLASSES", "OFFICIAL_BASE_URL", "OFFICIAL_MD5", "SEED_SPLIT", "SPLITS",
    "BatchLoader", "default_data_dir", "describe_source", "download", "load_fashion_mnist", "prepare_images",
    "read_idx", "read_images", "read_labels", "resolve_source", "split_train_validation", "stratified_holdout",
    "write_idx",
]

CLASS_NAMES = FASHION_MNIST.class_names
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)

#: (n_train, n_val) of the seed experiment: train[:5000], validation train[5000:10000].
SEED_SPLIT = (5000, 5000)
#: (n_train, n_val) of the full recipe: train[:50000], validation train[50000:60000].
FULL_SPLIT = (50000, 10000)

OFFICIAL_BASE_URL = FASHION_MNIST.mirrors[0]
#: MD5 of the four official files, as published by Zalando Research.
OFFICIAL_MD5 = FASHION_MNIST.files

DEFAULT_MAX_DEVICE_BYTES = 1 << 30


def read_images(path: str | os.PathLike, image_shape: tuple[int, int] | None = IMAGE_SHAPE) -> numpy.ndarray:
    """Read an IDX image file: uint8, shape ``(N, H, W)``; ``image_shape`` (if given) must match."""
    return _read_idx_images(path, image_shape)


def _label_problem(labels: numpy.ndarray, num_classes: int = NUM_CLASSES) -> str | None:
    """Describe the first label outside ``0..num_classes-1``, or None when all are valid."""
    return check_labels(labels, num_classes)


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


def prepare_images(images, dtype="float32") -> numpy.ndarray:
    """Host uint8 images ``(N, H, W)`` or ``(N, 1, H, W)`` as model input on the host: ``(N, 1, H, W)``
    in [0, 1] (what :class:`BatchLoader` does on the device, for evaluation sets and predictions)."""
    images = numpy.asarray(images)
    if images.ndim == 3:
        images = images[:, None]
    scaled = images.astype(dtype)
    scaled *= 1.0 / 255.0
    return scaled


# ---------------------------------------------------------------------------------------- batching


class BatchLoader:
    """Minibatches ``(x, y)`` on the backend's device, in a seeded order that any epoch reproduces.

    ``x`` has shape ``(B, 1, H, W)`` (NCHW) in ``backend.dtype``, scaled to [0, 1]; ``y`` is int64.
    Images go to the device as uint8 (4x less traffic than float32) and are converted there. When
    the split needs at most ``max_device_bytes`` on the device it is sent once, and each epoch sends
    only its permutation; otherwise each batch is gathered on the host and sent on its own.

    The order of epoch ``e`` is ``numpy.random.default_rng((seed, e)).permutation(N)``, so resuming
    at epoch ``e`` needs no saved generator state.
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
    ):
        images = numpy.asarray(images)
        labels = numpy.asarray(labels)
        if images.dtype != numpy.uint8:
            raise ValueError(f"images must be uint8 (as loaded), got {images.dtype}")
        if images.ndim == 3:
            images = images[:, None]  # add the channel axis: (N, H, W) -> (N, 1, H, W)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W), got {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if not numpy.issubdtype(labels.dtype, numpy.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        problem = _label_problem(labels)
        if problem:
            raise DataError(problem)
        if not isinstance(batch_size, (int, numpy.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, (int, numpy.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")

        self.backend = backend
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_samples = len(images)
        self._host_images = numpy.ascontiguousarray(images)
        self._host_labels = labels.astype(numpy.int64)
        device_bytes = self._host_images.nbytes + self._host_labels.nbytes
        #: True when the whole split lives on the device.
        self.resident = device_bytes <= max_device_bytes
        if self.resident:
            self._device_images = backend.to_device(self._host_images)
            self._device_labels = backend.to_device(self._host_labels)

    def __len__(self) -> int:
        """Number of batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def order(self, epoch_index: int) -> numpy.ndarray:
        """Host permutation of sample indices for this epoch (identity when not shuffling)."""
        if not self.shuffle:
            return numpy.arange(self.num_samples)
        return numpy.random.default_rng((self.seed, int(epoch_index))).permutation(self.num_samples)

    def epoch(self, epoch_index: int = 0) -> Iterator[tuple[Any, Any]]:
        """Yield the minibatches ``(x, y)`` of epoch ``epoch_index``, all on the device."""
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        if self.resident:
            images, labels = self._device_images, self._device_labels
            # One transfer of the order per epoch; batches are then gathered with device indices.
            order = self.backend.to_device(self.order(epoch_index)) if self.shuffle else None
            for start in starts:
                if order is None:
                    x, y = images[start:start + self.batch_size], labels[start:start + self.batch_size]
                else:
                    index = order[start:start + self.batch_size]
                    x, y = images[index], labels[index]
                yield self._to_float(x), y
        else:
            order = self.order(epoch_index)
            for start in starts:
                index = order[start:start + self.batch_size]
                x = self.backend.to_device(self._host_images[index])
                y = self.backend.to_device(self._host_labels[index])
                yield self._to_float(x), y

    def _to_float(self, x_uint8):
        x = x_uint8.astype(self.backend.dtype)
        x *= 1.0 / 255.0  # a Python float keeps the array's dtype
        return x
