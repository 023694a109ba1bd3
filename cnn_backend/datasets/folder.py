"""A folder of images, one sub-folder per class, decoded with Pillow and cached as uint8 arrays.

Layouts (the ones torchvision's ``ImageFolder`` users already have)::

    root/<class>/<image>                     one pool of images (hold out a validation fraction)
    root/train/<class>/<image>               a training split ...
    root/test/<class>/<image>                ... and, optionally, a test split

Class names are the sub-folder names in sorted order (hidden ones skipped); images are found
recursively inside each class folder. Files whose extension is not an image extension, and images
Pillow cannot decode or convert, are skipped and reported in one summary line (``strict=True``
refuses them instead). Every image is converted to the channel count (1 or 3; default 3 if any
image is colour, else 1) and resized to one size (default: the most common one).

The decoded arrays are cached under ``data_root()/image-folders`` as uint8 ``.npy`` files opened
memory-mapped, one entry per folder, split and resolved channel count and size (what the images are
converted to, so a load that leaves them out and one that names the same values share an entry),
valid while every file's relative name, size and modification time are unchanged: the second load
of an unchanged folder reads no image, and any change (a file added, removed, replaced or touched)
decodes the folder again.

File names that are not valid UTF-8 (bytes the file system gives Python as surrogate escapes) are
loaded like any other and shown with U+FFFD in notes and errors; a class folder so named is refused,
because class names are written as text into checkpoints, exported models and reports.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import math
import os
import shutil
import socket
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy

from .base import DataError, LabelledImages, data_root, printable, progress_bar

logger = logging.getLogger("cnn_backend.data")

#: torchvision's ``IMG_EXTENSIONS``, plus GIF (Pillow decodes its first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
#: Pillow modes without colour: their images count as greyscale when choosing the channel count.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
CHANNEL_CHOICES = (1, 3)
CACHE_FOLDER = "image-folders"
_CACHE_VERSION = 2  # 2: entries keyed on the resolved channels and size
_NAMES_SHOWN = 3
#: why a file whose extension is no image extension is skipped
NOT_AN_IMAGE = "not an image file extension"


@dataclass(frozen=True)
class ImageFile:
    relative: str  # path relative to the split's folder, with forward slashes
    label: int
    size: int
    mtime_ns: int


def _check_class_names(folder: Path, names) -> None:
    """Refuse class folders whose names are not UTF-8: class names are stored as text (checkpoints,
    ONNX metadata, reports), where such a name cannot be written or would not read back the same."""
    bad = [name for name in names if not _is_text(name)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"{printable(folder / bad[0])}: the class folder's name is not valid UTF-8{more}; rename it "
            "(class names are stored as text in checkpoints, exported models and reports)"
        )


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------------------ layout


def find_classes(directory: Path) -> list[str]:
    """The class names under ``directory``: its non-hidden sub-folders, sorted."""
    try:
        entries = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
    except FileNotFoundError:
        raise DataError(f"{printable(directory)}: no such folder") from None
    except NotADirectoryError:
        raise DataError(f"{printable(directory)}: not a folder") from None
    except OSError as exc:
        raise DataError(f"{printable(directory)}: cannot list ({exc.strerror or exc})") from None
    return entries


#: folders beside ``train`` that hold a validation split, which the train/test layout does not read
#: (the validation images are held out of ``train``): named in a note
VALIDATION_FOLDERS = ("val", "valid", "validation")
#: names of split folders in any case: a root whose only folders are such names is refused unless it
#: is the train/test layout, rather than read as two "classes" named after the splits
_SPLIT_LIKE = frozenset({"train", "training", "test", "testing", *VALIDATION_FOLDERS})


#: folders beside ``train`` that a split layout may hold besides its splits (STL-10's unlabeled
#: images, the resource forks of a zip made on a Mac), in lower case
_BESIDE_SPLITS = frozenset({"unlabeled", "unlabelled", "__macosx"})


def has_split_layout(root: Path) -> bool:
    """True when ``root/train`` holds class folders, beside a ``test`` folder or only beside folders
    of another split (val, Test, unlabeled, __MACOSX): the train/test layout. A class folder named
    ``train`` beside other classes and no test folder (bus, car, train) is a class."""
    train = root / "train"
    if not (train.is_dir() and find_classes(train)):
        return False
    if (root / "test").is_dir():
        return True
    others = {name.lower() for name in find_classes(root)} - {"train"}
    return others <= _SPLIT_LIKE | _BESIDE_SPLITS


def _refuse_split_names_as_classes(root: Path, class_names: list[str]) -> None:
    """DataError when every class folder of ``root`` is named as a split (Training/Testing, val, a
    train folder of images): a classifier of the splits is never what was meant."""
    if len(class_names) >= 2 and all(name.lower() in _SPLIT_LIKE for name in class_names):
        raise DataError(
            f"{printable(root)}: its folders {', '.join(class_names)} look like splits, not classes; use the layout "
            f"{printable(root / 'train')}/<class>/<images> (and {printable(root / 'test')}/<class>/<images>), "
            f"or pass --data {printable(root / class_names[0])} to read one split's class folders"
        )


def looks_like_image_folder(root: Path) -> bool:
    """True when ``root`` has sub-folders (class folders, or train/test splits of them)."""
    return root.is_dir() and bool(find_classes(root))


def split_folder(root: Path, split: str) -> tuple[Path, Path]:
    """The folder holding ``split``'s class folders, and the one that defines the class names."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of train, test, got {split!r}")
    # Only evaluate asks for the test split: the hints name what it can do instead.
    instead = "evaluate the checkpoint's validation images instead (--split train, the default)"
    if has_split_layout(root):
        if split == "test" and not (root / "test").is_dir():
            raise DataError(f"{printable(root)}: no test split (no test folder beside train); {instead}, or add {printable(root / 'test')}/<class>/<images>")
        return root / split, root / "train"
    if split == "test":
        raise DataError(
            f"{printable(root)}: no test split (the folder is root/<class>/..., not root/train and root/test); "
            f"{instead}, or pass --data a folder with train and test sub-folders"
        )
    return root, root


