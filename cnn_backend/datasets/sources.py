"""Which data a name or a folder stands for, and loading it: ``load_dataset(source, split)``.

``source`` is one of

* ``"auto"`` / ``"fashion-mnist"``: the full Fashion-MNIST when downloaded, else the bundled subset
  (the first 10,000 training images, shipped in ``cnn_backend/datasets/bundled``);
* ``"bundled"``: the bundled subset;
* ``"mnist"``, ``"kmnist"``, ``"cifar10"``: a registered dataset in ``dataset_dir(name)``
  (``cnn-backend download NAME`` puts it there);
* a folder: IDX files (read as Fashion-MNIST), the CIFAR-10 binary batches (or their
  archive), or class folders of images (:mod:`.folder`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from .base import DATA_DIR_ENV, DataError, LabelledImages, dataset_dir
from .cifar import read_cifar_batches
from .download import download_files, extract_tar, file_digest, offline_instructions
from .folder import load_image_folder, looks_like_image_folder
from .idx import find_idx_file, load_idx_pair
from .registry import DATASETS, FASHION_MNIST, DatasetInfo, dataset_info

logger = logging.getLogger("cnn_backend.data")

SPLITS = ("train", "test")
NAMED_SOURCES = ("auto", "bundled") + tuple(DATASETS)
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_COUNT = 10_000
#: sha256 of the bundled files, as written by scripts/make_bundled_subset.py.
BUNDLED_SHA256 = {
    "train-images-idx3-ubyte.gz": "ccdf3ab6f3c32503131aa3e9526390b870fe03bfe84f01541e3f9d82708189aa",
    "train-labels-idx1-ubyte.gz": "fbcfa013ad47cb9fcf80b8216cc2018ee91bcdb3538758782185d420a66c582f",
}
#: where the CIFAR-10 archive is unpacked, inside the dataset's folder
UNPACKED_FOLDER = "unpacked"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


# ------------------------------------------------------------------------------- Fashion-MNIST


def default_data_dir() -> Path:
    """Where the full Fashion-MNIST lives: ``dataset_dir("fashion-mnist")``, or ``$CNN_BACKEND_DATA``
    itself when it already holds the Fashion-MNIST files (the layout of earlier versions)."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        legacy = Path(configured).expanduser()
        if any(find_idx_file(legacy, name) for name in FASHION_MNIST.files):
            return legacy
    return dataset_dir(FASHION_MNIST.name)


@dataclass(frozen=True)
class DataSource:
    """Where one Fashion-MNIST split comes from: ``kind`` is "bundled", "cache" or "directory"."""

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
    """Decide which IDX files a Fashion-MNIST split is read from, without reading them.

    ``source`` is "auto" (the full set in :func:`default_data_dir` when its files for ``split`` are
    there, else the bundled subset), "bundled", or a directory holding the IDX files (gz or raw).
    """
    _check_split(split)
    images_name, labels_name = FASHION_MNIST.split_files[split]
    if isinstance(source, str) and source in ("auto", "bundled", FASHION_MNIST.name):
        if source != "bundled":
            directory = default_data_dir()
            images, labels = find_idx_file(directory, images_name), find_idx_file(directory, labels_name)
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
        path = find_idx_file(directory, name)
        if path is None:
            raise DataError(f"{directory}: no {name} or {name.removesuffix('.gz')} for the {split} split")
        found.append(path)
    return DataSource("directory", split, *found)


def load_fashion_source(resolved: DataSource) -> LabelledImages:
    if resolved.kind == "bundled":
        verify_bundled(resolved.images_path, resolved.labels_path)
    images, labels = load_idx_pair(resolved.images_path, resolved.labels_path, FASHION_MNIST.num_classes, FASHION_MNIST.image_shape[1:])
    return LabelledImages(images, labels, FASHION_MNIST.class_names, resolved.describe())


def verify_bundled(*paths: Path) -> None:
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path}: bundled file missing; reinstall cnn-backend")
        digest = file_digest(path, "sha256")
        if digest != BUNDLED_SHA256[path.name]:
            raise DataError(f"{path}: bundled file corrupt (sha256 {digest}, expected {BUNDLED_SHA256[path.name]}); reinstall cnn-backend")


