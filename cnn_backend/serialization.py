"""Host-side files: ``.npz`` archives written atomically and read without pickle."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Callable

import numpy


class ModelFileError(ValueError):
    """A model or checkpoint file that cannot be read or does not fit the model."""



def json_array(value):
    """A JSON document as a 0-d unicode array, storable in an ``.npz`` without pickle."""
    return numpy.array(json.dumps(value))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Readers of ``path`` see the old file or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
        with numpy.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled or corrupt), OSError
        raise ModelFileError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