def list_images(folder: Path, class_names: list[str]) -> tuple[list[ImageFile], list[tuple[str, str]]]:
    """Image files of every class folder (recursively: each folder's files by name, then its
    sub-folders) and ``(relative name, reason)`` of the other files. Plain strings and
    ``os.scandir`` keep this quick: it runs on every load, cached or not.

    Folder links are followed, as torchvision's ``ImageFolder`` does, with two exceptions that keep
    each image in its own class: a link to a folder that holds the class folder (``up -> ..``, a
    loop) and a link into another class's folder are not walked; and within one class a folder
    reached twice is walked once. These checks are per class, so a link in one class folder never
    hides another class's images from that class."""
    images, others = [], []
    class_reals = [os.path.realpath(os.path.join(folder, name)) for name in class_names]

    def taken(real: str, label: int) -> bool:
        """True when ``real`` lies in another class's folder, deeper than in this class's own (a
        class folder nested in another one keeps its images; two names for one folder share it)."""
        own = len(class_reals[label]) if _inside(real, class_reals[label]) else -1
        return any(other != label and len(base) > own and _inside(real, base) for other, base in enumerate(class_reals))

    def walk(directory: str, relative: str, label: int, visited: set[str]) -> None:
        real = os.path.realpath(directory)
        if real in visited or (real != class_reals[label] and _inside(class_reals[label], real)):
            return  # walked already, or holds this class folder: a loop
        if taken(real, label):
            return  # another class's folder: its images are that class's
        visited.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:
            return
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}"
            try:
                if entry.is_dir():
                    subfolders.append((entry.path, name))
                    continue
                if entry.is_symlink() and not os.path.exists(entry.path):
                    others.append((name, "broken link: its target does not exist"))
                    continue
                if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    others.append((name, NOT_AN_IMAGE))
                    continue
                stat = entry.stat()
            except OSError as exc:
                others.append((name, f"cannot read ({exc.strerror or exc})"))
                continue
            images.append(ImageFile(name, label, stat.st_size, stat.st_mtime_ns))
        for path, name in subfolders:
            walk(path, name, label, visited)

    for label, class_name in enumerate(class_names):
        walk(os.path.join(folder, class_name), class_name, label, set())
    return images, others


def _inside(path: str, folder: str) -> bool:
    """True when the real path ``path`` is ``folder`` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# --------------------------------------------------------------------------------- decoding


def parse_image_size(value) -> tuple[int, int] | None:
    """``None``, ``N`` / ``"N"`` (square) or ``"HxW"`` / ``(H, W)`` as ``(height, width)``."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.lower().split("x")
        try:
            numbers = tuple(int(part) for part in parts)
        except ValueError:
            raise ValueError(f"image size must be N or HxW (e.g. 32 or 48x64), got {value!r}") from None
    elif isinstance(value, int):
        numbers = (value,)
    else:
        numbers = tuple(int(part) for part in value)
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1 or max(numbers) > 4096:
        raise ValueError(f"image size must be N or HxW with sides 1-4096, got {value!r}")
    return numbers


