"""What every dataset module shares: the error type, the loaded-data record, and where data lives."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy

DATA_DIR_ENV = "CNN_BACKEND_DATA"


class DataError(ValueError):
    """A data file is missing, unreadable, corrupt or inconsistent; ``str(err)`` is one line."""


@dataclass(frozen=True)
class LabelledImages:
    """One split on the host: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)`` (class
    indices into ``class_names``), ``source``, one line saying where the data came from,
    ``notes``, lines worth showing the user (files skipped, say), and ``names_assumed``: True when
    the files store no class names and these are assumed (a folder of IDX files is named as
    Fashion-MNIST, though it may hold MNIST's digits). ``files``: for an image folder, each image's
    file name relative to its split's folder, in the images' order: what identifies the data
    independently of the decoder (Pillow versions resize some images one grey level apart);
    empty for data whose files are arrays."""

    images: numpy.ndarray
    labels: numpy.ndarray
    class_names: tuple[str, ...]
    source: str = ""
    notes: tuple[str, ...] = ()
    names_assumed: bool = False
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != numpy.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.ndim}-D {self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.images)} images but labels of shape {self.labels.shape}")
        if self.files and len(self.files) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.files)} file names")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Per-sample shape ``(C, H, W)``."""
        return tuple(int(size) for size in self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def data_root() -> Path:
    """The folder holding every downloaded dataset and the image-folder caches:
    ``$CNN_BACKEND_DATA``, else ``<user cache>/cnn-backend``."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("cnn-backend"))


def dataset_dir(name: str) -> Path:
    """Where the files of the registered dataset ``name`` are downloaded: ``data_root() / name``."""
    return data_root() / name


def check_labels(labels: numpy.ndarray, num_classes: int) -> str | None:
    """Describe the first label outside ``0..num_classes-1``, or None when all are valid."""
    bad = numpy.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size == 0:
        return None
    first = int(bad[0])
    return (
        f"labels must be class indices 0-{num_classes - 1}; found {labels[first]} at record {first} "
        f"({bad.size} out of range)"
    )


def shape_text(shape) -> str:
    return "x".join(str(size) for size in shape)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, count: int) -> None:
        pass


def progress_bar(enabled: bool, total: int | None, description: str, **options):
    """A tqdm bar on standard error for long work (downloads, a first decode of an image folder),
    shown when ``enabled`` and standard error is a terminal; else an object that does nothing.
    ``options`` go to tqdm (``unit``, ``unit_scale``)."""
    if not (enabled and sys.stderr.isatty()):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=description, leave=False, file=sys.stderr, dynamic_ncols=True, **options)


def printable(text) -> str:
    """``text`` (a path, a message) as text that prints anywhere: bytes of a file name that are not
    UTF-8 (surrogate escapes) become U+FFFD instead of making a strict UTF-8 output fail."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
