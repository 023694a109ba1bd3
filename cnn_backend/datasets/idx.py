"""The IDX format of MNIST, Fashion-MNIST and KMNIST: reading (checked) and writing.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, and the payload in C order. Files whose name ends in ``.gz`` are
gzip-compressed. Every problem raises :class:`DataError` with one line naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy

from ..serialization import write_atomically
from .base import DataError, check_labels, shape_text

# IDX type codes (third byte of the magic number). Multi-byte values are big-endian.
IDX_DTYPES = {
    0x08: numpy.dtype("u1"),
    0x09: numpy.dtype("i1"),
    0x0B: numpy.dtype(">i2"),
    0x0C: numpy.dtype(">i4"),
    0x0D: numpy.dtype(">f4"),
    0x0E: numpy.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}


def read_idx(path: str | os.PathLike) -> numpy.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in ``.gz``) into a native-endian array.

    Checks the magic number, the type code, the dimensions and that the payload has exactly the
    number of bytes the dimensions call for. Raises :class:`DataError` naming the file otherwise.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.name.endswith(".gz"):
        raw = gunzip(raw, path)
    return _decode_idx(raw, path)


def _storable(array: numpy.ndarray) -> numpy.ndarray:
    """An integer array of a type IDX has no code for (int64 labels, say) as the smallest IDX
    integer type that holds its values; any other array as it is (refused later if IDX cannot
    store it)."""
    if array.dtype.kind not in "iu" or array.dtype.newbyteorder("=") in _IDX_CODES:
        return array
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (numpy.uint8, numpy.int8, numpy.int16, numpy.int32):
        limits = numpy.iinfo(dtype)
        if limits.min <= low and high <= limits.max:
            return array.astype(dtype)
    return array


def write_idx(path: str | os.PathLike, array: Any) -> None:
    """Write ``array`` as an IDX file, gzip-compressed (with mtime 0) when the name ends in ``.gz``.
    Integers of a type IDX has no code for (int64, uint16, ...) are stored as the smallest of its
    integer types that holds their values.

    The file appears atomically: it is written to a temporary file in the same directory and then
    renamed, so a reader never sees half a file. Equal inputs give byte-identical files.
    """
    path = Path(path)
    array = _storable(numpy.asarray(array))
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64")
    if not 1 <= array.ndim <= 255 or any(size >= 2**32 for size in array.shape):
        raise ValueError(f"IDX cannot store an array of shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + numpy.asarray(array.shape, dtype=">u4").tobytes()
    payload = numpy.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()

    def write(stream):
        if path.name.endswith(".gz"):
            # filename/mtime fixed so the output depends on the data only.
            with gzip.GzipFile(filename=path.name, mode="wb", fileobj=stream, mtime=0) as compressed:
                compressed.write(header)
                compressed.write(payload)
        else:
            stream.write(header)
            stream.write(payload)

    write_atomically(path, write)


def read_images(path: str | os.PathLike, image_shape: tuple[int, int] | None = None) -> numpy.ndarray:
    """Read an IDX image file: uint8, shape ``(N, H, W)``; ``image_shape`` (if given) must match."""
    images = read_idx(path)
    if images.dtype != numpy.uint8 or images.ndim != 3:
        raise DataError(f"{path}: expected a 3-D uint8 image file, got {images.ndim}-D {images.dtype}")
    if image_shape is not None and images.shape[1:] != tuple(image_shape):
        raise DataError(
            f"{path}: expected {shape_text(image_shape)} images, got {shape_text(images.shape[1:])}; "
            f"images of another size train from a folder of images (one sub-folder per class)"
        )
    return images


def read_labels(path: str | os.PathLike, num_classes: int = 10) -> numpy.ndarray:
    """Read an IDX label file: int64, shape ``(N,)``, every label a class index below ``num_classes``."""
    labels = read_idx(path)
    if labels.dtype != numpy.uint8 or labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-D uint8 label file, got {labels.ndim}-D {labels.dtype}")
    problem = check_labels(labels, num_classes)
    if problem:
        raise DataError(f"{path}: {problem}; other classes train from a folder of images (one sub-folder per class)")
    return labels.astype(numpy.int64)


def gunzip(raw: bytes, path: Path) -> bytes:
    """Decompress gzip bytes read from ``path``; a non-gzip, truncated or corrupt stream is a DataError."""
    if raw[:2] != b"\x1f\x8b":
        raise DataError(f"{path}: not a gzip file, although the name ends in .gz")
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{path}: truncated gzip data (the compressed stream ends early)") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt gzip data ({exc})") from None


def _decode_idx(raw: bytes, path: Path) -> numpy.ndarray:
    if len(raw) < 4:
        raise DataError(f"{path}: truncated: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if raw[:2] == b"\x1f\x8b":  # gzip's own magic number: compressed, but not named so
        raise DataError(f"{path}: gzip-compressed IDX data without .gz in its name; rename it {path.name}.gz")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08X} (the first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} in magic number 0x{magic:08X}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated: the header declares {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = tuple(int(size) for size in numpy.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header_size
    if actual < expected:
        raise DataError(
            f"{path}: truncated: header dims {shape_text(shape)} need {expected} payload bytes, the file has {actual}"
        )
    if actual > expected:
        raise DataError(
            f"{path}: size mismatch: header dims {shape_text(shape)} need {expected} payload bytes, "
            f"the file has {actual} ({actual - expected} extra)"
        )
    # astype copies, so the result is writable and native-endian.
    return numpy.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(directory: Path, gz_name: str) -> Path | None:
    """The gzip file, else the raw (uncompressed) file of that name in ``directory``, else None."""
    for name in (gz_name, gz_name.removesuffix(".gz")):
        if (directory / name).is_file():
            return directory / name
    return None


def load_idx_pair(images_path: Path, labels_path: Path, num_classes: int, image_shape=None) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Images ``(N, 1, H, W)`` and labels of one split, checked to have the same count."""
    images = read_images(images_path, image_shape)
    labels = read_labels(labels_path, num_classes)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path.parent}: {images_path.name} has {len(images)} images "
            f"but {labels_path.name} has {len(labels)} labels"
        )
    return images[:, None], labels