def check_channels(channels) -> int | None:
    if channels is not None and channels not in CHANNEL_CHOICES:
        raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    return channels


def read_header(path: Path) -> tuple[str, tuple[int, int]]:
    """``(mode, (height, width))`` of an image file, read without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _open_image(path) as image:
            return image.mode, (image.height, image.width)
    except UnidentifiedImageError:
        raise DataError("not an image Pillow recognises") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read ({_reason(exc)})") from None


def decode_image(path: str | os.PathLike, channels: int, size: tuple[int, int] | None) -> numpy.ndarray:
    """Decode one image file into uint8 ``(channels, H, W)``: converted to L (1) or RGB (3) and,
    when ``size`` is given, resized to ``(height, width)`` (bilinear, antialiased)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    target_mode = "L" if channels == 1 else "RGB"
    try:
        with _open_image(path) as image:
            image.load()
            image = _eight_bit(image)
            try:
                converted = image.convert(target_mode) if image.mode != target_mode else image
            except ValueError as exc:
                raise DataError(f"cannot convert Pillow mode {image.mode} to {target_mode} ({_reason(exc)})") from None
            if size is not None and (converted.height, converted.width) != tuple(size):
                converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            pixels = numpy.asarray(converted, dtype=numpy.uint8)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("not an image Pillow recognises") from None
    except OSError as exc:
        if exc.errno is not None and exc.strerror:  # the file system's refusal (permission denied), not the decoder's
            raise DataError(f"cannot read ({exc.strerror})") from None
        raise DataError(f"cannot decode ({_reason(exc)})") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode ({_reason(exc)})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _eight_bit(image):
    """``image`` in a mode Pillow converts to L or RGB without losing it: 16-bit and 32-bit integer
    greyscale scaled down to 8 bits (Pillow's own conversion clips them at 255: a 16-bit picture
    came out white), float greyscale from [0, 1] (or clipped to [0, 255] if it goes beyond 1), and a
    palette image with transparency through RGBA (Pillow warns otherwise)."""
    from PIL import Image

    if image.mode.startswith("I"):
        pixels = numpy.asarray(image).astype(numpy.int64)
        bits = 8 if image.mode == "I" and pixels.max(initial=0) <= 255 else 16
        scaled = numpy.clip(pixels, 0, (1 << bits) - 1) >> (bits - 8)
        return Image.fromarray(scaled.astype(numpy.uint8), mode="L")
    if image.mode == "F":
        pixels = numpy.asarray(image, dtype=numpy.float64)
        scale = 255.0 if numpy.nanmax(pixels, initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(numpy.clip(numpy.nan_to_num(pixels) * scale, 0, 255).round().astype(numpy.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA")
    return image


@contextlib.contextmanager
def _open_image(path):
    """``Image.open`` without Pillow's DecompressionBombWarning, a two-line Python warning: an image
    of up to twice ``Image.MAX_IMAGE_PIXELS`` is decoded like any other; a larger one still raises
    DecompressionBombError, which the callers report in one line."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        # Pillow's UserWarnings on damaged files ("Truncated File Read", "Tag data larger than
        # file"): multi-line Python warnings, where a file that fails is reported in one line anyway.
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
        with Image.open(path) as image:
            yield image


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ------------------------------------------------------------------------------------ loader


def load_image_folder(
    root: str | os.PathLike,
    split: str = "train",
    *,
    channels: int | None = None,
    image_size=None,
    strict: bool = False,
    cache: bool = True,
    progress: bool = True,
) -> LabelledImages:
    """Load one split of an image folder (see the module docstring) as :class:`LabelledImages`.

    ``channels`` is 1, 3 or None (3 if any image is colour); ``image_size`` is None (the most
    common size), N or ``"HxW"``. Skipped files are summarised in the result's ``notes``, beside a
    validation folder the layout does not read and an automatic size above 256 pixels a side.
    ``progress``: a progress bar on standard error (when it is a terminal) while images are decoded.
    """
    root = Path(root).expanduser()
    channels = check_channels(channels)
    size = parse_image_size(image_size)
    if not root.is_dir():
        raise DataError(f"{printable(root)}: no such folder" if not root.exists() else f"{printable(root)}: not a folder")
    folder, class_folder = split_folder(root, split)
    split_layout = class_folder != root  # the classes are train's
    class_names = find_classes(class_folder)
    _check_class_names(class_folder, class_names)
    if not split_layout:
        _refuse_split_names_as_classes(root, class_names)
    if not class_names:
        raise DataError(f"{printable(class_folder)}: no class folders; expected {printable(class_folder)}/<class name>/<image files>")
    if len(class_names) == 1:
        raise DataError(f"{printable(class_folder)}: only one class folder ({class_names[0]}); a classifier needs at least two")
    # A test folder is checked on training too: a class it adds would be found only at evaluation.
    test_folder = root / "test" if split_layout else None
    if test_folder is not None and test_folder.is_dir():
        test_classes = find_classes(test_folder)
        _check_class_names(test_folder, test_classes)
        unknown = sorted(set(test_classes) - set(class_names))
        if unknown:
            raise DataError(f"{printable(test_folder)}: class folders {', '.join(unknown)} are not in {printable(class_folder)}")
    files, others = list_images(folder, class_names)
    if split == "train":
        counts = Counter(item.label for item in files)
        empty = [name for label, name in enumerate(class_names) if counts[label] == 0]
        if empty:
            raise DataError(
                f"{printable(folder / empty[0])}: no image files ({', '.join(IMAGE_EXTENSIONS)})"
                + (f"; {len(empty) - 1} more empty class folders" if len(empty) > 1 else "")
            )
    if not files:
        raise DataError(f"{printable(folder)}: no image files in its class folders ({', '.join(IMAGE_EXTENSIONS)})")

    listing = _listing_digest(class_names, files, others)
    if cache:
        # Left out, channels and size are resolved from the images' headers; a cache entry of this
        # listing records that choice, so an unchanged folder is found without reading any image.
        resolved = (channels, size)
        if channels is None or size is None:
            resolved = _recorded_choice(folder, split, listing, channels, size)
        if resolved is not None:
            cached = _read_cache(_cache_dir(folder, split, *resolved), listing)
            if cached is not None:
                return _finish(cached, folder, strict, files, _layout_notes(root, split, split_layout, size, cached.images.shape))

    decoded = _decode_folder(folder, class_names, files, others, channels, size, split if cache else None, listing, progress)
    return _finish(decoded, folder, strict, files, _layout_notes(root, split, split_layout, size, decoded.images.shape))


#: an image side above which the automatic size (the most common one) gets a note: Keras's
#: ``image_dataset_from_directory`` resizes to 256x256 unless told otherwise
LARGE_IMAGE_SIDE = 256


def _layout_notes(root: Path, split: str, split_layout: bool, size_given, shape: tuple) -> tuple[str, ...]:
    """Notes on the validation folder a split layout leaves unread and on an automatic image size
    too large to train on."""
    notes = []
    if split == "train" and split_layout:
        for name in (name for name in find_classes(root) if name in VALIDATION_FOLDERS):
            notes.append(
                f"{printable(root / name)} is not read: the validation images are held out of {printable(root / 'train')}; "
                f"score a model on it with evaluate --data {printable(root / name)} --range :"
            )
    height, width = shape[2:]
    if size_given is None and max(height, width) > LARGE_IMAGE_SIDE:
        notes.append(
            f"{printable(root)}: its most common image size, {height}x{width}, is the network's input size; "
            f"pass --image-size (e.g. --image-size 64) for a smaller, faster network and cache"
        )
    return tuple(notes)


@dataclass
class _Decoded:
    images: numpy.ndarray
    labels: numpy.ndarray
    class_names: tuple[str, ...]
    skipped: list[tuple[str, str]]  # (relative name, reason)
    total: int
    from_cache: bool


def _finish(decoded: _Decoded, folder: Path, strict: bool, files: list[ImageFile], layout_notes: tuple[str, ...] = ()) -> LabelledImages:
    notes = layout_notes
    if decoded.skipped:
        if strict:
            raise DataError(
                f"{printable(folder)}: {len(decoded.skipped)} of {decoded.total} files are not usable images: "
                f"{_named(decoded.skipped)}; refused (strict): remove or fix them, or load without --strict to skip them"
            )
        summary = _skipped_summary(decoded.skipped, decoded.total, folder)
        notes = (summary, *notes)
        logger.info("%s", summary)
    channels, height, width = decoded.images.shape[1:]
    source = (
        f"image folder {printable(folder)}: {len(decoded.images):,} images, {len(decoded.class_names)} classes, "
        f"{channels}x{height}x{width}" + (" (cached)" if decoded.from_cache else "")
    )
    # The images are the listed files less the skipped ones, in the listing's order (cached or not).
    skipped = {name for name, _ in decoded.skipped}
    names = tuple(item.relative for item in files if item.relative not in skipped)
    return LabelledImages(decoded.images, decoded.labels, decoded.class_names, source, notes, files=names)


def _skipped_summary(skipped, total: int, folder: Path) -> str:
    return f"{printable(folder)}: skipped {len(skipped)} of {total} files that are not usable images: {_named(skipped)}"


def _named(skipped) -> str:
    """The first few ``(name, reason)`` of ``skipped``, and how many more."""
    shown = "; ".join(f"{printable(name)} ({reason})" for name, reason in skipped[:_NAMES_SHOWN])
    return shown + (f"; and {len(skipped) - _NAMES_SHOWN} more" if len(skipped) > _NAMES_SHOWN else "")


def _decode_folder(folder, class_names, files, others, channels, size, cache_split, listing, progress=False) -> _Decoded:
    """Decode every readable image; ``cache_split`` is the split to cache them under (None: no cache)."""
    skipped = list(others)
    headers = []
    for item in files:
        try:
            headers.append(read_header(folder / item.relative))
        except DataError as exc:
            headers.append(None)
            skipped.append((item.relative, str(exc)))
    readable = [index for index, header in enumerate(headers) if header is not None]
    if not readable:
        raise DataError(f"{printable(folder)}: none of its {len(files)} image files can be read")
    automatic = {
        "channels": 3 if any(headers[index][0] not in GREY_MODES for index in readable) else 1,
        "size": list(Counter(headers[index][1] for index in readable).most_common(1)[0][0]),
    }
    channels = automatic["channels"] if channels is None else channels
    size = tuple(automatic["size"]) if size is None else size

    shape = (len(readable), channels, *size)
    staging = cache_dir = images = None
    if cache_split is not None:
        cache_dir = _cache_dir(folder, cache_split, channels, size)
        _remove_abandoned_stagings()
        staging = cache_dir.with_name(f".{cache_dir.name}.{_HOST}.{os.getpid()}{_STAGING_SUFFIX}")
        images = _staged_images(staging, shape)
        if images is None:
            staging = None
    try:
        if images is None:
            images = numpy.empty(shape, dtype=numpy.uint8)
        keep = numpy.zeros(len(readable), dtype=bool)
        with progress_bar(progress, len(readable), f"decoding {printable(folder)}", unit="image") as bar:
            for row, index in enumerate(readable):
                item = files[index]
                try:
                    images[row] = decode_image(folder / item.relative, channels, size)
                    keep[row] = True
                except DataError as exc:
                    skipped.append((item.relative, str(exc)))
                bar.update(1)
        labels = numpy.asarray([files[index].label for index in readable], dtype=numpy.int64)
        if not keep.all():
            labels = labels[keep]
            if staging is None:
                images = _kept_rows(images, keep)
            else:  # the map is released before the file is cut to the kept rows (Windows refuses to cut a mapped file)
                images.flush()
                del images
                images = _kept_rows_of_file(staging / "images.npy", keep)
        if not len(labels):
            raise DataError(f"{printable(folder)}: none of its {len(files)} image files can be decoded")
        present = set(labels.tolist())
        listed = {item.label for item in files}
        lost = [name for label, name in enumerate(class_names) if label in listed and label not in present]
        if lost:
            raise DataError(f"{printable(folder / lost[0])}: none of its image files can be decoded, so the class would have no images")
        # Images that could not be decoded first: a note shows the first few, and the files that
        # are not images at all matter less.
        skipped.sort(key=lambda pair: (pair[1] == NOT_AN_IMAGE, pair[0]))
        decoded = _Decoded(images, labels, tuple(class_names), skipped, len(files) + len(others), False)
        if staging is not None:
            meta = {
                "version": _CACHE_VERSION, "listing": listing, "class_names": list(class_names),
                "skipped": skipped, "total": decoded.total, "automatic": automatic,
            }
            try:
                _write_staged_entry(staging, decoded, meta)
                if cache_dir.exists():
                    shutil.rmtree(cache_dir)
                os.replace(staging, cache_dir)
            except OSError as exc:  # a full disk, or another process put its entry there first: keep this result in memory
                if exc.errno == errno.ENOSPC:
                    logger.info("%s: cannot write the image cache (%s); decoded without it", staging.parent, exc.strerror)
                decoded.images = numpy.array(decoded.images)
                return decoded
            staging = None
            _remove_stale_entries(folder, cache_split, listing)
            cached = _read_cache(cache_dir, listing)
            if cached is not None:
                decoded = _Decoded(cached.images, cached.labels, cached.class_names, cached.skipped, cached.total, False)
        return decoded
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------- cache

#: the end of the name of an entry still being written, ``.<entry>.<pid>.partial``
_STAGING_SUFFIX = ".partial"


def _staged_images(staging: Path, shape: tuple):
    """A new entry's ``images.npy`` in ``staging``, memory-mapped for writing, with its disk space
    reserved up front; None (decode into memory, uncached) when the cache folder cannot be
    written or the disk cannot hold it. Without the reservation a full disk would surface as
    SIGBUS, killing the process without a word, at the first write through the map."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        images = numpy.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=numpy.uint8, shape=shape)
        _reserve(staging / "images.npy")
        return images
    except OSError as exc:
        logger.info("%s: cannot write the image cache (%s); decoding without it", staging.parent, exc.strerror or exc)
        shutil.rmtree(staging, ignore_errors=True)
        return None


def _reserve(path: Path) -> None:
    """Allocate every block of ``path`` now (OSError ENOSPC when the disk cannot hold it); a file
    system that cannot reserve space is left to fill it as it goes."""
    if not hasattr(os, "posix_fallocate"):
        return
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, os.fstat(descriptor).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    finally:
        os.close(descriptor)


#: bytes copied at a time when the images of files that failed to decode are left out
_COMPACTION_BYTES = 32 * 2**20


def _kept_rows(images, keep):
    """``images[keep]`` without a second copy of the images (one undecodable file among a folder
    of photos would otherwise double the peak memory): the kept rows moved to the front in place,
    in chunks (each row only ever moves forward, and a chunk is gathered before it is written)."""
    rows = numpy.flatnonzero(keep)
    step = max(1, _COMPACTION_BYTES // max(1, images[0].nbytes))
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        images[start:start + len(chunk)] = images[chunk]
    return images[:len(rows)]


def _kept_rows_of_file(path: Path, keep):
    """:func:`_kept_rows` of the ``.npy`` file ``path`` (no other map of it open), which is then cut
    to them, its header rewritten in place; returns the file's new memory map."""
    images = numpy.load(path, mmap_mode="r+")
    kept = _kept_rows(images, keep)
    images.flush()
    shape, dtype, offset = kept.shape, images.dtype, images.offset
    del images, kept  # every map of the file goes before the file is cut
    _shrink_npy(path, shape, dtype, offset)
    return numpy.load(path, mmap_mode="r+")


def _shrink_npy(path: Path, shape: tuple, dtype, offset: int) -> None:
    """Rewrite the header of the ``.npy`` file ``path`` for ``shape`` (fewer rows) and cut the file
    after them. NumPy pads a header so that the first axis can change in place; OSError if this
    one's length would differ."""
    header = io.BytesIO()
    numpy.lib.format.write_array_header_1_0(
        header, {"descr": numpy.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    if len(header.getvalue()) != offset:
        raise OSError(f"the header of {path} cannot be rewritten in place")
    with open(path, "r+b") as stream:
        stream.write(header.getvalue())
        stream.truncate(offset + math.prod(shape) * dtype.itemsize)


def _write_staged_entry(staging: Path, decoded: "_Decoded", meta: dict) -> None:
    """Complete the entry in ``staging``: the labels and ``meta.json`` (written last: an entry
    without it is never read)."""
    decoded.images.flush()
    numpy.save(staging / "labels.npy", decoded.labels)
    # ensure_ascii (the default) writes a file name's surrogate escapes as \udcXX: they read back unchanged.
    (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


#: this machine's name, in staging names: a cache shared between machines (a network file system)
#: holds other machines' stagings, whose processes no PID here can tell about
_HOST = "".join(character if character.isalnum() or character in "-_" else "_" for character in socket.gethostname()) or "host"


def _remove_abandoned_stagings() -> None:
    """Remove the entries this machine's processes left half-written and no longer run to finish
    (killed with SIGKILL, or by the out-of-memory killer, while decoding): nothing else would ever
    clear them. Other machines' stagings are left alone, and so is every staging where a process
    cannot be looked up without a signal (``os.kill(pid, 0)`` sends Ctrl-C on Windows)."""
    if os.name != "posix":
        return
    for staging in cache_root().glob(f".*.{_HOST}.*{_STAGING_SUFFIX}"):
        host, _, pid = staging.name.removesuffix(_STAGING_SUFFIX).rpartition(".")
        if host.endswith(f".{_HOST}") and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def cache_root() -> Path:
    return data_root() / CACHE_FOLDER


def _cache_prefix(folder: Path, split: str) -> str:
    """The start of the names of every cache entry of ``split`` of ``folder``."""
    key = json.dumps({"folder": str(folder.resolve()), "split": split, "version": _CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]  # ensure_ascii: ASCII even for an undecodable name


def _cache_dir(folder: Path, split: str, channels: int, size: tuple[int, int]) -> Path:
    """The entry of the images converted to ``channels`` and ``size``: the resolved values, so that a
    load that leaves them out (train) and one that names them (evaluate) share it."""
    return cache_root() / f"{_cache_prefix(folder, split)}-{channels}x{size[0]}x{size[1]}"


def _entries(folder: Path, split: str) -> list[Path]:
    return sorted(cache_root().glob(f"{_cache_prefix(folder, split)}-*"))


def _read_meta(entry: Path) -> dict | None:
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _recorded_choice(folder: Path, split: str, listing: str, channels, size) -> tuple[int, tuple[int, int]] | None:
    """``(channels, size)`` with the values left out (None) taken from the automatic choice that a
    cache entry of this very listing recorded; None when no entry has it."""
    for entry in _entries(folder, split):
        meta = _read_meta(entry)
        if meta is None or meta.get("version") != _CACHE_VERSION or meta.get("listing") != listing:
            continue
        try:
            automatic = meta["automatic"]
            recorded = check_channels(int(automatic["channels"])), parse_image_size(automatic["size"])
        except (KeyError, TypeError, ValueError):
            continue
        return (recorded[0] if channels is None else channels), (recorded[1] if size is None else size)
    return None


def _remove_stale_entries(folder: Path, split: str, listing: str) -> None:
    """Remove this split's entries of another listing: the folder has changed since they were written
    (an entry whose automatic size changed would otherwise stay behind under its old name)."""
    for entry in _entries(folder, split):
        meta = _read_meta(entry)
        if meta is None or meta.get("listing") != listing:
            shutil.rmtree(entry, ignore_errors=True)
    # Entries of the first cache format (named by 24 hex digits alone) are never read again, and
    # their meta.json names no folder: all of them go once any folder is cached in this format.
    for entry in cache_root().glob("?" * 24):
        meta = _read_meta(entry)
        if all(c in "0123456789abcdef" for c in entry.name) and meta is not None and meta.get("version") == 1:
            shutil.rmtree(entry, ignore_errors=True)


def _listing_digest(class_names, files, others) -> str:
    hasher = hashlib.sha256()
    hasher.update(json.dumps([_CACHE_VERSION, list(class_names), sorted(others)]).encode())
    for item in files:
        # surrogateescape: a file name that is not UTF-8 is hashed as its bytes instead of failing.
        hasher.update(f"{item.relative}\0{item.label}\0{item.size}\0{item.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return hasher.hexdigest()


def _read_cache(cache_dir: Path, listing: str) -> _Decoded | None:
    """The cached arrays when they were made from exactly this listing, else None."""
    try:
        meta = _read_meta(cache_dir)
        if meta is None or meta.get("version") != _CACHE_VERSION or meta.get("listing") != listing:
            return None
        images = numpy.load(cache_dir / "images.npy", mmap_mode="r")
        labels = numpy.load(cache_dir / "labels.npy")
    except (OSError, ValueError, KeyError):
        return None
    if images.dtype != numpy.uint8 or images.ndim != 4 or labels.shape != (len(images),):
        return None
    try:
        skipped = [tuple(pair) for pair in meta.get("skipped", [])]
        return _Decoded(images, labels.astype(numpy.int64), tuple(meta["class_names"]), skipped, int(meta.get("total", 0)), True)
    except (KeyError, TypeError, ValueError):  # an entry whose meta.json another program wrote: decoded again
        return None
