"""Host-side files: ``.npz`` archives written atomically and read without pickle."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import secrets
import stat
import zipfile
from pathlib import Path
from typing import Callable

import numpy

from .faults import pause_point


class ModelFileError(ValueError):
    """A model or checkpoint file that cannot be read or does not fit the model."""


class FileWriteError(OSError):
    """A file that could not be written (disk full, read-only folder, ...); the message names it.
    The file's previous version, if any, is untouched."""

    def __init__(self, path: str | os.PathLike, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = Path(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}"



def json_array(value):
    """A JSON document as a 0-d unicode array, storable in an ``.npz`` without pickle."""
    return numpy.array(json.dumps(value))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Readers of ``path`` see the old file or the complete new one, never a half-written one.
    """
    path = _replaceable_file(Path(path))
    temporary = temporary_name(path)
    created, written = [], False
    try:
        created = _make_parent_folders(path)
        yield temporary
        _keep_permissions(path, temporary)
        pause_point(f"replace {path.name}")
        os.replace(temporary, path)
        written = True
        _sync_directory(path.parent)
    except FileWriteError:
        raise
    except OSError as exc:
        raise FileWriteError(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if not written:  # a failed write leaves nothing behind, the folders made for it included
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _replaceable_file(path: Path) -> Path:
    """The file that writing ``path`` replaces: a symbolic link's target (the link stays a link), and
    never a folder, device or pipe (renaming onto one would replace it with a regular file)."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise FileWriteError(path, OSError(errno.EINVAL, f"it is {kind}; name a file to write"))
    return path


def _make_parent_folders(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; returns them, deepest first."""
    missing = list(itertools.takewhile(lambda folder: not folder.exists(), path.parents))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return missing
    except (FileExistsError, NotADirectoryError) as exc:
        blocking = next((parent for parent in reversed(path.parents) if parent.exists() and not parent.is_dir()), None)
        if blocking is None:
            raise
        raise FileWriteError(path, OSError(exc.errno, f"{blocking} is a file, not a folder")) from None


def _keep_permissions(path: Path, temporary: Path) -> None:
    """Give the new file the permissions of the one it replaces (a 600 file stays private)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    os.chmod(temporary, stat.S_IMODE(mode))


def temporary_name(path: Path) -> Path:
    """Where :func:`atomic_path` writes ``path`` before renaming it (hidden, marked with the PID)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


TEMPORARY_SUFFIX = ".tmp"


def _sync_directory(directory: Path) -> None:
    # The rename itself reaches the disk only when the folder is flushed (POSIX; a no-op elsewhere).
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomically(path: str | os.PathLike, write: Callable) -> Path:
    """Call ``write(stream)`` on a binary file that replaces ``path`` once flushed to disk."""
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
    return Path(path)


def write_npz_atomic(path: str | os.PathLike, arrays: dict) -> Path:
    """Write ``arrays`` to ``path`` as an ``.npz``, atomically."""
    return write_atomically(path, lambda stream: numpy.savez(stream, **arrays))


def read_npz(path: str | os.PathLike) -> dict:
    """All arrays of an ``.npz`` file, refusing pickled objects; one-line error when unreadable."""
    try:
        _refuse_what_is_no_npz(Path(path))
    except OSError as exc:  # a folder on the way that may not be entered, a name too long
        raise ModelFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with numpy.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled or corrupt), OSError
        raise ModelFileError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None


#: extensions of image files: a model file named so is an argument given in the wrong place
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _refuse_what_is_no_npz(path: Path) -> None:
    """ModelFileError for a folder, an image, or a file without a zip structure."""
    if path.is_dir():
        found = [name for name in ("best.npz", "last.npz") if (path / name).is_file()]
        named = " or ".join(str(path / name) for name in found)
        hint = f"give a checkpoint in it: {named}" if found else "give a .npz model file or checkpoint"
        raise ModelFileError(f"{path}: a folder, not a model file; {hint}")
    if path.is_file() and not zipfile.is_zipfile(path):
        # Checked first: numpy would call any other content "pickled data" and suggest pickle.
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            raise ModelFileError(f"{path}: an image, not a model file (.npz); the model file comes first on the command line")
        raise ModelFileError(f"{path}: not an .npz archive (no zip structure: truncated, or another kind of file)")


def stored_float_dtype(arrays) -> str:
    """``"float64"`` when the stored parameters are float64, else ``"float32"``."""
    return "float64" if any(getattr(array, "dtype", None) == numpy.float64 for array in arrays) else "float32"
