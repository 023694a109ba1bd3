"""Fashion-MNIST: IDX files, the bundled subset, the verified download, and device batching.

Three sources of data, one loader (:func:`load_fashion_mnist`):

* the **bundled subset** shipped inside the package (``cnn_backend/datasets/``): the first 10,000
  official training images and labels, so training works offline with nothing downloaded;
* the **full data set** (60,000 train + 10,000 test) that :func:`download` fetches into the cache
  directory (``$CNN_BACKEND_DATA``, else the user cache dir), each file checked against its
  published MD5;
* any **directory** holding IDX files (gzip-compressed or raw).

Every file problem raises :class:`DataError` with one line naming the file and what is wrong.

Host arrays stay NumPy. :class:`BatchLoader` is the only place that touches the device: it sends
uint8 images once (when they fit) and converts them to the backend's float dtype there.

Slicing conventions for the training split (see :func:`split_train_validation`): the seed experiment
trains on ``train[:5000]`` and validates on ``train[5000:10000]`` (:data:`SEED_SPLIT`); the full
recipe trains on ``train[:50000]`` and validates on ``train[50000:]`` (:data:`FULL_SPLIT`). The test
split (``t10k``) is kept for the final report only.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from .serialization import write_atomically

logger = logging.getLogger(__name__)

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)

#: (n_train, n_val) of the seed experiment: train[:5000], validation train[5000:10000].
SEED_SPLIT = (5000, 5000)
#: (n_train, n_val) of the full recipe: train[:50000], validation train[50000:60000].
FULL_SPLIT = (50000, 10000)

SPLITS = ("train", "test")
# File-name prefix of each split in the official distribution.
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

OFFICIAL_BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: MD5 of the four official files, as published by Zalando Research.
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}

DATA_DIR_ENV = "CNN_BACKEND_DATA"
BUNDLED_DIR = Path(__file__).resolve().parent / "datasets"
BUNDLED_COUNT = 10_000
#: sha256 of the bundled files, as written by scripts/make_bundled_subset.py.
BUNDLED_SHA256 = {
    "train-images-idx3-ubyte.gz": "ccdf3ab6f3c32503131aa3e9526390b870fe03bfe84f01541e3f9d82708189aa",
    "train-labels-idx1-ubyte.gz": "fbcfa013ad47cb9fcf80b8216cc2018ee91bcdb3538758782185d420a66c582f",
}

# IDX type codes (third byte of the magic number). Multi-byte values are big-endian.
_IDX_DTYPES = {
    0x08: numpy.dtype("u1"),
    0x09: numpy.dtype("i1"),
    0x0B: numpy.dtype(">i2"),
    0x0C: numpy.dtype(">i4"),
    0x0D: numpy.dtype(">f4"),
    0x0E: numpy.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}

DEFAULT_MAX_DEVICE_BYTES = 1 << 30
_DOWNLOAD_CHUNK = 1 << 16
_USER_AGENT = "cnn-backend (Fashion-MNIST download)"


class DataError(ValueError):
    """A data file is missing, unreadable, corrupt or inconsistent; ``str(err)`` is one line."""


# --------------------------------------------------------------------------------------------- IDX


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
        raw = _gunzip(raw, path)
    return _decode_idx(raw, path)


def write_idx(path: str | os.PathLike, array: Any) -> None:
    """Write ``array`` as an IDX file, gzip-compressed (with mtime 0) when the name ends in ``.gz``.

    The file appears atomically: it is written to a temporary file in the same directory and then
    renamed, so a reader never sees half a file. Equal inputs give byte-identical files.
    """
    path = Path(path)
    array = numpy.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of uint8, int8, int16, int32, float32, float64")
    if not 1 <= array.ndim <= 255 or any(size >= 2**32 for size in array.shape):
        raise ValueError(f"IDX cannot store an array of shape {array.shape}")
    header = bytes([0, 0, code, array.ndim]) + numpy.asarray(array.shape, dtype=">u4").tobytes()
    payload = numpy.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()

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


def read_images(path: str | os.PathLike, image_shape: tuple[int, int] | None = IMAGE_SHAPE) -> numpy.ndarray:
    """Read an IDX image file: uint8, shape ``(N, H, W)``; ``image_shape`` (if given) must match."""
    images = read_idx(path)
    if images.dtype != numpy.uint8 or images.ndim != 3:
        raise DataError(f"{path}: expected a 3-D uint8 image file, got {images.ndim}-D {images.dtype}")
    if image_shape is not None and images.shape[1:] != tuple(image_shape):
        raise DataError(f"{path}: expected {_shape_text(image_shape)} images, got {_shape_text(images.shape[1:])}")
    return images


def read_labels(path: str | os.PathLike) -> numpy.ndarray:
    """Read an IDX label file: int64, shape ``(N,)``, every label a class index 0-9."""
    labels = read_idx(path)
    if labels.dtype != numpy.uint8 or labels.ndim != 1:
        raise DataError(f"{path}: expected a 1-D uint8 label file, got {labels.ndim}-D {labels.dtype}")
    problem = _label_problem(labels)
    if problem:
        raise DataError(f"{path}: {problem}")
    return labels.astype(numpy.int64)


def _gunzip(raw: bytes, path: Path) -> bytes:
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
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: bad IDX magic number 0x{magic:08X} (the first two bytes must be zero)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} in magic number 0x{magic:08X}")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(f"{path}: truncated: the header declares {ndim} dimensions but the file ends after {len(raw)} bytes")
    shape = tuple(int(size) for size in numpy.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header_size
    if actual < expected:
        raise DataError(
            f"{path}: truncated: header dims {_shape_text(shape)} need {expected} payload bytes, the file has {actual}"
        )
    if actual > expected:
        raise DataError(
            f"{path}: size mismatch: header dims {_shape_text(shape)} need {expected} payload bytes, "
            f"the file has {actual} ({actual - expected} extra)"
        )
    # astype copies, so the result is writable and native-endian.
    return numpy.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _label_problem(labels: numpy.ndarray) -> str | None:
    """Describe the first label outside 0..9, or None when all are valid."""
    bad = numpy.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size == 0:
        return None
    first = int(bad[0])
    return (
        f"labels must be class indices 0-{NUM_CLASSES - 1}; found {labels[first]} at record {first} "
        f"({bad.size} out of range)"
    )


def _shape_text(shape) -> str:
    return "x".join(str(size) for size in shape)


# ------------------------------------------------------------------------------------- file names


def _file_names(split: str) -> tuple[str, str]:
    """Official (gzip) names of the image and label files of ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def _find_file(directory: Path, gz_name: str) -> Path | None:
    """The gzip file, else the raw (uncompressed) file of that name in ``directory``, else None."""
    for name in (gz_name, gz_name.removesuffix(".gz")):
        if (directory / name).is_file():
            return directory / name
    return None


