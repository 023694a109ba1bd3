"""Host-side files: ``.npz`` archives written atomically and read without pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy


class ModelFileError(ValueError):
    """A model or checkpoint file that cannot be read or does not fit the model."""



def json_array(value):
    """A JSON document as a 0-d unicode array, storable in an ``.npz`` without pickle."""
    return numpy.array(json.dumps(value))


def write_npz_atomic(path: str | os.PathLike, arrays: dict) -> Path:
    """Write ``arrays`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            numpy.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_npz(path: str | os.PathLike) -> dict:
    """All arrays of an ``.npz`` file, refusing pickled objects; one-line error when unreadable."""
    try:
        with numpy.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled or corrupt), OSError
        raise ModelFileError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