# ------------------------------------------------------------------------------ registered sets


def download_dataset(name: str, directory: str | os.PathLike | None = None, **options) -> Path:
    """Download (and for CIFAR-10 unpack) the registered dataset ``name``; returns its folder.

    ``options`` go to :func:`download_files` (``mirrors``, ``retries``, ``backoff``, ``timeout``,
    ``progress``, and ``checksums`` to replace the published ones).
    """
    info = dataset_info(name)
    if directory is None:
        directory = default_data_dir() if info is FASHION_MNIST else dataset_dir(info.name)
    directory = Path(directory).expanduser()
    checksums = options.pop("checksums", None) or info.files
    mirrors = options.pop("mirrors", None) or info.mirrors
    download_files(directory, checksums, mirrors, **options)
    if info.archive_folder and _cifar_batch_folder(directory, info) is None:
        for archive in checksums:
            extract_tar(directory / archive, directory / UNPACKED_FOLDER)
    return directory


def _cifar_batch_folder(directory: Path, info: DatasetInfo) -> Path | None:
    first = info.split_files["train"][0]
    for candidate in (directory / info.archive_folder, directory / UNPACKED_FOLDER / info.archive_folder, directory):
        if (candidate / first).is_file() or (candidate / info.split_files["test"][0]).is_file():
            return candidate
    return None


def load_registered(info: DatasetInfo, split: str, directory: Path | None = None) -> LabelledImages:
    """A split of a registered dataset from ``directory`` (default: its download folder)."""
    _check_split(split)
    named = directory is None
    directory = dataset_dir(info.name) if named else Path(directory)
    how = f"run `cnn-backend download {info.name}`, or " if named else ""
    if info.format == "idx":
        images_name, labels_name = info.split_files[split]
        paths = [find_idx_file(directory, name) for name in (images_name, labels_name)]
        if not all(paths):
            missing = [name for name, path in zip((images_name, labels_name), paths) if path is None]
            raise DataError(
                f"{info.title} {split} split not found: {directory} has no {' or '.join(missing)}; "
                f"{how}{offline_instructions(directory, list(info.files), in_data_root=named)}"
            )
        images, labels = load_idx_pair(paths[0], paths[1], info.num_classes, info.image_shape[1:])
        return LabelledImages(images, labels, info.class_names, f"{info.title} {split}: files in {directory}")

    folder = _cifar_batch_folder(directory, info)
    if folder is None:
        archives = [directory / name for name in info.files if (directory / name).is_file()]
        if not archives:
            raise DataError(
                f"{info.title} not found in {directory}; {how}{offline_instructions(directory, list(info.files), in_data_root=named)}"
            )
        for archive in archives:
            digest = file_digest(archive, "md5")
            if digest != info.files[archive.name]:
                raise DataError(f"{archive}: checksum mismatch (md5 {digest}, expected {info.files[archive.name]}); delete it and download it again")
            extract_tar(archive, directory / UNPACKED_FOLDER)
        folder = _cifar_batch_folder(directory, info)
        if folder is None:
            raise DataError(f"{directory / UNPACKED_FOLDER}: the archive holds no {info.archive_folder}/{info.split_files['train'][0]}")
    paths = [folder / name for name in info.split_files[split]]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"{folder}: {', '.join(missing)} missing for the {split} split of {info.title}")
    images, labels = read_cifar_batches(paths, info.num_classes)
    return LabelledImages(images, labels, info.class_names, f"{info.title} {split}: {len(paths)} batch files in {folder}")


# ------------------------------------------------------------------------------------- dispatch


