"""The CIFAR-10 binary version: fixed-length records, read without pickle.

Each batch file (``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``) is a run of
3073-byte records: one label byte (0-9), then the 32x32 red, green and blue planes, row by row, so
a record's pixels are already in ``(C, H, W)`` order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy

from ..serialization import write_atomically
from .base import DataError, check_labels

CHANNELS, HEIGHT, WIDTH = 3, 32, 32
PIXEL_BYTES = CHANNELS * HEIGHT * WIDTH
RECORD_BYTES = 1 + PIXEL_BYTES


def read_cifar_batch(path: str | os.PathLike, num_classes: int = 10) -> tuple[numpy.ndarray, numpy.ndarray]:
    """One batch file: images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)``."""
    path = Path(path)
    try:
        raw = numpy.fromfile(path, dtype=numpy.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if raw.size == 0:
        raise DataError(f"{path}: empty file, expected {RECORD_BYTES}-byte CIFAR-10 records")
    if raw.size % RECORD_BYTES:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records "
            f"(1 label byte + {PIXEL_BYTES} pixel bytes); {raw.size % RECORD_BYTES} bytes left over: "
            f"a truncated file or another format"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].astype(numpy.int64)
    problem = check_labels(labels, num_classes)
    if problem:
        raise DataError(f"{path}: {problem}")
    images = numpy.ascontiguousarray(records[:, 1:]).reshape(-1, CHANNELS, HEIGHT, WIDTH)
    return images, labels


def read_cifar_batches(paths: Sequence[str | os.PathLike], num_classes: int = 10) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Several batch files, concatenated in the order given."""
    parts = [read_cifar_batch(path, num_classes) for path in paths]
    return numpy.concatenate([images for images, _ in parts]), numpy.concatenate([labels for _, labels in parts])


def write_cifar_batch(path: str | os.PathLike, images, labels) -> Path:
    """Write images uint8 ``(N, 3, 32, 32)`` and labels as one batch file (atomically)."""
    images = numpy.asarray(images)
    labels = numpy.asarray(labels)
    if images.dtype != numpy.uint8 or images.shape[1:] != (CHANNELS, HEIGHT, WIDTH):
        raise ValueError(f"CIFAR-10 records hold uint8 (N, 3, 32, 32) images, got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"labels must be {len(images)} values 0-255")
    records = numpy.empty((len(images), RECORD_BYTES), dtype=numpy.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.reshape(len(images), -1)
    return write_atomically(path, lambda stream: stream.write(records.tobytes()))
