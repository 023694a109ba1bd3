"""Datasets: a registry of named ones, one reader per format, verified downloads, and image folders.

* :mod:`.registry` - the named datasets (files, published checksums, shape, classes, licence);
* :mod:`.download` - verified downloads with retries, and safe archive unpacking;
* :mod:`.idx`, :mod:`.cifar`, :mod:`.folder` - one module per format;
* :mod:`.sources` - what ``--data`` names and :func:`load_dataset`.

Loaders return :class:`LabelledImages`: host uint8 images ``(N, C, H, W)``, int64 labels and the
class names. Devices are left to :class:`cnn_backend.data.BatchLoader`.
"""

from .base import DATA_DIR_ENV, DataError, LabelledImages, data_root, dataset_dir
from .registry import DATASETS, DatasetInfo, dataset_info
from .sources import NAMED_SOURCES, download_dataset, has_test_split, load_dataset, source_kind

__all__ = [
    "DATA_DIR_ENV", "DATASETS", "DataError", "DatasetInfo", "LabelledImages", "NAMED_SOURCES",
    "data_root", "dataset_dir", "dataset_info", "download_dataset", "has_test_split", "load_dataset", "source_kind",
]