def source_kind(source: str | os.PathLike) -> str:
    """What ``source`` names: "fashion-mnist" (auto, bundled or its name), a registered name,
    "idx-folder", "cifar10-folder" or "image-folder"; DataError for a folder of none of these."""
    if isinstance(source, str) and source in ("auto", "bundled", FASHION_MNIST.name):
        return FASHION_MNIST.name
    if isinstance(source, str) and source in DATASETS:
        return source
    if not str(source).strip():  # Path("") is the working folder: an unset variable in --data "$DATA"
        raise DataError(f"the data is named by an empty string; name a dataset ({', '.join(NAMED_SOURCES)}) or a folder")
    directory = Path(source).expanduser()
    if not directory.exists():
        raise DataError(f"{directory}: no such folder, and not a dataset name ({', '.join(NAMED_SOURCES)})")
    if not directory.is_dir():
        arrays = (
            "; arrays train from Python (BatchLoader(images, labels, ...) and fit: docs/datasets.md)"
            if directory.suffix.lower() in (".npz", ".npy", ".csv") else ""
        )
        raise DataError(f"{directory}: not a folder (--data takes a dataset name or a folder){arrays}")
    if any(find_idx_file(directory, name) for name in FASHION_MNIST.files):
        return "idx-folder"
    cifar = DATASETS["cifar10"]
    if _cifar_batch_folder(directory, cifar) is not None or any((directory / name).is_file() for name in cifar.files):
        return "cifar10-folder"
    _refuse_cifar_python_version(directory)  # after the binary version, which a folder may hold beside it
    if looks_like_image_folder(directory):
        return "image-folder"
    raise DataError(
        f"{directory}: neither IDX files (train-images-idx3-ubyte.gz ...), CIFAR-10 batches (data_batch_1.bin ...) "
        f"nor class folders of images (<folder>/<class>/<image>)"
    )


def _refuse_cifar_python_version(directory: Path) -> None:
    """DataError for CIFAR-10's Python version (pickled batches, torchvision's download), which
    would otherwise be taken for an image folder of one class or for no data at all."""
    for batches in (directory, directory / "cifar-10-batches-py"):
        if (batches / "data_batch_1").is_file() and (batches / "batches.meta").is_file():
            raise DataError(
                f"{batches}: CIFAR-10's Python (pickle) version; this library reads its binary version "
                f"(data_batch_1.bin ...): run cnn-backend download cifar10, or put cifar-10-binary.tar.gz in the folder"
            )


def load_dataset(
    source: str | os.PathLike = "auto",
    split: str = "train",
    *,
    channels: int | None = None,
    image_size=None,
    strict: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> LabelledImages:
    """Load ``split`` of ``source`` (see the module docstring) as host uint8 ``(N, C, H, W)`` images,
    int64 labels and class names. ``channels``, ``image_size`` and ``strict`` apply to image folders;
    ``progress`` shows a bar on standard error (a terminal) while a folder's images are first decoded."""
    _check_split(split)
    kind = source_kind(source)
    if kind != "image-folder" and (channels is not None or image_size is not None):
        raise ValueError("--channels and --image-size apply to folders of images only; this data has a fixed shape")
    if kind == FASHION_MNIST.name or kind == "idx-folder":
        loaded = load_fashion_source(resolve_source(split, source))
        if kind == "idx-folder":  # IDX files hold no class names: Fashion-MNIST's are a guess
            assumed = (
                f"{source}: IDX files store no class names, so Fashion-MNIST's are assumed for labels 0-"
                f"{len(loaded.class_names) - 1} (reports and predictions show them)"
            )
            loaded = replace(loaded, names_assumed=True, notes=(*loaded.notes, assumed))
    elif kind == "cifar10-folder":
        loaded = load_registered(DATASETS["cifar10"], split, Path(source).expanduser())
    elif kind == "image-folder":
        loaded = load_image_folder(source, split, channels=channels, image_size=image_size, strict=strict, cache=cache, progress=progress)
    else:
        loaded = load_registered(DATASETS[kind], split)
    logger.info("%s (%s images)", loaded.source, f"{len(loaded):,}")
    return loaded


def has_test_split(source: str | os.PathLike) -> bool:
    """Whether ``source`` offers a test split (image folders only with a ``test`` folder)."""
    if source_kind(source) == "image-folder":
        from .folder import has_split_layout

        root = Path(source).expanduser()
        return has_split_layout(root) and (root / "test").is_dir()
    return True