def default_data_dir() -> Path:
    """Where the full data set lives: ``$CNN_BACKEND_DATA``, else ``<user cache>/cnn-backend/fashion-mnist``."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cnn-backend")) / "fashion-mnist"


# ---------------------------------------------------------------------------------------- download


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
    from ``base_url``. Files already present and verified are skipped. Each file is streamed into
    ``<name>.part`` and renamed into place only after its checksum matches, so a loader never reads
    a partial or unverified file, and an interrupted run simply starts that file again.

    Transient failures (HTTP 5xx/408/429, connection errors, timeouts, truncated bodies) are retried
    ``retries`` times, waiting ``backoff * 2**attempt`` seconds. Any failure raises
    :class:`DataError` with one line, including how to place the files by hand. Returns the
    directory.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    directory = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    checksums = dict(OFFICIAL_MD5 if checksums is None else checksums)
    base_url = base_url.rstrip("/") + "/"
    by_hand = (
        f"to install without network, place {', '.join(checksums)} into {directory} "
        f"(or point data_dir or ${DATA_DIR_ENV} at a folder that holds them)"
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data directory {directory}: {exc.strerror or exc}") from None

    for name, expected in checksums.items():
        algorithm = _digest_algorithm(expected)
        final = directory / name
        if final.is_file():
            if _file_digest(final, algorithm) == expected.lower():
                logger.info("%s: already present and verified", final)
                continue
            logger.warning("%s: checksum mismatch, downloading it again", final)
            final.unlink()
        _download_file(
            base_url + name, final, algorithm, expected.lower(),
            retries=retries, backoff=backoff, timeout=timeout, progress=progress, by_hand=by_hand,
        )
        logger.info("%s: downloaded and verified", final)
    return directory


class _TransientError(Exception):
    """A failure worth retrying (the server or the network may do better next time)."""


def _download_file(url, final, algorithm, expected, *, retries, backoff, timeout, progress, by_hand) -> None:
    # A fixed temporary name: a run killed outright leaves at most one stale .part per file, which
    # the next run overwrites. Loaders only ever open the final names.
    partial = final.with_name(final.name + ".part")
    try:
        for attempt in range(retries + 1):
            try:
                digest = _fetch(url, partial, algorithm, timeout=timeout, progress=progress)
                break
            except _TransientError as exc:
                failure = str(exc)
                if attempt < retries:
                    logger.info("%s: %s; retrying", url, failure)
                    time.sleep(backoff * 2**attempt)
        else:
            attempts = f"{retries + 1} attempt{'s' if retries else ''}"
            raise DataError(f"could not download {url} after {attempts} ({failure}); {by_hand}")
        if digest != expected:
            raise DataError(
                f"{url}: checksum mismatch ({algorithm} {digest}, expected {expected}); the download was discarded"
            )
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)


def _fetch(url: str, destination: Path, algorithm: str, *, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``destination``; return its hex digest. Transient failures raise _TransientError."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    hasher = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(destination, "wb") as stream:
            length = response.headers.get("Content-Length")
            expected_size = int(length) if length and length.isdigit() else None
            received = 0
            with _progress_bar(progress, expected_size, destination.name.removesuffix(".part")) as bar:
                while chunk := response.read(_DOWNLOAD_CHUNK):
                    stream.write(chunk)
                    hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # http.client may return a short body without complaint when the peer closes early.
            if expected_size is not None and received != expected_size:
                raise _TransientError(f"connection closed after {received} of {expected_size} bytes")
            stream.flush()
            os.fsync(stream.fileno())
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code >= 500 or exc.code in (408, 429):
            raise _TransientError(f"HTTP {exc.code} {exc.reason}") from None
        raise DataError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _TransientError(f"cannot reach the server: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, short reads
        raise _TransientError(f"{type(exc).__name__}: {exc}") from None
    return hasher.hexdigest()


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, count: int) -> None:
        pass


def _progress_bar(enabled: bool, total: int | None, description: str):
    if not (enabled and sys.stderr.isatty()):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False, file=sys.stderr)


def _digest_algorithm(digest: str) -> str:
    algorithm = {32: "md5", 64: "sha256"}.get(len(digest))
    if algorithm is None:
        raise ValueError(f"checksum {digest!r} is neither an MD5 (32 hex digits) nor a sha256 (64 hex digits)")
    return algorithm


def _file_digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


# ------------------------------------------------------------------------------------------ loader


@dataclass(frozen=True)
class DataSource:
    """Where one split comes from: ``kind`` is "bundled", "cache" or "directory"."""

    kind: str
    split: str
    images_path: Path
    labels_path: Path

    def describe(self) -> str:
        """One line for the user saying which data is used."""
        if self.kind == "bundled":
            return (
                f"Fashion-MNIST {self.split}: bundled subset (first {BUNDLED_COUNT:,} training images); "
                f"run `cnn-backend download` for the full set"
            )
        where = "cache" if self.kind == "cache" else "directory"
        return f"Fashion-MNIST {self.split}: files in {where} {self.images_path.parent}"


def resolve_source(split: str = "train", source: str | os.PathLike = "auto") -> DataSource:
    """Decide which files :func:`load_fashion_mnist` would read, without reading them.

    ``source`` is "auto" (the full set in :func:`default_data_dir` when its files for ``split`` are
    there, else the bundled subset), "bundled", or a directory holding the IDX files (gz or raw).
    """
    images_name, labels_name = _file_names(split)
    if isinstance(source, str) and source in ("auto", "bundled"):
        if source == "auto":
            directory = default_data_dir()
            images, labels = _find_file(directory, images_name), _find_file(directory, labels_name)
            if images and labels:
                return DataSource("cache", split, images, labels)
            if images or labels:
                missing = labels_name if images else images_name
                raise DataError(
                    f"{directory}: incomplete data set, {missing} (or its uncompressed form) is missing; "
                    f"run `cnn-backend download` or remove the folder"
                )
        if split != "train":
            raise DataError(
                f"the {split} split is not bundled (only the first {BUNDLED_COUNT:,} training images are); "
                f"run `cnn-backend download` to fetch the full Fashion-MNIST into {default_data_dir()}, "
                f"or pass a directory holding {images_name} and {labels_name}"
            )
        return DataSource("bundled", split, BUNDLED_DIR / images_name, BUNDLED_DIR / labels_name)

    directory = Path(source).expanduser()
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (source must be 'auto', 'bundled' or a folder of IDX files)")
    found = []
    for name in (images_name, labels_name):
        path = _find_file(directory, name)
        if path is None:
            raise DataError(f"{directory}: no {name} or {name.removesuffix('.gz')} for the {split} split")
        found.append(path)
    return DataSource("directory", split, *found)


def describe_source(split: str = "train", source: str | os.PathLike = "auto") -> str:
    """One line saying which data :func:`load_fashion_mnist` would use for these arguments."""
    return resolve_source(split, source).describe()


def load_fashion_mnist(split: str = "train", source: str | os.PathLike = "auto") -> tuple[numpy.ndarray, numpy.ndarray]:
    """Load one split on the host: images uint8 ``(N, 28, 28)`` and labels int64 ``(N,)``.

    See :func:`resolve_source` for ``source``. The choice is logged at INFO on the
    ``cnn_backend.data`` logger. The bundled files are checked against their recorded sha256.
    """
    resolved = resolve_source(split, source)
    if resolved.kind == "bundled":
        _verify_bundled(resolved.images_path, resolved.labels_path)
    images = read_images(resolved.images_path)
    labels = read_labels(resolved.labels_path)
    if len(images) != len(labels):
        raise DataError(
            f"{resolved.images_path.parent}: {resolved.images_path.name} has {len(images)} images "
            f"but {resolved.labels_path.name} has {len(labels)} labels"
        )
    logger.info("%s (%s images)", resolved.describe(), f"{len(images):,}")
    return images, labels


def _verify_bundled(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: bundled file missing; reinstall cnn-backend")
        digest = _file_digest(path, "sha256")
        if digest != BUNDLED_SHA256[path.name]:
            raise DataError(f"{path}: bundled file corrupt (sha256 {digest}, expected {BUNDLED_SHA256[path.name]}); reinstall cnn-backend")


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

    ``x`` has shape ``(B, 1, H, W)`` (NCHW) in ``backend.dtype``, scaled to [0, 1]; ``y`` is int64.
    Images go to the device as uint8 (4x less traffic than float32) and are converted there. When
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
        rank: int = 0,
        size: int = 1,
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

        if not 0 <= rank < size:
            raise ValueError(f"rank must be in [0, {size}), got {rank!r}")
        if batch_size % size:
            raise ValueError(
                f"the batch size {batch_size} cannot be shared by {size} processes: choose a multiple of "
                f"{size} ({', '.join(str(size * k) for k in _nearby_multiples(batch_size, size))})"
            )

        self.backend = backend
        self.batch_size = int(batch_size)
        self.rank, self.size = int(rank), int(size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_samples = len(images)
        self._host_images = numpy.ascontiguousarray(images)
        self._host_labels = labels.astype(numpy.int64)
        last = self.num_samples - (len(self) - 1) * self.batch_size if len(self) else 0
        if 0 < last < self.size:
            raise ValueError(
                f"the last batch of an epoch holds {last} samples, fewer than the {self.size} processes: "
                f"use drop_last, or change the batch size or the number of training samples"
            )
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

    def share(self, index: int) -> BatchShare:
        """This process's part of global batch ``index`` (0-based) of an epoch."""
        total = min(self.batch_size, self.num_samples - index * self.batch_size)
        base, extra = divmod(total, self.size)
        start = self.rank * base + min(self.rank, extra)
        return BatchShare(start, start + base + (self.rank < extra), total)

    def order(self, epoch_index: int) -> numpy.ndarray:
        """Host permutation of sample indices for this epoch (identity when not shuffling)."""
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

    def _to_float(self, x_uint8):
        x = x_uint8.astype(self.backend.dtype)
        x *= 1.0 / 255.0  # a Python float keeps the array's dtype
        return x
